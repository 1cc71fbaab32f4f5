"""End-to-end build figures: items/s, peak memory, how busy the pipeline keeps the experts, and
the time of a template-tuning preview from the cache.

    python bench/pipeline.py [--manifest manifests/demo.yaml | --weight-free [--cases 4 12] [--sleep S]] [--keep DIR]

Without `--manifest`: manifests/demo.yaml (the committed demo bundles; `make demo` must have
made data/demo) when it has tasks, else — or with `--weight-free` — a weight-free manifest (CT
tissue + ground truth as VISTA3D/BRATS/CXR, the templates in prompts/) over a fresh
`demo-archive` of each `--cases` size, which shows how
memory behaves as the archive grows. `--sleep S` makes each of those experts' runs take S
seconds more without using a CPU, as a GPU expert's inference would, and gives each an actor
pool, as experts with weights have: it shows how busy the pipeline keeps experts whose own
time dominates.

Each build runs as `python -m curation -q build` in a fresh output folder (embedded local
Ray, cold cache), as a user would run it. Reported:

  items/s      working items / wall time of the whole command (Ray start included), and
               over the streaming part alone
  peak memory  the largest proportional set size (PSS) of the build process and all its
               descendants (Ray's GCS, raylet, workers, actors), sampled every 0.5 s; PSS
               counts shared object-store pages once
  busy ratio   build wall time / the experts' own time (goal ≤ 1.3 on the demo), two ways:
               over all experts (Σ runner seconds of every pool: on one machine the experts
               share its CPUs, or its GPU, so 1.0 means that shared resource never waited for
               the pipeline), and over the busiest pool (Σ its runner seconds / its actors: 1.0
               means that pool was never idle). Also for the streaming part alone (after Ray
               and the driver's preparation).
  render       `m3-curate render` wall time (cache only)
  preview      `m3-curate preview MANIFEST -n 20` wall time from the cache (goal < 5 s)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def tree_pss(pid: int) -> int:
    """Bytes of PSS of a process and its descendants (0 for those that vanish meanwhile)."""
    total = 0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def run_sampled(command: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """(wall seconds, peak tree PSS bytes, output) of a command."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, output = 0, []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    while proc.poll() is None:
        peak = max(peak, tree_pss(proc.pid))
        time.sleep(0.5)
    reader.join()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{''.join(output)[-4000:]}")
    return wall, peak, "".join(output)


def weight_free_manifest(archive: Path, out: Path, path: Path, *, counting: bool = False) -> Path:
    from build_helpers import demo_manifest

    data = demo_manifest(archive, out, rows_per_shard=2000, counting=counting)
    data["output"]["image_max_side"] = 512
    if counting:  # experts that emulate GPU inference get pools, as experts with weights do
        for e in data["experts"]:
            e["actors"] = 1
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def with_output(manifest: Path, out: Path, folder: Path) -> Path:
    """A copy of the manifest in `folder`, its paths resolved, its output folder (and cache) `out`."""
    from curation.manifest import resolve_paths

    data = resolve_paths(yaml.safe_load(manifest.read_text()), manifest.parent.resolve())
    data["output"]["dir"] = str(out)
    data["output"].pop("cache", None)
    path = folder / manifest.name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def bench_one(manifest: Path, out: Path, label: str, *, sleep: float = 0.0) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    if sleep:
        env["M3_TEST_RUN_SLEEP"] = str(sleep)
    py = sys.executable
    wall, peak, _ = run_sampled([py, "-m", "curation", "-q", "build", str(manifest)], env)
    card = json.loads((out / "dataset_card.json").read_text())
    working = sum(card["counts"]["items"][k] for k in ("used", "quarantined"))
    pipeline_s = card["timing"]["wall_s"].get("pipeline", 0.0)
    busiest, busiest_s, expert_total = "", 0.0, 0.0
    for name, e in card["experts"].items():
        expert_total += e["seconds"]
        share = e["seconds"] / max(1, e.get("actors", 1) * e.get("pools", 1))
        if share > busiest_s:
            busiest, busiest_s = name, share
    render_wall, _, _ = run_sampled([py, "-m", "curation", "-q", "render", str(manifest)], env)
    preview_wall = None
    if (REPO / "curation" / "preview.py").exists():
        preview_wall, _, _ = run_sampled([py, "-m", "curation", "-q", "preview", str(manifest), "-n", "20", "--html", str(out / "preview.html")], env)
    result = {
        "items": working, "rows": card["counts"]["rows"]["total"], "wall_s": wall, "pipeline_s": pipeline_s,
        "items_per_s": working / wall, "items_per_s_streaming": working / pipeline_s if pipeline_s else 0.0,
        "peak_pss_mib": peak / 2**20, "expert_s_total": expert_total, "busiest": busiest, "busiest_s": busiest_s,
        "busy_ratio": wall / expert_total if expert_total else float("nan"),
        "busy_ratio_busiest": wall / busiest_s if busiest_s else float("nan"), "ray_start_s": card["timing"]["wall_s"].get("ray_start", 0.0),
        "render_s": render_wall, "preview_s": preview_wall if preview_wall is not None else float("nan"),
        "peak_rows_held": card["timing"].get("peak_rows_held", 0),
    }
    print(f"\n== {label}")
    print(f"  items {working}, rows {result['rows']}, build wall {wall:.1f} s (Ray start {result['ray_start_s']:.1f} s, streaming {pipeline_s:.1f} s)")
    print(f"  items/s: {result['items_per_s']:.2f} end to end, {result['items_per_s_streaming']:.2f} while streaming")
    print(f"  peak memory (PSS of the build and its Ray processes): {result['peak_pss_mib']:.0f} MiB; rows held by the writer at most: {result['peak_rows_held']}")
    per = ", ".join(f"{n} {e['seconds']:.1f}" for n, e in card["experts"].items())
    print(f"  experts' own time: {expert_total:.1f} s of runner time in all ({per}); busiest pool {busiest} {busiest_s:.1f} s")
    print(f"  build wall / experts' own time (goal ≤ 1.3): {result['busy_ratio']:.2f} over all experts, "
          f"{result['busy_ratio_busiest']:.2f} over the busiest pool; streaming part alone: "
          f"{pipeline_s / expert_total if expert_total else float('nan'):.2f} and {pipeline_s / busiest_s if busiest_s else float('nan'):.2f}")
    print(f"  render from cache: {render_wall:.1f} s; preview -n 20 from cache: "
          + (f"{preview_wall:.1f} s (goal < 5 s)" if preview_wall is not None else "not available (no curation/preview.py)"))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--manifest", type=Path, help="default: manifests/demo.yaml if it has tasks, else a weight-free demo build")
    ap.add_argument("--weight-free", action="store_true", help="the weight-free build over fresh demo archives, even if the demo has tasks")
    ap.add_argument("--cases", type=int, nargs="+", default=[4, 12], help="demo-archive sizes for the weight-free build")
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds added to each weight-free expert run (emulates GPU inference)")
    ap.add_argument("--keep", type=Path, help="keep outputs here instead of a temporary folder")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    work.mkdir(parents=True, exist_ok=True)
    manifest = args.manifest
    if manifest is None and not args.weight_free:
        demo = REPO / "manifests" / "demo.yaml"
        if (yaml.safe_load(demo.read_text()) or {}).get("tasks"):
            manifest = demo
    print(f"machine: {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB; outputs in {work}")
    try:
        if manifest is not None:
            out = work / "out"
            bench_one(with_output(manifest, out, work), out, f"{manifest}")
        else:
            from curation.demo import write_demo_archive

            for cases in args.cases:
                archive, out = work / f"archive{cases}", work / f"out{cases}"
                write_demo_archive(archive, cases=cases, seed=0)
                extra = f", +{args.sleep:g} s per expert run" if args.sleep else ""
                bench_one(weight_free_manifest(archive, out, work / f"m{cases}.yaml", counting=bool(args.sleep)), out,
                          f"weight-free demo build, demo-archive --cases {cases}{extra}", sleep=args.sleep)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
