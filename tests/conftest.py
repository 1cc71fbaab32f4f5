from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

# Nothing here reaches the network: tests make their own models and data. Without these,
# `datasets` and transformers start a daemon thread that tries to send Hugging Face telemetry
# and is still waiting on the network when the interpreter shuts down (a background thread in C
# at shutdown is how a finished test session can still crash on exit).
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
REALDATA = REPO.parent / "shared" / "realdata"


@pytest.fixture
def write_manifest(tmp_path: Path):
    """Write a manifest dict as YAML into tmp_path and return its path."""

    def write(data: dict, name: str = "m.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


@pytest.fixture(scope="session")
def render_demo(tmp_path_factory: pytest.TempPathFactory):
    """The render tests' demo (`render_factory.build_demo`): an archive, a manifest with one task
    per template and findings for every item, built once per session."""
    from render_factory import build_demo

    return build_demo(tmp_path_factory.mktemp("render-demo"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """tqdm's monitor threads (started by progress bars in datasets and transformers) are
    stopped before the interpreter shuts down, for the same reason."""
    import sys
    import threading

    monitor = getattr(sys.modules.get("tqdm._monitor"), "TMonitor", None)
    for thread in threading.enumerate():
        if monitor is not None and isinstance(thread, monitor):
            thread.exit()



@pytest.fixture(autouse=True)
def _what_a_command_keeps_out_stays_in_its_test():
    """`index` and `convert` keep pandas and requests out of their process
    (`curation.ingest.lean`): run in-process by a test, they would keep them out of every test
    after it in the same process (transformers needs pandas), whichever tests ran before."""
    before = list(sys.meta_path)
    yield
    sys.meta_path[:] = before
