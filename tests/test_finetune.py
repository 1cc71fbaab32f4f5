"""Stage-4 fine-tuning on shards: streaming, assistant-only labels, training, checkpoints,
resume, eval JSON, LoRA, and TRL's SFTTrainer reading the same shards."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from curation.cli import main
from curation.finetune.chat import ChatCollator
from curation.finetune.data import ShardStream, count_rows
from curation.store.layout import iter_rows
from curation.finetune.tiny import CHAT_TEMPLATE, build_tiny
from curation.finetune.machine import available_cpus, cpu_threads
from curation.finetune.train import StepLog, TrainConfig, checkpoints, prepare, steps_per_epoch, train
from curation.store.layout import shard_files
from shards_factory import write_shards
from vlm_families import labelled_runs, one_thread  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("build"), conversations=60, seed=1, rows_per_shard=20, row_group_size=8)


@pytest.fixture(scope="module")
def tiny(shards, tmp_path_factory) -> Path:
    return build_tiny(shards, tmp_path_factory.mktemp("tiny"), hidden_size=32)


@pytest.fixture(scope="module")
def processor(tiny):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny)


def _ids(rows):
    return [r["id"] for r in rows]


# --- streaming -----------------------------------------------------------------------------


def test_stream_splits_row_groups_across_processes(shards):
    files = shard_files(shards, "train").files
    ids = []
    for rank in range(2):
        stream = ShardStream(files, collate=_ids, batch_size=1, shuffle_buffer=4, rank=rank, world_size=2, columns=["id"])
        rows = stream.rows()
        ids += [next(rows)["id"] for _ in range(sum(u.rows for u in stream.epoch_units(0)))]
    # the two processes' first epochs together are the split, each row once
    assert sorted(ids) == sorted(_ids(iter_rows(files, columns=["id"])))


def test_stream_is_seeded_and_skip_resumes_at_the_same_batch(shards):
    files = shard_files(shards, "train").files

    def batches(seed, skip=0, k=6):
        it = iter(ShardStream(files, collate=_ids, batch_size=3, seed=seed, shuffle_buffer=8, skip_batches=skip, columns=["id"]))
        return [next(it) for _ in range(k)]

    first = batches(0, k=8)
    assert batches(0, k=8) == first
    assert batches(1, k=8) != first
    assert batches(0, skip=3, k=5) == first[3:]
    # epochs continue without end, each row once per epoch
    n = count_rows(files)
    flat = [i for b in batches(0, k=(2 * n) // 3) for i in b]
    assert sorted(flat[:n]) == sorted(flat[n : 2 * n])


def test_stream_reads_row_groups_lazily(shards, monkeypatch):
    """The first batch comes after reading about shuffle_buffer rows, not the split."""
    read = []
    original = pq.ParquetFile.iter_batches

    def counting(self, *args, **kwargs):
        for batch in original(self, *args, **kwargs):
            read.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting)
    files = shard_files(shards, "train").files
    stream = ShardStream(files, collate=_ids, batch_size=2, shuffle_buffer=4, columns=["id"])
    next(iter(stream))
    assert sum(read) <= 4 + 2 + 8  # buffer + batch + at most one row group (8 rows) read ahead
    assert sum(read) < count_rows(files)


def test_dataloader_workers_keep_the_single_process_order(shards):
    files = shard_files(shards, "train").files
    make = lambda: ShardStream(files, collate=_ids, batch_size=2, shuffle_buffer=4, skip_batches=1, columns=["id"])  # noqa: E731
    single = [b for _, b in zip(range(6), make())]
    loader = torch.utils.data.DataLoader(make(), batch_size=None, num_workers=2)
    assert [b for _, b in zip(range(6), loader)] == single


# --- labels --------------------------------------------------------------------------------


def _multi_turn_multi_image(shards) -> dict:
    for row in iter_rows(shard_files(shards, "train").files):
        assistants = sum(m["role"] == "assistant" for m in row["messages"])
        if assistants >= 2 and len(row["images"]) >= 2:
            return row
    raise AssertionError("the factory made no multi-turn, multi-image row")


def _assistant_text(row) -> str:
    return "".join(p["text"] + "<|im_end|>" for m in row["messages"] if m["role"] == "assistant" for p in m["content"])


@pytest.mark.parametrize("template", ["generation markers", "prefix rendering"])
def test_only_assistant_tokens_carry_labels(shards, tiny, template):
    from transformers import AutoProcessor

    row = _multi_turn_multi_image(shards)
    processor = AutoProcessor.from_pretrained(tiny)
    if template == "prefix rendering":  # as for a model whose chat template has no {% generation %}
        processor.chat_template = re.sub(r"{% (end)?generation %}", "", CHAT_TEMPLATE)
    collator = ChatCollator(processor)
    assert collator.native_mask == (template == "generation markers")
    batch = collator([row, _single_turn(shards)])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    tok = processor.tokenizer
    labelled = labels != -100
    # labels equal input ids where set, -100 everywhere else; image and user tokens are never labelled
    assert torch.equal(labels[labelled], ids[labelled])
    assert not labelled[ids == tok.image_token_id].any()
    assert (ids == tok.image_token_id).sum() == len(row["images"]) * 16
    assert tok.decode(ids[labelled]) == _assistant_text(row)
    # each labelled run is exactly one assistant turn: the text after "<|im_start|>assistant\n"
    runs = labelled_runs(labelled.tolist())
    assert len(runs) == sum(m["role"] == "assistant" for m in row["messages"])
    for start, _ in runs:
        assert tok.decode(ids[:start]).endswith("<|im_start|>assistant\n")
    # padding of the shorter row is not labelled
    assert not (batch["labels"][1][batch["attention_mask"][1] == 0] != -100).any()


def _single_turn(shards) -> dict:
    return next(r for r in iter_rows(shard_files(shards, "train").files) if len(r["messages"]) == 2)


def test_max_length_drops_rows_instead_of_cutting_images(shards, processor):
    rows = list(iter_rows(shard_files(shards, "train").files, limit=4))
    full = ChatCollator(processor)(rows)
    lengths = full["attention_mask"].sum(1).tolist()
    limit = sorted(lengths)[1]
    collator = ChatCollator(processor, max_length=limit)
    batch = collator(rows)
    assert batch["input_ids"].shape[0] == sum(n <= limit for n in lengths)
    assert collator.dropped == sum(n > limit for n in lengths)


# --- training ------------------------------------------------------------------------------


def _config(shards, tiny, out, **kw) -> TrainConfig:
    base = dict(data=str(shards), model=str(tiny), out=str(out), lr=3e-3, batch_size=4, max_steps=12, save_steps=6, log_steps=3,
                shuffle_buffer=16, cpu_threads=1)
    return TrainConfig(**{**base, **kw})


class Stop(Exception):
    pass


@pytest.mark.slow
def test_train_checkpoint_resume_and_eval(shards, tiny, tmp_path):
    config = _config(shards, tiny, tmp_path / "straight", save_total_limit=5)
    straight = train(config)
    losses = [loss for _, loss in straight["losses"]]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3  # the loss falls
    # every --save-steps, at the end of each epoch, and at the end
    per_epoch = steps_per_epoch(config, count_rows(shard_files(shards, "train").files), 1)
    assert 7 < per_epoch < 12
    assert [p.name for p in checkpoints(tmp_path / "straight")] == [f"checkpoint-{s}" for s in (6, per_epoch, 12)]
    state = json.loads((tmp_path / "straight" / "checkpoint-12" / "trainer_state.json").read_text())
    assert state["step"] == 12 and (tmp_path / "straight" / "model.safetensors").exists()

    # killed after step 7: checkpoint-6 is the newest; the resumed run goes on from step 6
    def kill(metrics):
        if metrics["step"] >= 7:
            raise Stop

    with pytest.raises(Stop):
        train(_config(shards, tiny, tmp_path / "killed", log_steps=1), report=kill)
    assert [p.name for p in checkpoints(tmp_path / "killed")] == ["checkpoint-6"]
    resumed = train(_config(shards, tiny, tmp_path / "killed", resume=True))
    assert resumed["resumed_from"] == 6
    # same batches, same optimizer and schedule state: the same losses as the uninterrupted run
    assert [s for s, _ in resumed["losses"]] == list(range(1, 13))
    assert [v for _, v in resumed["losses"]] == pytest.approx(losses, abs=1e-3)

    out = tmp_path / "eval.json"
    assert main(["-q", "eval", "--model", str(tmp_path / "killed"), "--data", str(shards), "--out", str(out), "--cpu-threads", "1"]) == 0
    result = json.loads(out.read_text())
    assert result["split"] == "test" and result["rows"] == count_rows(shard_files(shards, "test").files)
    assert result["expert_selection"]["turns"] > 0 and 0 <= result["expert_selection"]["accuracy"] <= 1
    assert sum(t["rows"] for t in result["by_task"].values()) == result["rows"]


def test_finetune_command_with_tiny_model(shards, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["-q", "finetune", "--data", str(shards), "--model", "tiny", "--out", str(out), "--max-steps", "3",
            "--batch-size", "2", "--lr", "1e-3", "--cpu-threads", "1", "--save-steps", "2"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["steps"] == 3 and printed["trainable_parameters"] > 10_000
    assert (out / "tiny-base" / "tokenizer.json").exists() and (out / "config.json").exists()
    assert [p.name for p in checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]
    # --resume after the end: nothing left to do, the model is rewritten from the last checkpoint
    assert main([*argv, "--resume"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["resumed_from"] == 3


def test_an_out_folder_with_checkpoints_goes_on_only_as_the_same_run(shards, tiny, tmp_path, capsys):
    """A run in an --out with checkpoints: without --resume it would leave the old run's
    checkpoints beside its own (the old, higher-numbered ones kept and resumed from later);
    with --resume and other settings, base model or rows it would train another run from the
    middle of this one. Both are refused, naming what differs; a longer run is the same run."""
    out = tmp_path / "run"
    argv = ["-q", "finetune", "--data", str(shards), "--model", str(tiny), "--out", str(out), "--batch-size", "2", "--lr", "1e-3",
            "--cpu-threads", "1", "--save-steps", "2"]
    assert main([*argv, "--max-steps", "2"]) == 0
    other = write_shards(tmp_path / "other", conversations=20, seed=2)
    refused = {
        "fresh": ([*argv, "--max-steps", "2"], f"--out {out} holds the checkpoints of an earlier run (the newest checkpoint-2): add "
                                               "--resume to go on from it, or choose another --out to start afresh"),
        "batch": ([*argv, "--max-steps", "4", "--resume", "--batch-size", "4"], "--batch-size 2 (now 4)"),
        "lora": ([*argv, "--max-steps", "4", "--resume", "--lora"], "with --lora off (now on):"),
        "data": ([*argv, "--max-steps", "4", "--resume", "--data", str(other)],
                 f"{count_rows(shard_files(shards, 'train').files)} train rows in --data (now {count_rows(shard_files(other, 'train').files)})"),
    }
    capsys.readouterr()
    for name, (args, said) in refused.items():
        assert main(args) == 2, name
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert said in line and (name == "fresh" or line.startswith(f"m3-curate: error: --resume: {out / 'checkpoint-2'} was written by "
                                                                    "a run with ")), line
    assert [p.name for p in checkpoints(out)] == ["checkpoint-2"]
    assert main([*argv, "--max-steps", "4", "--resume"]) == 0
    import argparse

    from curation.cli import parser
    from curation.finetune.train import RUN_SETTINGS

    commands = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    flags = {o for a in commands["finetune"]._actions for o in a.option_strings}  # the refusal names each setting as the user sets it
    assert all((name in flags) == name.startswith("--") and (name.startswith("--") or f"--{name.replace('_', '-')}" not in flags)
               for name in RUN_SETTINGS.values())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["resumed_from"] == 2


@pytest.mark.slow
def test_lora_and_gradient_checkpointing(shards, tiny, tmp_path):
    pytest.importorskip("peft")
    lora = dict(lora=True, lora_rank=4, max_steps=4, save_steps=2, gradient_checkpointing=True, log_steps=1)
    config = _config(shards, tiny, tmp_path / "lora", **lora)
    summary = train(config)
    from transformers import AutoModelForImageTextToText

    total = sum(p.numel() for p in AutoModelForImageTextToText.from_pretrained(tiny).parameters())
    assert 0 < summary["trainable_parameters"] < total / 2
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "lora" / "checkpoint-2" / "adapter_model.safetensors").exists()
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "lora")  # LoRA merged into a plain model
    assert not any("lora" in n for n, _ in merged.named_parameters())
    config.resume = True
    assert train(config)["resumed_from"] == 4  # after the end: nothing left to do

    # stopped after step 3: the adapters, optimizer and schedule come back from checkpoint-2,
    # and the run goes on with the losses of the uninterrupted one
    def stop(metrics):
        if metrics["step"] >= 3:
            raise Stop

    with pytest.raises(Stop):
        train(_config(shards, tiny, tmp_path / "stopped", **lora), report=stop)
    assert [p.name for p in checkpoints(tmp_path / "stopped")] == ["checkpoint-2"]
    resumed = train(_config(shards, tiny, tmp_path / "stopped", resume=True, **lora))
    assert resumed["resumed_from"] == 2 and [s for s, _ in resumed["losses"]] == [1, 2, 3, 4]
    assert [v for _, v in resumed["losses"]] == pytest.approx([v for _, v in summary["losses"]], abs=1e-4)


def test_prepare_names_the_missing_thing(tmp_path, shards):
    from curation.errors import CurationError

    with pytest.raises(CurationError, match="no shards"):
        prepare(TrainConfig(data=str(tmp_path), model="tiny", out=str(tmp_path / "o")))
    with pytest.raises(CurationError, match="not a model folder"):
        prepare(TrainConfig(data=str(shards), model=str(tmp_path), out=str(tmp_path / "o")))


# --- defaults for the machine ----------------------------------------------------------------


def test_the_cpus_a_process_may_use_are_capped_by_a_containers_quota(tmp_path):
    from curation.ingest.runners import LocalRunner

    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")  # no quota
    assert available_cpus(cpu_max) == len(os.sched_getaffinity(0)) and LocalRunner().workers == available_cpus()
    cpu_max.write_text("150000 100000\n")  # `docker run --cpus 1.5`
    assert available_cpus(cpu_max) == 1
    assert available_cpus(tmp_path / "absent") == len(os.sched_getaffinity(0))  # cgroup v1 or none: the affinity


def test_cpu_threads_default_to_the_idle_cpus_this_process_may_use(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert 1 <= available_cpus() <= len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert cpu_threads(None) == available_cpus()  # an idle machine: every CPU
    monkeypatch.setattr(os, "getloadavg", lambda: (float(os.cpu_count()) + 2, 0.0, 0.0))
    assert cpu_threads(None) == 1  # every core busy: one thread
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # as Ray sets it for a worker
    assert cpu_threads(None) == 3
    assert cpu_threads(5) == 5  # --cpu-threads wins


def test_progress_checkpoints_every_epoch_and_logs_the_time_left():
    progress = StepLog(start=2, steps=10, per_epoch=4, log_steps=5, save_steps=500, world_size=1)
    assert [d for d in range(3, 11) if progress.save_due(d)] == [4, 8, 10]
    assert [d for d in range(3, 11) if progress.log_due(d)] == [5, 10]
    metrics = progress.metrics(6, 1.5, 1e-3, rows=8)
    assert metrics["epoch"] == 1.5
    assert metrics["eta_s"] == metrics["elapsed_s"]  # 4 steps done since the start, 4 left
    line = progress.line({**metrics, "elapsed_s": 125.0, "eta_s": 3725.0, "rows_per_s": 2.0})
    assert line == "step 6/10 (60%) epoch 1.50 loss 1.5000 lr 1.00e-03 2.0 rows/s elapsed 0:02:05 ETA 1:02:05"


def test_a_dataset_replaced_under_a_running_fine_tune_stops_it_instead_of_mixing(tmp_path, tiny):
    """The stream comes back to each shard by path (row group by row group, epoch after
    epoch): a build that swapped in a new dataset meanwhile would feed the run the new rows
    at the old positions. It stops, naming the shard, at the first read of a replaced file."""
    from curation.errors import CurationError

    data = write_shards(tmp_path / "build", conversations=60, seed=1, rows_per_shard=20, row_group_size=4)
    train_files = shard_files(data, "train").files

    def rebuild(metrics):
        if metrics["step"] == 1:
            for f in train_files:  # the same rows, written again: another file at the same path
                pq.write_table(pq.read_table(f), f, row_group_size=4)

    with pytest.raises(CurationError, match=r"part-\d+\.parquet: replaced since this command started"):
        train(_config(data, tiny, tmp_path / "run", max_steps=12, log_steps=1, shuffle_buffer=4, batch_size=2), report=rebuild)
