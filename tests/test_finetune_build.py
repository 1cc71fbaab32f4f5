"""Fine-tuning and eval on a real `m3-curate build` (2-case demo archive, weight-free experts,
the real templates): assistant-only labels on a rendered multi-turn, multi-image row, a few
training steps, and the eval JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from build_helpers import demo_manifest

from curation.cli import main
from curation.demo import write_demo_archive
from curation.finetune.chat import ChatCollator
from curation.finetune.data import count_rows
from curation.store.layout import iter_rows
from curation.finetune.train import TrainConfig, prepare, train
from curation.store.layout import shard_files

pytestmark = [pytest.mark.slow, pytest.mark.ray]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("real")
    write_demo_archive(root / "archive", cases=2, seed=0)
    manifest = root / "m.yaml"
    manifest.write_text(yaml.safe_dump(demo_manifest(root / "archive", root / "out", rows_per_shard=50)))
    subprocess.run([sys.executable, "-m", "curation", "-q", "build", str(manifest)], check=True, cwd=REPO)
    return root / "out"


def test_tiny_model_trains_and_evaluates_on_a_real_build(build, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    config = prepare(TrainConfig(data=str(build), model="tiny", out=str(out), lr=3e-3, batch_size=2, max_steps=6,
                                 save_steps=3, tiny={"hidden_size": 32}))

    # a rendered conversation with a trigger turn and an answer turn, and two images
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(config.model)
    row = next(r for r in iter_rows(shard_files(build, "train").files)
               if len(r["images"]) >= 2 and sum(m["role"] == "assistant" for m in r["messages"]) >= 2)
    batch = ChatCollator(processor)([row])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    expected = "".join(p["text"] + "<|im_end|>" for m in row["messages"] if m["role"] == "assistant" for p in m["content"])
    assert processor.tokenizer.decode(ids[labels != -100]) == expected
    assert (labels[ids == processor.tokenizer.image_token_id] == -100).all()

    summary = train(config)
    assert summary["steps"] == 6 and summary["final_loss"] < summary["losses"][0][1]

    report = tmp_path / "eval.json"
    assert main(["-q", "eval", "--model", str(out), "--data", str(build), "--out", str(report), "--cpu-threads", "1"]) == 0
    result = json.loads(report.read_text())
    assert result["rows"] == count_rows(shard_files(build, "test").files)
    assert set(result) >= {"expert_selection", "closed_questions", "by_task", "false_calls", "missed_calls", "decisions"}
