"""Every bench at one size, into one JSON file, with the headline figures as a table.

    python bench/run_all.py --json FILE [--size small|large] [--repeat K] [--only NAME ...]

Each bench runs as its own process (`bench/<name>.py` with the size's arguments below), `--repeat`
times. The pipeline benches write JSON, and their headline figures — each a ratio to a baseline
measured in the same run — are the medians over the repeats; the others' printed output is
kept as text. The JSON holds the machine, the load average before and after (the figures mean
little on a busy machine), every command and its full result.

Sizes: `small` (about ten minutes on 2 CPUs) checks that everything runs; `large` gives the
figures of bench/README.md (about two hours on 2 CPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# name → size → arguments of bench/<script>
BENCHES: dict[str, tuple[str, dict[str, list[str]]]] = {
    "pipeline-demo": ("pipeline.py", {"small": ["--cases", "4"], "large": ["--cases", "4", "24", "64"]}),
    "pipeline-gpu-like": ("pipeline.py", {"small": ["--weight-free", "--sleep", "0.3", "--cases", "12", "--no-serial"],
                                          "large": ["--weight-free", "--sleep", "0.3", "--cases", "4", "84", "--no-serial"]}),
    "ingest-convert": ("ingest.py", {"small": ["convert", "--repeat", "3"], "large": ["convert", "--repeat", "5"]}),
    "ingest-scan": ("ingest.py", {"small": ["scan", "--sizes", "0.05", "--repeat", "1"], "large": ["scan", "--sizes", "0.5,1,2"]}),
    "render": ("render.py", {"small": ["--rounds", "30"], "large": []}),
    "experts": ("experts.py", {"small": ["--cases", "2"], "large": ["--cases", "4", "--repeat", "2"]}),
    "experts-quality": ("demo_experts_quality.py", {"small": ["--cases", "2"], "large": ["--cases", "8"]}),
    "finetune": ("finetune.py", {"small": ["--conversations", "200", "--epochs", "2"],
                                 "large": ["--build", "--cases", "12", "--test", "0.25", "--epochs", "10"]}),
}
# headline figures of a pipeline run: (key path, what it is)
HEADLINES = [
    (("vs_serial",), "pipeline items/s ÷ serial loop items/s"),
    (("rebuild_vs_render",), "cached rebuild wall ÷ render wall"),
    (("build", "busy_ratio_busiest"), "build wall ÷ busiest pool's own time"),
    (("build", "busy_ratio_busiest_streaming"), "… streaming part alone"),
    (("build", "peak_pss_mib"), "peak memory, MiB"),
    (("build", "items_per_s"), "items/s"),
    (("build", "expert_s_total"), "experts' own time, s"),
    (("build", "wall_s"), "build wall, s"),
]


def run_bench(name: str, size: str, work: Path) -> dict[str, Any]:
    script, sizes = BENCHES[name]
    out_json = work / f"{name}-{time.monotonic_ns()}.json"
    command = [sys.executable, str(REPO / "bench" / script), *sizes[size]]
    if script == "pipeline.py":
        command += ["--json", str(out_json)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    result: dict[str, Any] = {"command": command[1:], "returncode": done.returncode, "wall_s": time.perf_counter() - started,
                              "output": (done.stdout + done.stderr)[-8000:]}
    if out_json.exists():
        result["json"] = json.loads(out_json.read_text())
    print(f"  {name}: exit {done.returncode} in {result['wall_s']:.0f} s", flush=True)
    return result


def dig(d: dict[str, Any], path: tuple[str, ...]) -> float | None:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d if isinstance(d, (int, float)) else None


def headlines(repeats: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per build label: the median over the repeats of each headline figure, and the peak
    memory of each size over that of the smallest size."""
    table: dict[str, dict[str, list[float]]] = {}
    for rep in repeats:
        for run in rep.get("json", {}).get("runs", []):
            row = table.setdefault(run["label"], {})
            for path, what in HEADLINES:
                value = dig(run, path)
                if value is not None:
                    row.setdefault(what, []).append(value)
    medians = {label: {what: statistics.median(v) for what, v in row.items()} for label, row in table.items()}
    memory = [(label, row.get("peak memory, MiB")) for label, row in medians.items() if row.get("peak memory, MiB")]
    if len(memory) > 1:
        base = memory[0][1]
        for label, value in memory:
            medians[label]["peak memory ÷ smallest archive's"] = value / base  # type: ignore[operator]
    return medians


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--size", choices=["small", "large"], default="small")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each bench (medians in the table)")
    ap.add_argument("--only", nargs="+", choices=sorted(BENCHES), help="these benches only")
    args = ap.parse_args()
    names = args.only or list(BENCHES)
    report: dict[str, Any] = {"size": args.size, "repeat": args.repeat, "cpus": os.cpu_count(), "load_avg_before": os.getloadavg(),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "benches": {}, "headlines": {}}
    with tempfile.TemporaryDirectory(prefix="bench-all-") as tmp:
        for name in names:
            print(f"{name} ({args.size}, {args.repeat}×)", flush=True)
            repeats = [run_bench(name, args.size, Path(tmp)) for _ in range(args.repeat)]
            report["benches"][name] = repeats
            report["headlines"].update(headlines(repeats))
            report["load_avg_after"] = os.getloadavg()
            args.json.write_text(json.dumps(report, indent=1, default=str))
    print(f"\nmedians over {args.repeat} run(s); load average {report['load_avg_before'][0]:.1f} before, {report['load_avg_after'][0]:.1f} after")
    for label, row in report["headlines"].items():
        print(f"{label}:")
        for what, value in row.items():
            print(f"  {what:45s} {value:10.2f}")
    failed = [n for n, reps in report["benches"].items() if any(r["returncode"] for r in reps)]
    if failed:
        print(f"failed: {', '.join(failed)} (their output is in {args.json})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
