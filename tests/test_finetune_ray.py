"""`m3-curate finetune --workers 2`: the same loop on two Ray Train workers (CPU, Gloo DDP),
each streaming its own row groups; rank 0 writes checkpoints and the model, and a resumed
run on Ray continues from the newest checkpoint."""

from __future__ import annotations

import json

import pytest

from curation.cli import main
from curation.finetune.train import checkpoints
from shards_factory import write_shards

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_finetune_on_two_ray_train_workers(tmp_path, capsys):
    pytest.importorskip("ray.train")
    data = write_shards(tmp_path / "build", conversations=40, seed=4, rows_per_shard=10, row_group_size=5)
    out = tmp_path / "run"
    argv = ["-q", "finetune", "--data", str(data), "--model", "tiny", "--out", str(out), "--workers", "2",
            "--max-steps", "4", "--batch-size", "2", "--lr", "1e-3", "--save-steps", "2", "--log-steps", "1"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    losses = json.loads((out / "train_summary.json").read_text())["losses"]
    assert summary["steps"] == 4 and [s for s, _ in losses] == [1, 2, 3, 4]
    assert [p.name for p in checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 4
    assert (out / "model.safetensors").exists() and (out / "train_summary.json").exists()

    assert main([*argv[:-6], "--max-steps", "6", "--save-steps", "2", "--resume"]) == 0
    assert json.loads((out / "train_summary.json").read_text())["resumed_from"] == 4
