"""A tiny LLaVA-style model for tests and the demo, built offline from configs.

`build_tiny(data, out)` trains a byte-level BPE tokenizer on the shards' text (train split),
with `<image>` and the chat markers as special tokens and every expert call found in the text
(plus VILA-M3's known ones) as a single non-special token, so `<VISTA3D(hepatic tumor)>` is one
token the model can learn to write and that survives `skip_special_tokens`. It then writes a
`LlavaForConditionalGeneration` (CLIP vision tower, Llama text model, a few hundred thousand
parameters) with a `LlavaProcessor` (CLIP image processor, PIL backend: no torchvision needed)
whose chat template marks assistant turns with `{% generation %}` for assistant-only loss.
Nothing is downloaded.

    python -m curation.finetune.tiny --data out/demo --out out/tiny-base
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

from curation.finetune.evaluate import CALL_RE
from curation.finetune.model_folder import saving

KNOWN_CALLS = [
    *(f"<VISTA3D({g})>" for g in (
        "everything", "hepatic tumor", "hepatoma", "pancreatic tumor", "lung tumor", "bone lesion",
        "organs", "cardiovascular", "gastrointestinal", "skeleton", "muscles", "")),
    "<BRATS()>",
    "<CXR()>",
]
SPECIAL_TOKENS = ["<pad>", "<image>", "<|im_start|>", "<|im_end|>"]

# ChatML-like. Assistant turns (their text and the closing marker, so the model learns to stop)
# sit inside {% generation %}: apply_chat_template(..., return_assistant_tokens_mask=True) then
# marks exactly those tokens. Image parts become `<image>`, which the processor expands.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{% for part in parts %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{{ '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{% for part in parts %}{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{{ '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def message_texts(rows: Iterable[dict]) -> Iterator[str]:
    """Every text part of every message of `rows` (shard rows as dicts)."""
    for row in rows:
        for message in row["messages"]:
            for part in message["content"]:
                if part.get("type") == "text" and part.get("text"):
                    yield part["text"]


def train_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int = 2000,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    pad_token: str = "<pad>",
    eos_token: str = "<|im_end|>",
    **tokenizer_kwargs: Any,
):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `texts`, with `special_tokens`
    (a family's chat and image markers) and expert calls found in the text and VILA-M3's known
    calls as single non-special tokens. `tokenizer_kwargs` go to the tokenizer (`bos_token`,
    `extra_special_tokens`, …); the default is the tiny LLaVA's ChatML tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    calls = set(KNOWN_CALLS)

    def corpus() -> Iterator[str]:
        for text in texts:
            calls.update(m.group(0) for m in CALL_RE.finditer(text))
            yield text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    # each call also with its leading space as one token, so the call is predicted straight from
    # the word before it ("trigger", "using") rather than from a generic space token
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for c in sorted(calls) for t in (" " + c, c)])
    tokenizer_kwargs.setdefault("extra_special_tokens", {"image_token": "<image>"})
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=pad_token, eos_token=eos_token, model_max_length=1 << 16, **tokenizer_kwargs
    )


def _llava_config(tokenizer: Any, *, hidden_size: int, layers: int, heads: int, vision_hidden_size: int, image_size: int, patch_size: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=vision_hidden_size, intermediate_size=vision_hidden_size * 2, num_hidden_layers=layers,
        num_attention_heads=2, image_size=image_size, patch_size=patch_size, projection_dim=vision_hidden_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=True,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.image_token_id,
        image_seq_length=(image_size // patch_size) ** 2, vision_feature_select_strategy="default",
        vision_feature_layer=-1, tie_word_embeddings=True,
    )


def build_tiny(
    data: str | Path,
    out: str | Path,
    *,
    seed: int = 0,
    vocab_size: int = 2000,
    hidden_size: int = 128,
    layers: int = 2,
    heads: int = 8,
    vision_hidden_size: int = 64,
    image_size: int = 32,
    patch_size: int = 8,
    max_rows: int | None = 5000,
    warn: bool = True,
) -> Path:
    """Write a tiny LLaVA (model, processor, tokenizer) to `out`, its tokenizer trained on the
    text of at most `max_rows` train rows under `data` (`warn=False`: the caller has named the
    shards it sets aside). Returns `out`."""
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from curation.store.layout import iter_rows, shard_files

    out = Path(out)
    files = shard_files(data, "train", columns=["messages"], warn=warn).files
    tokenizer = train_tokenizer(message_texts(iter_rows(files, columns=["messages"], limit=max_rows)), vocab_size=vocab_size)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default",  # drops CLS: (image_size / patch_size)² tokens per image
        num_additional_image_tokens=1,  # CLIP's CLS
        chat_template=CHAT_TEMPLATE,
    )
    config = _llava_config(tokenizer, hidden_size=hidden_size, layers=layers, heads=heads, vision_hidden_size=vision_hidden_size,
                           image_size=image_size, patch_size=patch_size)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    staged = out.parent / f".{out.name}.tmp"  # moved in whole, config.json last: `prepare` reuses a folder that has it
    shutil.rmtree(staged, ignore_errors=True)
    try:
        with saving(out):
            model.save_pretrained(staged)
            processor.save_pretrained(staged)
            out.mkdir(parents=True, exist_ok=True)
            for f in sorted(staged.iterdir(), key=lambda f: f.name == "config.json"):
                os.replace(f, out / f.name)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    n = sum(p.numel() for p in model.parameters())
    log.info("tiny LLaVA written to %s: %d parameters, vocabulary %d", out, n, len(tokenizer))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m curation.finetune.tiny", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a build's output folder or its shards/ folder")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=2000)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    build_tiny(args.data, args.out, seed=args.seed, vocab_size=args.vocab_size, hidden_size=args.hidden_size, layers=args.layers, heads=args.heads)


if __name__ == "__main__":
    main()
