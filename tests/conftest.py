from __future__ import annotations

from pathlib import Path

import pytest
import yaml

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
