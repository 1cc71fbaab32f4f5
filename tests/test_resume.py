"""A build killed with SIGKILL while its experts work, run again: it finishes, runs no expert a
second time for an item whose findings were cached, and writes no duplicate row."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from build_helpers import demo_manifest

from curation.store.cache import content_hash
from curation.demo import write_demo_archive
from curation.ingest.index import build_index
from curation.ingest import readers_for
from curation.manifest import load_manifest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the build and every process it started (its local Ray), as a crash would."""
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    proc.send_signal(signal.SIGKILL)
    for p in family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(family, timeout=30)


def cached_runs(cache: Path, content_to_item: dict[str, str], args: list[str]) -> set[tuple[str, str]]:
    """(item_id, argument) of every findings entry in the cache."""
    by_hash = {hashlib.sha256(a.encode()).hexdigest()[:8]: a for a in args}
    out = set()
    for path in cache.glob("*/*/*.json"):
        if path.name.endswith((".error.json", ".running.json")):  # failures; runs in progress when killed
            continue
        content, arg = path.stem.rsplit("-", 1)
        out.add((content_to_item[content], by_hash[arg]))
    return out


def runs(log: Path) -> list[tuple[str, str]]:
    if not log.exists():
        return []
    return [tuple(line.split(" ", 1)) for line in log.read_text().splitlines()]  # type: ignore[misc]


def counting_build(tmp_path: Path) -> tuple[Path, Path, list[str], dict[str, str]]:
    """A two-case demo build whose runners log each run (`M3_TEST_RUN_LOG`): its manifest,
    output folder, command and environment."""
    archive, out = tmp_path / "archive", tmp_path / "out"
    write_demo_archive(archive, cases=2, seed=0)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump(demo_manifest(archive, out, counting=True)))
    command = [sys.executable, "-m", "curation", "-q", "build", str(manifest)]
    return manifest, out, command, {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}


def test_killed_build_resumes_without_rerunning_cached_experts(tmp_path):
    manifest, out, command, env = counting_build(tmp_path)
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"

    proc = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**env, "M3_TEST_RUN_LOG": str(first_log), "M3_TEST_RUN_SLEEP": "0.5"})
    deadline = time.monotonic() + 180
    while len(runs(first_log)) < 6 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, f"the build ended before it could be killed:\n{proc.stdout.read().decode()[-3000:]}"  # type: ignore[union-attr]
    kill_tree(proc)
    assert not (out / "dataset" / "dataset_card.json").exists()

    spec = load_manifest(manifest)
    readers = readers_for(spec)
    items = build_index(spec).items
    content_to_item = {content_hash(i, readers[i.source].root): i.item_id for i in items}
    all_args = ["", "everything", "organs"]
    at_kill = cached_runs(out / "internal" / "cache", content_to_item, all_args)
    assert 0 < len(at_kill) < 24, "the kill should land while experts are busy"

    done = subprocess.run(command, check=False, cwd=REPO, env={**env, "M3_TEST_RUN_LOG": str(second_log)}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    second = runs(second_log)
    assert max(Counter(second).values()) == 1, "an expert ran twice on one item and argument"
    assert not set(second) & at_kill, "an expert ran again on an item whose findings were cached"
    assert set(second) | at_kill == cached_runs(out / "internal" / "cache", content_to_item, all_args)

    card = json.loads((out / "dataset" / "dataset_card.json").read_text())
    table = pa.concat_tables([pq.read_table(f) for f in sorted((out / "dataset" / "data").glob("*/part-*.parquet"))])
    ids = table["id"].to_pylist()
    assert len(ids) == len(set(ids)) == card["counts"]["rows"]["total"]
    assert card["counts"]["rows"]["planned"] == len(ids) + sum(card["counts"]["set_aside"].values())
    # what was set aside was the templates' own choice, never a missing or failed expert result
    assert all(reason.startswith("skipped: template") for reason in card["counts"]["set_aside"])
    assert sum(e["cached"] for e in card["experts"].values()) == len(at_kill)
    assert sum(e["runs"] for e in card["experts"].values()) == len(second)
    assert not list((out / "dataset" / "data").rglob("*.tmp"))
    assert not list((out / "internal" / "cache").rglob("*.running.json")), "a finished build leaves no run marked in progress"


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_a_stopped_build_ends_in_one_line_with_every_ray_process_gone_and_resumes(tmp_path, how):
    """Ctrl-C (SIGINT to the terminal's process group) and a scheduler's SIGTERM to the build
    (`kill`, Kubernetes, `ray job stop`) while experts work: the build stops within seconds with
    one line and the shell's status for that signal, no Ray crash report and no traceback,
    every process of its local Ray ended and no scratch left; run again, it finishes. Before,
    SIGTERM printed Ray's `*** SIGTERM received … PC: @` report and ended with status 15."""
    import psutil

    _, out, command, env = counting_build(tmp_path)
    run_log = tmp_path / "runs.log"
    proc = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**env, "M3_TEST_RUN_LOG": str(run_log), "M3_TEST_RUN_SLEEP": "0.5"})
    deadline = time.monotonic() + 180
    while len(runs(run_log)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, f"the build ended before the signal:\n{proc.stderr.read()[-3000:]}"  # type: ignore[union-attr]
    family = psutil.Process(proc.pid).children(recursive=True)
    assert any("raylet" in p.name() for p in family), "the build's local Ray should be running"
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise AssertionError(f"the build did not end within 60 s of {how}")
    status, line = (130, "m3-curate: interrupted") if how == "ctrl-c" else (143, "m3-curate: terminated (SIGTERM)")
    assert proc.returncode == status, stderr[-3000:]
    assert stderr.rstrip().splitlines()[-1] == line, stderr[-3000:]
    assert "Traceback" not in stderr and "SIGTERM received" not in stderr, stderr[-3000:]
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f"left running after {how}: {[p.name() for p in alive]}"
    assert not (out / "internal" / "plan").exists() and not (out / "dataset" / "dataset_card.json").exists()

    done = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    card = json.loads((out / "dataset" / "dataset_card.json").read_text())
    assert sum(e["cached"] for e in card["experts"].values()) >= len(runs(run_log)) - 2  # what finished before the signal was kept


@pytest.mark.parametrize("pool", [True, False], ids=["actor pool", "in load tasks"])
def test_an_item_that_kills_its_expert_is_set_aside_and_the_build_finishes(tmp_path, monkeypatch, pool):
    """The expert's process dies on one chest X-ray (as on an out-of-memory kill): Ray restarts
    the worker and retries; the item is set aside with the reason, everything else is built."""
    from curation.build.pipeline import build

    archive, out = tmp_path / "archive", tmp_path / "out"
    write_demo_archive(archive, cases=2, seed=0)
    data = demo_manifest(archive, out)
    cxr = next(e for e in data["experts"] if e["name"] == "CXR")
    cxr["runner"] = "build_helpers:CrashingLabelsRunner"
    if pool:
        cxr["actors"] = 1
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("M3_TEST_CRASH_ON", "cxr_0002")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(REPO)]))
    result = build(manifest, progress=False)

    ledger = pq.read_table(out / "internal" / "ledger.parquet").to_pylist()
    crashed = [r for r in ledger if "process died" in (r.get("reason") or "")]
    assert crashed and all("cxr_0002" in r["uri"] for r in crashed), crashed
    assert all(r["status"] == "quarantined" for r in crashed)
    counts = result.card["counts"]
    assert counts["rows"]["total"] > 0 and counts["items"]["used"] > 0
    assert not list((out / "internal" / "cache").rglob("*.running.json"))
