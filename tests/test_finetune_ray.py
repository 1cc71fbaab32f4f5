"""`m3-curate finetune --workers 2`: the same loop on two Ray Train workers (CPU, Gloo DDP),
each streaming its own row groups; rank 0 writes checkpoints and the model, and a resumed
run on Ray continues from the newest checkpoint (the killed-worker test runs both). More
workers than the cluster can place are refused before Ray Train waits for them; Ctrl-C and
SIGTERM end a run in one line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from curation.finetune.train import checkpoints
from shards_factory import write_shards

pytestmark = [pytest.mark.slow, pytest.mark.ray]
REPO = Path(__file__).resolve().parents[1]


def test_more_workers_than_the_cluster_can_place_are_refused_at_once(tmp_path):
    """Ray Train would wait for them without end: it gives up starting the group after a
    minute and starts again. The local Ray started for the run has this machine's CPUs."""
    data = write_shards(tmp_path / "build", conversations=6)
    workers = (os.cpu_count() or 1) + 1
    run = subprocess.run([sys.executable, "-m", "curation", "-q", "finetune", "--data", str(data), "--model", "tiny",
                          "--out", str(tmp_path / "run"), "--workers", str(workers), "--max-steps", "1"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-3000:]
    assert (f"--workers {workers}: each Ray Train worker takes one CPU and the Ray cluster has {workers - 1}: "
            f"give --workers {workers - 1} or fewer, or add nodes") in run.stderr
    assert not (tmp_path / "run" / "ray").exists()  # no Ray Train run began


@pytest.mark.parametrize("workers, use_gpu, resources, message", [
    (2, False, {"CPU": 2.0}, None),
    (4, True, {"CPU": 2.0, "GPU": 4.0}, None),  # a GPU worker reserves no CPU
    (3, True, {"CPU": 64.0, "GPU": 2.0}, "--workers 3 --use-gpu: each Ray Train worker takes one GPU and the Ray cluster has 2: "
                                         "give --workers 2 or fewer"),
    (1, True, {"CPU": 64.0}, "--workers 1 --use-gpu: each Ray Train worker takes one GPU and the Ray cluster has 0: drop --use-gpu"),
])
def test_the_room_for_workers_is_what_scaling_config_reserves_for_each(workers, use_gpu, resources, message):
    from curation.errors import CurationError
    from curation.finetune.ray_train import check_room

    if message is None:
        check_room(workers, use_gpu, resources)
    else:
        with pytest.raises(CurationError, match=re.escape(message)):
            check_room(workers, use_gpu, resources)


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_stopping_training_on_ray_ends_in_one_line_with_every_ray_process_gone(tmp_path, how):
    """Ctrl-C at the terminal (SIGINT to the whole process group) or a scheduler's SIGTERM while
    two Ray Train workers train: status 130 or 143 and one line, as for a build
    (`curation.signals`). Ray Train's `fit` puts a SIGINT handler of its own in place (Ctrl-C
    ended the command with status 1 after Ray's log line) and turns SIGTERM's interrupt into
    a `KeyboardInterrupt` of its own (without the command's handler, Ray printed its crash
    report)."""
    import signal
    import time

    import psutil

    data = write_shards(tmp_path / "build", conversations=40, seed=4, rows_per_shard=10, row_group_size=5)
    log = tmp_path / "finetune.log"
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "curation", "finetune", "--data", str(data), "--model", "tiny",
                                 "--out", str(tmp_path / "run"), "--workers", "2", "--epochs", "1000", "--log-steps", "1"],
                                cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True, text=True)
        deadline = time.monotonic() + 240
        while not re.search(r"step \d+/", log.read_text()) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert proc.poll() is None, log.read_text()[-3000:]
        family = psutil.Process(proc.pid).children(recursive=True)
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            for p in [proc, *family]:
                p.kill()
            raise AssertionError(f"finetune did not end within 60 s of {how}") from None
    text = log.read_text()
    status, said = {"ctrl-c": (130, "m3-curate: interrupted"), "sigterm": (143, "m3-curate: terminated (SIGTERM)")}[how]
    assert proc.returncode == status, text[-3000:]
    assert text.rstrip().splitlines()[-1] == said, text[-3000:]
    assert not any(l.startswith("Traceback") for l in text.splitlines()) and "SIGTERM received" not in text, text[-3000:]
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f"left running: {[p.name() for p in alive]}"


def test_a_ray_train_worker_killed_mid_training_is_one_line_and_resume_goes_on(tmp_path):
    """One of two workers' processes dies (the OOM killer, a crash; on a cluster its node lost,
    the same error), and the other fails in its next collective for want of it: one line that
    says which was lost, that the other stopped with it, and where the newest checkpoint is,
    not Ray Train's `WorkerGroupError` traceback with both ranks' errors; `--resume` on two
    workers goes on from that checkpoint."""
    import time

    import psutil

    data = write_shards(tmp_path / "build", conversations=40, seed=4, rows_per_shard=10, row_group_size=5)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "curation", "-q", "finetune", "--data", str(data), "--model", "tiny", "--out", str(out),
               "--workers", "2", "--save-steps", "3"]
    log = tmp_path / "finetune.log"
    with log.open("w") as sink:
        proc = subprocess.Popen([*command, "--epochs", "1000"], cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 240
        while not checkpoints(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None and checkpoints(out), log.read_text()[-3000:]
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "RayTrainWorker" in p.name()]
        assert len(workers) == 2, [p.name() for p in psutil.Process(proc.pid).children(recursive=True)]
        workers[1].kill()
        proc.wait(timeout=120)
    text = log.read_text()
    assert proc.returncode == 2, text[-3000:]
    line = text.strip().splitlines()[-1]
    said = re.match(r"m3-curate: error: --workers 2: Ray Train's worker (\d) was lost \(killed, out of memory, a crash, or its "
                    r"node gone\): The actor is dead because its worker process has died\b.*; worker (\d) stopped with it \(a "
                    r"training step needs every worker\)\. The newest checkpoint is (\S+): the same command with --resume goes on "
                    r"from it$", line)
    assert said and {said.group(1), said.group(2)} == {"0", "1"}, line
    assert not any(l.startswith("Traceback") for l in text.splitlines()), text[-3000:]  # Ray's actors' own logs are prefixed
    step = int(said.group(3).rsplit("-", 1)[1])

    # the run on two workers goes on: rank 0 writes the checkpoints, the model and the summary the command prints
    resumed = subprocess.run([*command, "--resume", "--max-steps", str(step + 2), "--log-steps", "1"], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["steps"] == summary["steps"] == step + 2
    assert summary["resumed_from"] == step and [s for s, _ in summary["losses"]] == list(range(1, step + 3))
    state = json.loads((checkpoints(out)[-1] / "trainer_state.json").read_text())
    assert checkpoints(out)[-1].name == f"checkpoint-{step + 2}" and state["world_size"] == 2 and state["step"] == step + 2
    assert (out / "model.safetensors").exists()
