"""The shards as they are, read with `datasets` and trained on by TRL's SFTTrainer (its
vision-language collator, assistant-only loss) — the route a user takes without our trainer."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
import torch

from curation.finetune.tiny import build_tiny
from shards_factory import write_shards

pytest.importorskip("trl")


def load_shards(data: Path, split: str):
    """`datasets.load_dataset("parquet")` on a split's shards, with `images` decoded to PIL
    images (a cast of the column's type at load time; the files are not touched)."""
    from datasets import Image, List, load_dataset

    files = sorted(glob.glob(str(data / "dataset" / "data" / split / "*.parquet")))
    ds = load_dataset("parquet", data_files=files, split="train")
    if not isinstance(ds.features["images"], List) or not isinstance(ds.features["images"].feature, Image):
        ds = ds.cast_column("images", List(Image()))
    return ds


@pytest.mark.slow
def test_sft_trainer_trains_on_the_shards_unchanged(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(1)
    data = write_shards(tmp_path / "build", conversations=24, seed=2)
    before = {p: p.read_bytes() for p in (data / "dataset" / "data").rglob("*.parquet")}
    model_dir = build_tiny(data, tmp_path / "tiny", hidden_size=32)
    ds = load_shards(data, "train")
    assert {"messages", "images"} <= set(ds.column_names)

    config = SFTConfig(
        output_dir=str(tmp_path / "trl"), max_steps=4, per_device_train_batch_size=2, learning_rate=3e-3,
        assistant_only_loss=True, max_length=None,  # no truncation: image tokens must stay whole
        activation_checkpointing=False, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
    )
    trainer = SFTTrainer(
        model=AutoModelForImageTextToText.from_pretrained(model_dir), args=config, train_dataset=ds,
        processing_class=AutoProcessor.from_pretrained(model_dir),
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and all(loss == loss and loss < 20 for loss in losses)
    assert {p: p.read_bytes() for p in (data / "dataset" / "data").rglob("*.parquet")} == before
