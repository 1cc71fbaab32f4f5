"""The cluster recipe on one machine: `ray start --head` on 127.0.0.1, the build submitted with
the `ray job submit` CLI (token authentication on, `RAY_AUTH_MODE=token` for the submit),
shards checked, the head stopped.

The head is stopped by ending the processes of this head only (found by its own temp folder),
not with `ray stop`, which would also stop any other Ray on the machine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from build_helpers import demo_manifest

from curation.demo import write_demo_archive

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def stop_head(temp_dir: str) -> None:
    """End every process of the head whose temp folder is `temp_dir`, and their children: those
    still there 3 s after SIGTERM are killed (the GCS server and the autoscaler's monitor do not
    end on SIGTERM within 20 s, and the folder is the test's own)."""
    import psutil

    roots = []
    for p in psutil.process_iter(["cmdline"]):
        if any(temp_dir in arg for arg in (p.info["cmdline"] or [])):
            roots.append(p)
    family = {p.pid: p for r in roots for p in [r, *r.children(recursive=True)] if p.pid != os.getpid()}
    for p in family.values():
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(family.values()), timeout=3)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def test_ray_job_submit_runs_the_build(tmp_path):
    pytest.importorskip("aiohttp", reason="`ray start --head` serves the jobs API from the dashboard: install ray[default]")
    archive, out = tmp_path / "archive", tmp_path / "out"
    write_demo_archive(archive, cases=2, seed=0)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump(demo_manifest(archive, out)))

    gcs, dashboard, client, agent_http, agent_grpc, metrics, runtime_env = free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must stay under 107 characters
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    try:
        subprocess.run(
            [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=4",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
             f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
             f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
             f"--runtime-env-agent-port={runtime_env}", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
            env=env, check=True, capture_output=True, timeout=180,
        )
        submit = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", str(REPO),
             "--runtime-env-json", json.dumps({"excludes": [".mypy_cache", ".pytest_cache"]}),
             "--", "python", "-m", "curation", "build", str(manifest), "--out", str(out)],
            env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=600, check=False,
        )
        log = submit.stdout[-4000:] + submit.stderr[-4000:]
        assert submit.returncode == 0, log
        assert "succeeded" in submit.stdout.lower(), log
    finally:
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)

    card = json.loads((out / "dataset" / "dataset_card.json").read_text())
    shards = sorted((out / "dataset" / "data").glob("*/part-*.parquet"))
    assert shards and sum(pq.read_metadata(f).num_rows for f in shards) == card["counts"]["rows"]["total"] > 0
    assert card["counts"]["files"]["discovered"] == sum(card["counts"]["files"][s] for s in ("used", "skipped", "quarantined"))
    assert f"shards under {out}/dataset/data" in submit.stdout  # the closing summary reached the job's log
