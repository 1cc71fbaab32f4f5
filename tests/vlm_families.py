"""Tiny, randomly initialised models of the VLM families people fine-tune, built offline from
their real transformers classes, for the family tests of `m3-curate finetune` and `eval`.

Each family gets its real model class and config class, its real processor class with its
real (PIL-backend) image processor, a byte-level BPE tokenizer trained on the shards' text with
the family's special tokens, and a chat template shaped like the family's published one —
without `{% generation %}` markers, as the published ones have none, so the collator must find
the assistant turns itself. A few tens of thousands of parameters: built in about a second.

    path = build_family("qwen2_vl", shards_dir, out_dir)

`FAMILIES[name]` says what the tests expect of each: `.end`, the token that closes an assistant
turn in the family's template (each labelled turn ends with it); `.language_model` and
`.projector`, the names of the text model and of the modules that map vision features to text
embeddings (what LoRA must find by itself, written here by hand from the family's source).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from curation.store.layout import iter_rows
from curation.finetune.tiny import build_tiny, message_texts, train_tokenizer
from curation.store.layout import shard_files

HIDDEN = 64  # text width
VISION = 32  # vision width (≠ HIDDEN, as in real models)

# Qwen2-VL-7B-Instruct's template, as published (default system turn, ChatML, vision markers)
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Idefics3-8B-Llama3's template ("User:<image>…<end_of_utterance>\nAssistant: …"); SmolVLM
# (v1, whose checkpoints are Idefics3 models) has the same after `<|im_start|>`
IDEFICS3_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# gemma-3-4b-it's template: BOS, a system turn folded into the first user turn, "model" for the
# assistant, trimmed text, roles that must alternate
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

QWEN_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
IDEFICS3_TOKENS = [
    "<|end_of_text|>", "<|begin_of_text|>", "<|im_start|>", "<fake_token_around_image>", "<image>", "<end_of_utterance>",
    "<global-img>", *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
]
GEMMA3_TOKENS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]


def _texts(data: Path) -> list[str]:
    return list(message_texts(iter_rows(shard_files(data, "train").files, columns=["messages"], limit=2000)))


def _llama(tokenizer: Any, **kw: Any):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **kw,
    )


def _save(model: Any, processor: Any, out: Path, stop: list[int]) -> Path:
    # generation stops at the family's end-of-turn token as well as at EOS, as published configs do
    model.generation_config.eos_token_id = stop
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _qwen_vl(data: Path, out: Path, *, v25: bool) -> Path:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from curation.finetune.processors import image_only

    tok = train_tokenizer(
        _texts(data), special_tokens=QWEN_TOKENS, pad_token="<|endoftext|>", eos_token="<|im_end|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_TOKENS}
    text = dict(
        vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, eos_token_id=ids["<|im_end|>"], bos_token_id=None,
        pad_token_id=ids["<|endoftext|>"], rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )
    if v25:
        vision = dict(depth=2, hidden_size=VISION, intermediate_size=2 * VISION, num_heads=2, out_hidden_size=HIDDEN,
                      fullatt_block_indexes=[1], window_size=56)
        config_class, model_class, processor_name = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, "Qwen2_5_VLProcessor"
    else:
        vision = dict(depth=2, embed_dim=VISION, hidden_size=HIDDEN, mlp_ratio=2, num_heads=2)
        config_class, model_class, processor_name = Qwen2VLConfig, Qwen2VLForConditionalGeneration, "Qwen2VLProcessor"
    config = config_class(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    import transformers

    # 56²–112² pixels: 4 to 16 image tokens a picture (the real default allows 16,384)
    images = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)
    processor = image_only(getattr(transformers, processor_name))(images, tok, chat_template=QWEN2_VL_TEMPLATE)
    return _save(model_class(config), processor, out, [ids["<|im_end|>"], ids["<|endoftext|>"]])


def _idefics3(data: Path, out: Path) -> Path:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tok = train_tokenizer(
        _texts(data), special_tokens=IDEFICS3_TOKENS, pad_token="<|end_of_text|>", eos_token="<end_of_utterance>",
        bos_token="<|begin_of_text|>", extra_special_tokens={"image_token": "<image>"},
    )
    # 32-pixel tiles of 4×4 patches, pixel-shuffled by 2: 4 tokens a tile; a 64-pixel image is
    # 2×2 tiles plus the global view (Idefics3's image splitting, as in the real model)
    vision = dict(hidden_size=VISION, intermediate_size=2 * VISION, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    config = Idefics3Config(vision_config=vision, text_config=_llama(tok).to_dict(), image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2)
    images = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    processor = Idefics3Processor(images, tok, image_seq_len=4, chat_template="<|begin_of_text|>" + IDEFICS3_TEMPLATE)
    stop = [tok.convert_tokens_to_ids("<end_of_utterance>"), tok.convert_tokens_to_ids("<|end_of_text|>")]
    return _save(Idefics3ForConditionalGeneration(config), processor, out, stop)


def _gemma3(data: Path, out: Path) -> Path:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, Gemma3TextConfig, SiglipVisionConfig
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tok = train_tokenizer(
        _texts(data), special_tokens=GEMMA3_TOKENS, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in GEMMA3_TOKENS}
    text = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=4096, sliding_window=64,
        pad_token_id=ids["<pad>"], eos_token_id=ids["<eos>"], bos_token_id=ids["<bos>"],
    )
    vision = SiglipVisionConfig(hidden_size=VISION, intermediate_size=2 * VISION, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    # 32-pixel images of 4×4 patches pooled to 2×2: 4 soft tokens a picture (256 in the real model)
    config = Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"], image_token_index=ids["<image_soft_token>"],
    )
    processor = Gemma3Processor(Gemma3ImageProcessorPil(size={"height": 32, "width": 32}), tok, chat_template=GEMMA3_TEMPLATE, image_seq_length=4)
    return _save(Gemma3ForConditionalGeneration(config), processor, out, [ids["<end_of_turn>"], ids["<eos>"]])


@dataclass(frozen=True, slots=True)
class Family:
    """How to build a tiny model of a family, and what the tests expect of it."""

    build: Callable[[Path, Path], Path]
    end: str  # the token that closes an assistant turn
    language_model: str  # where the text model lives
    projector: tuple[str, ...]  # the vision-to-text projector's modules
    markers: bool = False  # the chat template has {% generation %} markers
    lead: str = ""  # what an answer starts with after the generation prompt ("Assistant:" + " ")


FAMILIES: dict[str, Family] = {
    "llava": Family(lambda d, o: build_tiny(d, o, hidden_size=HIDDEN), "<|im_end|>", "model.language_model",
                    ("model.multi_modal_projector",), markers=True),
    "qwen2_vl": Family(lambda d, o: _qwen_vl(d, o, v25=False), "<|im_end|>", "model.language_model", ("model.visual.merger",)),
    "qwen2_5_vl": Family(lambda d, o: _qwen_vl(d, o, v25=True), "<|im_end|>", "model.language_model", ("model.visual.merger",)),
    "idefics3": Family(_idefics3, "<end_of_utterance>", "model.text_model", ("model.connector",), lead=" "),
    "gemma3": Family(_gemma3, "<end_of_turn>", "model.language_model", ("model.multi_modal_projector",)),
}


def build_family(name: str, data: str | Path, out: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny model of family `name` (model, processor, tokenizer) to `out`."""
    torch.manual_seed(seed)
    return FAMILIES[name].build(Path(data), Path(out))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for a module's tests: models this small are many times faster on one
    thread of a busy 2-core machine (import the fixture into a test module to use it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def labelled_runs(mask: list[bool]) -> list[tuple[int, int]]:
    """The (start, end) of each run of True in `mask`: the labelled turns of a row."""
    runs, start = [], None
    for i, m in enumerate([*mask, False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs
