"""A Ray address that leads to no Ray head is refused at once, saying what to do, by every
command that takes one (build, finetune --workers): Ray itself waits without end where nothing
listens, and minutes where something else answers. The head with token authentication that
this shell sends no token to is in `test_two_nodes.py`, which starts a real one."""

from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from build_helpers import demo_manifest
from test_ray_job import free_ports

from curation.demo import write_demo_archive
from curation.errors import CurationError
from curation.ray_address import cluster_address

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def http_server() -> Iterator[int]:
    """An HTTP/1 server (as the dashboard is), on a port of its own."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def grpc_server() -> Iterator[int]:
    """A gRPC server that is not Ray's GCS: it has no service at all."""
    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(None)


@contextmanager
def silent_listener() -> Iterator[int]:
    """Accepts connections (the kernel does) and never says a word."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


def test_an_address_where_nothing_listens_is_refused_at_once_with_the_command_that_starts_a_head(monkeypatch):
    (port,) = free_ports(1)
    with pytest.raises(CurationError, match=rf"no Ray cluster answers at 127.0.0.1:{port} \(Connection refused\): "
                                            rf"start its head there with `ray start --head --port={port}`"):
        cluster_address(f"127.0.0.1:{port}")
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")  # the same for the address of the environment
    with pytest.raises(CurationError, match=f"no Ray cluster answers at 127.0.0.1:{port}"):
        cluster_address(None)


@pytest.mark.parametrize("server", [http_server, grpc_server], ids=["http (a dashboard)", "grpc (another service)"])
def test_an_address_where_something_else_answers_is_refused_naming_the_gcs_port(server):
    with server() as port, pytest.raises(CurationError, match=rf"127.0.0.1:{port} answers, but not as a Ray head's GCS "
                                                             r"\(gRPC: \w+\): give `--address` the GCS port"):
        cluster_address(f"127.0.0.1:{port}")


def test_an_address_that_accepts_and_never_answers_is_refused_after_the_deadline():
    from curation.ray_address import check_head

    with silent_listener() as port, pytest.raises(CurationError, match=r"answers, but not as a Ray head's GCS \(no answer within 0.5 s\)"):
        check_head(f"127.0.0.1:{port}", answer_s=0.5)


@pytest.mark.parametrize("address, message", [
    ("127.0.0.1", r"Ray address '127.0.0.1': expected HOST:PORT"),
    ("head:ray", r"Ray address 'head:ray': expected HOST:PORT"),
    ("http://head:8265", r"is the dashboard \(jobs API\) address: submit with `ray job submit --address http://head:8265"),
])
def test_an_address_of_the_wrong_form_is_refused_with_the_form_it_takes(address, message):
    with pytest.raises(CurationError, match=message):
        cluster_address(address)


def test_no_address_is_a_ray_of_our_own_and_auto_local_and_ray_client_are_left_to_ray(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address(None) is None
    assert cluster_address("auto") == "auto" and cluster_address("local") == "local"
    assert cluster_address("ray://head:10001") == "ray://head:10001"


def test_every_command_that_takes_an_address_refuses_a_dead_one_before_any_work(tmp_path):
    """The build (its manifest checked, nothing indexed, no Ray) and the fine-tune on Ray
    workers (before its shards are read or a model built): exit status 2 and one line, in
    seconds."""
    from curation.finetune.ray_train import train_on_ray
    from curation.finetune.train import TrainConfig

    (port,) = free_ports(1)
    write_demo_archive(tmp_path / "archive", cases=1, seed=0)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump(demo_manifest(tmp_path / "archive", tmp_path / "out")))
    built = subprocess.run([sys.executable, "-m", "curation", "build", str(manifest), "--address", f"127.0.0.1:{port}"],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert built.returncode == 2, built.stderr[-2000:]
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in built.stderr and "Traceback" not in built.stderr
    assert not (tmp_path / "out" / "internal" / "index.parquet").exists()  # refused before the archive was indexed

    tuned = subprocess.run([sys.executable, "-m", "curation", "finetune", "--data", str(tmp_path / "out"), "--model", "tiny", "--out",
                            str(tmp_path / "ft"), "--workers", "1", "--address", f"127.0.0.1:{port}"],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert tuned.returncode == 2 and tuned.stderr.strip().splitlines()[-1].startswith(
        f"m3-curate: error: no Ray cluster answers at 127.0.0.1:{port}"), tuned.stderr[-2000:]
    assert not (tmp_path / "ft" / "tiny-base").exists()
    config = TrainConfig(data=str(tmp_path / "out"), model="tiny", out=str(tmp_path / "ft"))
    with pytest.raises(CurationError, match=f"no Ray cluster answers at 127.0.0.1:{port}"):
        train_on_ray(config, workers=1, address=f"127.0.0.1:{port}")
