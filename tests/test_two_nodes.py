"""A build on a two-node Ray cluster: two `ray start` processes on this machine with their own
resources (a head and a worker, 2 CPUs each, one temp folder of their own so no other Ray on
the machine sees them), the build run with `--address` from outside the cluster, as the
README's cluster recipe does. Two experts have weights and run in the expert hosts (two on
this cluster, one locally), two in pools of two actors: both nodes must have run experts, and
the shards must be byte-identical to those of a build on an embedded local Ray. Ray Data
spreads actors over the nodes on a best-effort basis (SPREAD), and an actor that starts first
may take every item of its kind in so small an archive, so the test asks neither the hosts nor
the pools alone to have run on both nodes (the pools alone did not, in 2 of about 10 runs). The head has token authentication, Ray's default: a build from a
shell that sends no token, or a wrong one, is refused first, in one line that says how to send it.

Inputs, the output folder and the cache are paths on this machine's file system, which both
"nodes" see at the same paths, as shared storage mounted at one path on every node would be.
The last test runs the worker node in a mount namespace of its own, with an empty folder over
the archive and `--out` (a node that mounts no shared storage there), or with them read-only:
the build must stop before its first item, naming that node and what it lacks.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml
from build_helpers import demo_manifest
from test_ray_job import free_ports, stop_head

from curation.demo import write_demo_archive

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
BIN = Path(sys.executable).parent
HOSTED = ("VISTA3D", "CXR")


def start_node(temp_dir: str, env: dict[str, str], *, head: bool, gcs: int, cpus: int, mounts: str = "") -> None:
    """`ray start` for the head (`head`) or a worker joining it, every port its own. `mounts`:
    the node runs in a mount namespace of its own, after this shell command there (a folder
    hidden or made read-only for that node alone)."""
    ports = iter(free_ports(8))
    common = [f"--num-cpus={cpus}", f"--temp-dir={temp_dir}", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
              f"--node-manager-port={next(ports)}", f"--object-manager-port={next(ports)}",
              f"--dashboard-agent-listen-port={next(ports)}", f"--dashboard-agent-grpc-port={next(ports)}",
              f"--metrics-export-port={next(ports)}", f"--runtime-env-agent-port={next(ports)}",
              "--object-store-memory=200000000"]
    role = (["--head", f"--port={gcs}", "--include-dashboard=false", f"--ray-client-server-port={next(ports)}"] if head
            else [f"--address=127.0.0.1:{gcs}"])
    wrap = ["unshare", "--mount", "sh", "-c", f"{mounts} && exec \"$0\" \"$@\""] if mounts else []
    subprocess.run([*wrap, str(BIN / "ray"), "start", *role, *common], env=env, check=True, capture_output=True, timeout=180)


def shard_bytes(out: Path) -> dict[str, bytes]:
    data = out / "dataset" / "data"
    return {p.relative_to(data).as_posix(): p.read_bytes() for p in sorted(data.glob("*/part-*.parquet"))}


def test_a_build_on_two_nodes_uses_both_and_writes_the_shards_of_a_local_build(tmp_path):
    archive = tmp_path / "archive"
    write_demo_archive(archive, cases=2, seed=0)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]), "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    nodes_log = tmp_path / "nodes.log"
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "model.bin").write_bytes(b"not a model: the runner reads the ground truth")
    manifests = {}
    for name in ("local", "cluster"):
        data = demo_manifest(archive, tmp_path / name, counting=True)
        for e in data["experts"]:
            if e["name"] in HOSTED:  # weights and no `actors`: the expert hosts
                e.update(runner="build_helpers:WeightedLabelsRunner", bundle=str(weights))
            else:  # a pool of two actors each: room for both nodes
                e["actors"] = 2
        manifests[name] = tmp_path / f"{name}.yaml"
        manifests[name].write_text(yaml.safe_dump(data, sort_keys=False))

    local = subprocess.run([sys.executable, "-m", "curation", "-q", "build", str(manifests["local"])], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
    assert local.returncode == 0, local.stderr[-3000:]

    (gcs,) = free_ports(1)
    temp_dir = tempfile.mkdtemp(prefix="rn", dir="/tmp")  # short: Ray's socket paths must stay under 107 characters
    try:
        start_node(temp_dir, {**env, "M3_TEST_NODE_LOG": str(nodes_log)}, head=True, gcs=gcs, cpus=2)
        start_node(temp_dir, {**env, "M3_TEST_NODE_LOG": str(nodes_log)}, head=False, gcs=gcs, cpus=2)
        without_token = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}  # Ray would wait 20 s, then a bare ConnectionError
        refused = subprocess.run([sys.executable, "-m", "curation", "build", str(manifests["cluster"]), "--address", f"127.0.0.1:{gcs}"],
                                 cwd=REPO, env=without_token, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and f"the Ray cluster at 127.0.0.1:{gcs} uses token authentication: set RAY_AUTH_MODE=token" \
            in refused.stderr, refused.stderr[-3000:]
        for token, said in ({"RAY_AUTH_TOKEN": "not-the-heads"}, "refused this shell's token"), ({"HOME": str(tmp_path)}, "no token to send"):
            asked = subprocess.run([sys.executable, "-c", f"from curation.ray_address import check_head; check_head('127.0.0.1:{gcs}')"],
                                   cwd=REPO, env={**env, **token}, capture_output=True, text=True, timeout=120)
            assert asked.returncode != 0 and said in asked.stderr, asked.stderr[-3000:]
        built = subprocess.run([sys.executable, "-m", "curation", "-q", "build", str(manifests["cluster"]),
                                "--address", f"127.0.0.1:{gcs}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    finally:
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)

    nodes: dict[str, set[str]] = {"hosts": set(), "pools": set()}
    for line in nodes_log.read_text().splitlines():
        node, expert = line.split()
        nodes["hosts" if expert in HOSTED else "pools"].add(node)
    assert len(nodes["pools"] | nodes["hosts"]) == 2 and nodes["pools"] and nodes["hosts"], f"runs by node: {nodes}"
    cluster, local_shards = shard_bytes(tmp_path / "cluster"), shard_bytes(tmp_path / "local")
    assert cluster and cluster == local_shards
    cards = {name: json.loads((tmp_path / name / "dataset" / "dataset_card.json").read_text()) for name in ("local", "cluster")}
    assert cards["cluster"]["counts"]["rows"]["total"] == cards["local"]["counts"]["rows"]["total"]
    hosts = {name: {e["actors"] for n, e in card["experts"].items() if n in HOSTED} for name, card in cards.items()}
    assert hosts == {"local": {1}, "cluster": {2}}


def skip_without_mount_namespace(mounts: str) -> None:
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", mounts], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"a node that sees other folders needs a mount namespace (unshare --mount, mount): {probe.stderr.strip()}")


HIDDEN = "mount -t tmpfs none {folder}"  # an empty folder over it: the node mounts no shared storage there
READ_ONLY = "mount --bind {folder} {folder} && mount -o remount,bind,ro {folder}"  # it sees the files, and cannot write


@pytest.mark.parametrize("mounts, lacks", [
    (HIDDEN, ["sources[0].root (ct): not found: {folder}/archive/ct/",
              "output.dir (this build's folder under it): not found: {folder}/out/internal/plan/progress-"]),
    (READ_ONLY, ["output.dir (this build's folder under it): cannot write in {folder}/out/internal/plan/progress-",
                 "(Read-only file system)"]),
], ids=["hidden", "read-only"])
def test_a_node_that_lacks_the_archive_or_cannot_write_out_is_named_before_the_build_begins(tmp_path, mounts, lacks):
    """The worker node sees an empty folder where the driver's machine has the archive and
    `--out` (a node that mounts no shared storage there), or sees them read-only: the build
    stops before its first item, naming that node and what it lacks."""
    skip_without_mount_namespace(mounts.format(folder=tmp_path))
    archive = tmp_path / "archive"
    write_demo_archive(archive, cases=1, seed=0)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump(demo_manifest(archive, tmp_path / "out"), sort_keys=False))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    (gcs,) = free_ports(1)
    temp_dir = tempfile.mkdtemp(prefix="rn", dir="/tmp")
    try:
        start_node(temp_dir, env, head=True, gcs=gcs, cpus=2)
        start_node(temp_dir, env, head=False, gcs=gcs, cpus=2, mounts=mounts.format(folder=tmp_path))
        built = subprocess.run([sys.executable, "-m", "curation", "build", str(manifest), "--address", f"127.0.0.1:{gcs}"],
                               cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    finally:
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert built.returncode == 2, built.stdout[-3000:] + built.stderr[-3000:]
    error = built.stderr.strip().splitlines()[-1]
    assert re.match(r"m3-curate: error: node \S+ \([0-9a-f]{8}\) lacks ", error) and "Traceback" not in built.stderr, \
        built.stderr[-3000:]
    assert error.count(" lacks ") == 1  # the worker; the head is the driver's own node
    for what in lacks:
        assert what.format(folder=tmp_path) in error, error
    assert error.endswith("Every node must mount the archive and the bundles, and --out and the cache writable, at the same "
                          "paths as the driver's machine (README: On a cluster)")
    assert not (tmp_path / "out" / "dataset").exists()


def hosted_build(tmp_path: Path, cases: int) -> tuple[Path, Path, Path]:
    """(archive, out, manifest): the demo archive of `cases` cases, with every expert but CT
    tissue given weights and no `actors`, so in the expert host, counting its runs."""
    archive, out = tmp_path / "archive", tmp_path / "out"
    write_demo_archive(archive, cases=cases, seed=0)
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "model.bin").write_bytes(b"not a model: the runner reads the ground truth")
    data = demo_manifest(archive, out, counting=True)
    for e in data["experts"]:
        if e["name"] != "CT_TISSUE":
            e.pop("actors", None)
            e.update(runner="build_helpers:WeightedLabelsRunner", bundle=str(weights))
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump(data, sort_keys=False))
    return archive, out, manifest


def test_a_node_that_joins_mid_build_without_the_archive_stops_the_build_naming_it(tmp_path, monkeypatch):
    """The build starts on the head alone; while its experts run, a worker node joins that
    sees an empty folder where the archive and `--out` are (an autoscaler's node without the
    shared mount). Each expert run waits at a gate, so the build is still running however
    slowly the node starts. The build stops, naming that node and what it lacks; run again
    once the node is gone, it finishes. The build runs in this process, so that the watch
    looks every second. The node has no CPU, so it gets no task of the build, only the watch's
    question. (One with CPUs may get a load task first, which stops the build naming the node
    too: `stages.read_blocks`, tested in test_build_parts.)"""
    from curation.build import node_watch
    from curation.build.pipeline import build
    from curation.errors import CurationError

    skip_without_mount_namespace(HIDDEN.format(folder=tmp_path))
    archive, out, manifest = hosted_build(tmp_path, cases=1)
    run_log, gate = tmp_path / "runs.log", Path(tempfile.mkdtemp(prefix="gate", dir="/tmp")) / "open"  # the gate outside what the node hides
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "token",
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]), "M3_TEST_RUN_LOG": str(run_log), "M3_TEST_RUN_GATE": str(gate)}
    env.pop("RAY_ADDRESS", None)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(node_watch, "EVERY_S", 1.0)
    (gcs,) = free_ports(1)
    head_dir, worker_dir = (tempfile.mkdtemp(prefix=p, dir="/tmp") for p in ("rh", "rw"))

    def join_without_the_archive() -> None:
        deadline = time.monotonic() + 300
        while not run_log.exists() and time.monotonic() < deadline:  # the experts are at work
            time.sleep(0.2)
        start_node(worker_dir, env, head=False, gcs=gcs, cpus=0, mounts=HIDDEN.format(folder=tmp_path))

    try:
        start_node(head_dir, env, head=True, gcs=gcs, cpus=2)
        joiner = threading.Thread(target=join_without_the_archive, daemon=True)
        joiner.start()
        with pytest.raises(CurationError) as stopped:
            build(manifest, address=f"127.0.0.1:{gcs}", progress=False)
        joiner.join()
        stop_head(worker_dir)
        gate.touch()
        finished = build(manifest, address=f"127.0.0.1:{gcs}", progress=False)  # the head alone again
    finally:
        gate.touch()
        stop_head(worker_dir)
        stop_head(head_dir)
        for folder in (head_dir, worker_dir, gate.parent):
            shutil.rmtree(folder, ignore_errors=True)
    message = str(stopped.value)
    assert re.match(rf"node \S+ \([0-9a-f]{{8}}\) joined the Ray cluster at \d\d:\d\d:\d\d and lacks sources\[0\]\.root "
                    rf"\(ct\): not found: {re.escape(str(archive))}/ct/", message), message
    assert f"output.dir (this build's folder under it): not found: {out}/internal/plan/progress-" in message
    assert message.endswith("(README: On a cluster). What finished is cached: run the same command again once that node has "
                            "them, or without it"), message
    card = json.loads((out / "dataset" / "dataset_card.json").read_text())
    assert card["counts"]["rows"]["total"] == finished.card["counts"]["rows"]["total"] > 0
    assert not list((out / "internal" / "cache").glob(".node-check-*"))  # no mark left (the cache is under --out: none made)


def test_a_build_whose_head_is_lost_stops_naming_it_before_ray_ends_the_driver(tmp_path):
    """The head's processes are killed (its machine lost) while the experts work. Ray's calls
    wait for it, and a minute later Ray would end the driver with a line of its own and status
    1; the build stops first, with its own line and status 2, once the head has not answered
    for the watch's time (shortened here, in the command's process: a driver that lost its head
    is ended by Ray a minute later whatever it does meanwhile, so the build cannot run in this
    one)."""
    import psutil

    _, _, manifest = hosted_build(tmp_path, cases=2)
    run_log = tmp_path / "runs.log"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "token",
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]), "M3_TEST_RUN_LOG": str(run_log), "M3_TEST_RUN_SLEEP": "1.0"}
    env.pop("RAY_ADDRESS", None)
    (gcs,) = free_ports(1)
    head_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    code = ("import sys; from curation import cli; from curation.build import node_watch; "
            "node_watch.EVERY_S, node_watch.HEAD_S = 1.0, 5.0; "
            f"sys.argv = ['m3-curate', '-q', 'build', {str(manifest)!r}, '--address', '127.0.0.1:{gcs}']; cli.run()")
    try:
        start_node(head_dir, env, head=True, gcs=gcs, cpus=2)
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        deadline = time.monotonic() + 300
        while (not run_log.exists() or len(run_log.read_text().splitlines()) < 3) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "the build ended before its head was lost"
        head = [p for p in psutil.process_iter(["cmdline"]) if any(head_dir in a for a in (p.info["cmdline"] or []))]
        for p in {q.pid: q for h in head for q in [h, *h.children(recursive=True)]}.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        lost = time.monotonic()
        _, stderr = proc.communicate(timeout=120)
        ended = time.monotonic()
    finally:
        stop_head(head_dir)
        shutil.rmtree(head_dir, ignore_errors=True)
    said = [line for line in stderr.splitlines() if line.startswith("m3-curate")]
    assert proc.returncode == 2 and len(said) == 1, stderr[-3000:]
    assert re.fullmatch(r"m3-curate: error: the Ray cluster's head \(\S+:\d+\) has not answered since \d\d:\d\d:\d\d "
                        r"\(0:0\d\): the build cannot go on without it\. What finished is cached: once the head is back, run "
                        r"the same command again", said[0]), said[0]
    assert ended - lost < 50, f"ended {ended - lost:.0f} s after the loss: Ray ends the driver at 60 s"


def test_a_build_that_a_lost_node_leaves_stuck_stops_naming_it_and_the_next_run_finishes(tmp_path, monkeypatch):
    """The worker node (3 CPUs) dies while the experts work. The build's one expert host
    reserved 2 of its CPUs, and the head has 1: Ray cannot restart the host anywhere and waits
    for the node without end (on the demo-24 archive with a node of 2 CPUs each, the restarted
    host took the head's last CPU from the load tasks, with the same end). The build stops once
    it has not moved for the watch's time, naming the node; run again on the head alone, it
    finishes from what was cached. The build runs in this process, so that the watch's times can
    be shortened."""
    import ctypes

    from curation.build import node_watch
    from curation.build.pipeline import build
    from curation.errors import CurationError

    archive, out, manifest = hosted_build(tmp_path, cases=3)
    run_log, run_sleep = tmp_path / "runs.log", tmp_path / "run-sleep"
    run_sleep.write_text("1.0")  # slow while the node is lost; the rerun at full speed
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "token",
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]), "M3_TEST_RUN_LOG": str(run_log),
           "M3_TEST_RUN_SLEEP": str(run_sleep)}
    env.pop("RAY_ADDRESS", None)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(node_watch, "EVERY_S", 1.0)
    monkeypatch.setattr(node_watch, "STALL_S", 10.0)
    monkeypatch.setattr(node_watch, "PAUSES", 1)
    (gcs,) = free_ports(1)
    head_dir, worker_dir = (tempfile.mkdtemp(prefix=p, dir="/tmp") for p in ("rh", "rw"))

    ended = threading.Event()

    def lose_the_worker() -> None:
        deadline = time.monotonic() + 300
        while (not run_log.exists() or len(run_log.read_text().splitlines()) < 3) and time.monotonic() < deadline:
            time.sleep(0.2)
        stop_head(worker_dir)
        if not ended.wait(240):  # the build waits without end: fail the test rather than hang the suite
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(threading.main_thread().ident), ctypes.py_object(TimeoutError))

    try:
        start_node(head_dir, env, head=True, gcs=gcs, cpus=1)
        start_node(worker_dir, env, head=False, gcs=gcs, cpus=3)
        killer = threading.Thread(target=lose_the_worker, daemon=True)
        killer.start()
        try:
            with pytest.raises(CurationError) as stopped:
                build(manifest, address=f"127.0.0.1:{gcs}", progress=False)
        finally:
            ended.set()
        killer.join()
        runs_before = len(run_log.read_text().splitlines())
        run_sleep.write_text("0")
        finished = build(manifest, address=f"127.0.0.1:{gcs}", progress=False)  # the head alone now
    finally:
        stop_head(worker_dir)
        stop_head(head_dir)
        for folder in (head_dir, worker_dir):
            shutil.rmtree(folder, ignore_errors=True)
    message = str(stopped.value)
    assert re.match(r"node \S+ \([0-9a-f]{8}\) left the Ray cluster at \d\d:\d\d:\d\d, and the build has not moved since", message), message
    assert message.endswith("run the same command again, and it plans for the nodes the cluster has then")
    card = json.loads((out / "dataset" / "dataset_card.json").read_text())
    assert card["counts"]["rows"]["total"] == finished.card["counts"]["rows"]["total"] > 0
    assert sum(e["cached"] for e in card["experts"].values()) > 0 and runs_before >= 3  # what ran before the loss was kept
