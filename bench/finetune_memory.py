"""Device memory that `m3-curate finetune` needs for real checkpoints of each tested family.

    python bench/finetune_memory.py

Each checkpoint's architecture is built from its published configuration on PyTorch's meta
device (no weights, nothing downloaded), so its parameters are counted, not quoted; `--lora`
is applied exactly as training applies it (`curation.finetune.lora`: rank 16 on every linear
layer of the language model, the projector trained fully). The bytes are those of
`curation.finetune.memory.state_bytes`: full tuning 16 bytes a parameter (fp32 weights,
gradients, AdamW's two moments), LoRA 2 bytes a frozen bf16 parameter plus 16 a trainable one.
Activations come on top (gradient checkpointing is on by default on GPU).
"""

from __future__ import annotations

import torch

from curation.finetune.lora import lora_config
from curation.finetune.memory import gib, state_bytes


def _configs() -> dict[str, object]:
    from transformers import (
        CLIPVisionConfig, Gemma3Config, Gemma3TextConfig, Idefics3Config, LlamaConfig, LlavaConfig, Qwen2_5_VLConfig,
        Qwen2VLConfig, SiglipVisionConfig,
    )

    mrope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}

    def qwen_text(vocab, hidden, inter, layers, heads, kv, tied):
        return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                    num_attention_heads=heads, num_key_value_heads=kv, rope_parameters=dict(mrope), tie_word_embeddings=tied)

    siglip = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=14)
    return {
        "llava-1.5-7b-hf": LlavaConfig(
            vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                           image_size=336, patch_size=14, projection_dim=768),
            text_config=LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=32),
            vision_feature_layer=-2, image_token_index=32000),
        "Qwen2-VL-2B-Instruct": Qwen2VLConfig(
            text_config=qwen_text(151936, 1536, 8960, 28, 12, 2, True), tie_word_embeddings=True,
            vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16)),
        "Qwen2-VL-7B-Instruct": Qwen2VLConfig(
            text_config=qwen_text(152064, 3584, 18944, 28, 28, 4, False),
            vision_config=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16)),
        "Qwen2.5-VL-3B-Instruct": Qwen2_5_VLConfig(
            text_config=qwen_text(151936, 2048, 11008, 36, 16, 2, True), tie_word_embeddings=True,
            vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048)),
        "Qwen2.5-VL-7B-Instruct": Qwen2_5_VLConfig(
            text_config=qwen_text(152064, 3584, 18944, 28, 28, 4, False),
            vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584)),
        "SmolVLM-Instruct (Idefics3)": Idefics3Config(
            vision_config=dict(siglip, image_size=384), scale_factor=3,
            text_config=LlamaConfig(vocab_size=49155, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                                    num_attention_heads=32, num_key_value_heads=32).to_dict()),
        "Idefics3-8B-Llama3": Idefics3Config(
            vision_config=dict(siglip, image_size=364), scale_factor=2,
            text_config=LlamaConfig(vocab_size=128259, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=8).to_dict()),
        "gemma-3-4b-it": Gemma3Config(
            text_config=Gemma3TextConfig(vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                                         num_attention_heads=8, num_key_value_heads=4, head_dim=256),
            vision_config=SiglipVisionConfig(**siglip, image_size=896), mm_tokens_per_image=256),
        "gemma-3-12b-it": Gemma3Config(
            text_config=Gemma3TextConfig(vocab_size=262208, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                                         num_attention_heads=16, num_key_value_heads=8, head_dim=256),
            vision_config=SiglipVisionConfig(**siglip, image_size=896), mm_tokens_per_image=256),
    }


def _empty(config, dtype: torch.dtype):
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config, dtype=dtype)


def measure(name: str, config) -> dict[str, float]:
    from peft import get_peft_model

    full = state_bytes(_empty(config, torch.float32))
    lora = get_peft_model(_empty(config, torch.bfloat16), lora_config(_empty(config, torch.bfloat16), rank=16, alpha=None,
                                                                        dropout=0.05, targets=None, name=name))
    for p in lora.parameters():  # as training does: adapters and projector in fp32
        if p.requires_grad:
            p.data = p.data.float()
    adapted = state_bytes(lora)
    return {"parameters_b": round(full["parameters"] / 1e9, 2), "full_gib": gib(full["bytes"]),
            "lora_trainable_m": round(adapted["trainable"] / 1e6, 1), "lora_gib": gib(adapted["bytes"])}


def main() -> None:
    print(f"{'checkpoint':30} {'params':>8} {'full':>9} {'LoRA trainable':>15} {'LoRA':>8}")
    for name, config in _configs().items():
        m = measure(name, config)
        print(f"{name:30} {m['parameters_b']:>7}B {m['full_gib']:>7} GiB {m['lora_trainable_m']:>13}M {m['lora_gib']:>5} GiB")


if __name__ == "__main__":
    main()
