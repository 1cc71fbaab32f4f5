"""How long a user waits for a manifest mistake to be reported: wall time of a real
`python -m curation` process, from start to its one-line error, for each manifest mistake of
`tests/test_mistakes.py`, and for the same checks passing on the demo manifest over the demo
archive (`data/demo`, `make demo` writes it), where nothing stops them early.

    .venv/bin/python bench/mistakes.py [--rounds 3]

Printed: the best of `rounds` runs per mistake (goal < 2 s each).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_mistakes import MISTAKES, run_mistake, scene  # noqa: E402


def clean_demo_preflight() -> float:
    """The checks of `m3-curate build manifests/demo.yaml`, all passing, in a fresh process."""
    code = ("import time, sys; t = time.perf_counter(); from curation.manifest import load_manifest; "
            "from curation.preflight import preflight; preflight(load_manifest('manifests/demo.yaml'), 'manifests/demo.yaml', "
            "rows=True, out=sys.argv[1]); print(time.perf_counter() - t)")
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code, out], cwd=REPO, check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
        return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    worst = 0.0
    for m in MISTAKES:
        if not m.in_manifest:
            continue
        best = float("inf")
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory() as d:
                root = Path(d)
                scene(root)
                started = time.perf_counter()
                result = run_mistake(m, root)
                best = min(best, time.perf_counter() - started)
                assert result.returncode == 2, result.stderr
        worst = max(worst, best)
        print(f"{best:5.2f} s  {m.what}")
    if (REPO / "data" / "demo").is_dir():
        demo = min(clean_demo_preflight() for _ in range(args.rounds))
        print(f"{demo:5.2f} s  the demo manifest, every check passing (process start to done)")
    print(f"slowest mistake: {worst:.2f} s (goal < 2 s)")


if __name__ == "__main__":
    main()
