"""Thirteen mistakes a user makes, each run as the user would (a real `python -m curation`
process): exit status 2, one line on stderr naming the file, key or path, never a traceback.

The README's table "What a mistake prints" is this test's output: the test fails when the table
and the program disagree, and `M3_WRITE_README=1 pytest tests/test_mistakes.py` rewrites it.
`bench/mistakes.py` times the manifest mistakes (tests never assert on time).
"""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
START, END = "<!-- mistakes: start (tests/test_mistakes.py writes this table) -->", "<!-- mistakes: end -->"
SHOWN_ROOT = "/data"  # the scene's folder, as the README shows it
pytestmark = pytest.mark.slow


def base_manifest() -> dict:
    return {
        "name": "mine",
        "sources": [{"name": "ct", "kind": "dicom", "root": "archive/ct"},
                    {"name": "cxr", "kind": "image2d", "root": "archive/cxr", "labels": "labels.csv"}],
        "experts": [{"name": "CTTissue", "runner": "ct_tissue"}],
        "tasks": [{"template": "findings/volume.j2", "source": "ct", "expert": "CTTissue"}],
        "output": {"dir": "out"},
    }


def scene(root: Path) -> None:
    """A small archive the manifests below point at (the files only need to exist and be named
    as their readers expect: every mistake is found before anything is read)."""
    (root / "archive" / "ct" / "PAT1" / "1").mkdir(parents=True)
    (root / "archive" / "ct" / "PAT1" / "1" / "IM0001.dcm").write_bytes(b"\0" * 132)
    (root / "archive" / "cxr").mkdir(parents=True)
    (root / "archive" / "cxr" / "labels.csv").write_text("image,patient_id,Cardiomegaly\na.png,p1,1\n")
    (root / "archive" / "cxr" / "a.png").write_bytes(b"\x89PNG")
    (root / "archive" / "notes").mkdir()
    (root / "archive" / "notes" / "readme.txt").write_text("not an image")
    (root / "report.csv").write_text("a file, not a folder")


def manifest(root: Path, change: Callable[[dict], None], name: str = "m.yaml") -> str:
    data = base_manifest()
    change(data)
    (root / name).write_text(yaml.safe_dump(data, sort_keys=False))
    return name


@dataclass
class Mistake:
    what: str
    argv: Callable[[Path], list[str]]  # the command line, given the scene's folder (the working directory)
    in_manifest: bool = True  # a manifest mistake: bench/mistakes.py times it
    limit_bytes: int | None = None  # run with this file-size limit: the disk "fills" there


def _set(path: str, value: object) -> Callable[[dict], None]:
    def change(d: dict) -> None:
        *keys, last = path.split(".")
        target = d
        for k in keys:
            target = target[int(k)] if k.isdigit() else target[k]
        if value is None:
            del target[int(last) if last.isdigit() else last]
        else:
            target[int(last) if last.isdigit() else last] = value

    return change


def _shards(root: Path, crafted_id: str | None = None) -> str:
    sys.path.insert(0, str(REPO / "tests"))
    from shards_factory import write_shards

    import pyarrow as pa
    import pyarrow.parquet as pq

    out = write_shards(root / "built", conversations=6)
    if crafted_id is not None:
        part = sorted((out / "dataset" / "data").glob("*/*.parquet"))[0]
        rows = pq.read_table(part).to_pylist()
        rows[0]["id"] = crafted_id
        pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(part)), part)
    return "built"


MISTAKES = [
    Mistake("the manifest's name mistyped", lambda r: ["build", "manfest.yaml"]),
    Mistake("a key mistyped", lambda r: ["build", manifest(r, lambda d: d["sources"][0].update(rooot="x"))]),
    Mistake("a source folder that is not there", lambda r: ["build", manifest(r, _set("sources.0.root", "archive/CT"))]),
    Mistake("a labels table that is not there", lambda r: ["build", manifest(r, _set("sources.1.labels", "labels.tsv"))]),
    Mistake("a bundle folder that is not there", lambda r: ["build", manifest(r, lambda d: d["experts"].append(
        {"name": "VISTA3D", "runner": "vista3d", "bundle": "models/vista3d"}))]),
    Mistake("a template that is not there", lambda r: ["build", manifest(r, _set("tasks.0.template", "findings/volumes.j2"))]),
    Mistake("a manifest with no tasks", lambda r: ["build", manifest(r, _set("tasks", None))]),
    Mistake("a task whose source holds nothing to read", lambda r: ["build", manifest(r, lambda d: (
        d["sources"].append({"name": "notes", "kind": "nifti", "root": "archive/notes"}),
        d["tasks"].append({"template": "findings/volume.j2", "source": "notes", "expert": "CTTissue"})))]),
    Mistake("a cluster address where no Ray head listens", lambda r: ["build", manifest(r, lambda d: None), "--address", "127.0.0.1:1"],
            in_manifest=False),
    Mistake("an output folder that is a file", lambda r: ["build", manifest(r, lambda d: None), "--out", "report.csv"]),
    Mistake("an output folder that cannot be written", lambda r: ["index", manifest(r, lambda d: None), "--out", "/sys/m3-curate-out"]),
    Mistake("shards from elsewhere whose id is a path", lambda r: ["export", "llava", _shards(r, "../../outside"), "llava"],
            in_manifest=False),
    Mistake("a write the file system refuses (full disk, quota, file-size limit)", lambda r: ["export", "llava", _shards(r), "llava"], in_manifest=False,
            limit_bytes=1000),
]


def run_mistake(m: Mistake, root: Path) -> subprocess.CompletedProcess[str]:
    argv = m.argv(root)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}

    def limit() -> None:  # the child's files stop growing at limit_bytes: writes fail with EFBIG
        if m.limit_bytes is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (m.limit_bytes, m.limit_bytes))

    return subprocess.run([sys.executable, "-m", "curation", "-q", *argv], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120, preexec_fn=limit)


def table(rows: list[tuple[str, str]]) -> str:
    lines = ["| mistake | what `m3-curate` prints (exit status 2) |", "|---|---|"]
    lines += [f"| {what} | `` {line} `` |" if "`" in line else f"| {what} | `{line}` |" for what, line in rows]  # a line with ` in it
    return "\n".join(lines)


def test_each_mistake_is_one_line_and_exit_status_2_and_the_readme_shows_them(tmp_path: Path) -> None:
    if os.access("/sys", os.W_OK) and not Path("/sys").is_mount():
        pytest.skip("/sys is writable here: the unwritable-output case needs a read-only folder")
    rows = []
    for k, m in enumerate(MISTAKES):
        root = tmp_path / f"case{k}"
        root.mkdir()
        scene(root)
        result = run_mistake(m, root)
        lines = [l for l in result.stderr.splitlines() if l.strip()]
        assert result.returncode == 2, f"{m.what}: exit {result.returncode}\n{result.stderr}"
        assert "Traceback" not in result.stderr and len(lines) == 1, f"{m.what}:\n{result.stderr}"
        assert lines[0].startswith("m3-curate: error: ")
        rows.append((m.what, lines[0].replace(str(root), SHOWN_ROOT)))
    assert not any(tmp_path.glob("**/outside*")), "the crafted shard wrote outside its output folder"
    want = table(rows)
    text = README.read_text()
    have = text.split(START, 1)[1].split(END, 1)[0].strip() if START in text else ""
    if have != want and os.environ.get("M3_WRITE_README"):
        README.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{want}\n{END}", text, flags=re.S))
        return
    assert have == want, f"README's table differs from what the program prints; the table now:\n{want}"
