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
  CPU time     CPU seconds of every process of the build, by kind (driver, Ray daemons, Ray
               Data's own actors, expert actors, task workers), sampled with the memory; divided
               by the CPUs it is the shortest wall time any schedule could reach, so it bounds
               the busy ratio from below
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


def tree_pss(procs: list[psutil.Process]) -> int:
    """Bytes of PSS of a process tree (0 for those that vanish meanwhile)."""
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


# What each process of a build is, from its command line: Ray names its workers `ray::<task or
# actor>` (`ray::IDLE` between tasks); the daemons are raylet, gcs_server and Python scripts
# under ray/.
RAY_DATA_ACTORS = ("_StatsActor", "AutoscalingCoordinator", "ActorLocationTracker")


def process_kind(cmdline: list[str], is_root: bool) -> str:
    first = cmdline[0] if cmdline else ""
    if is_root:
        return "driver"
    if not first.startswith("ray::"):
        return "Ray daemons"
    if "ExpertStage" in first:
        return "expert actors"
    if any(name in first for name in RAY_DATA_ACTORS):
        return "Ray Data's own actors"
    return "idle workers" if first == "ray::IDLE" else "task workers"


class CpuLedger:
    """CPU seconds (user + system) of every process of the tree, by kind. Sampled: a process
    that exits between two samples loses at most its last interval."""

    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}
        self.kind: dict[int, str] = {}

    def sample(self, root: psutil.Process, procs: list[psutil.Process]) -> None:
        for p in procs:
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    kind = process_kind(p.cmdline(), p.pid == root.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            self.seconds[p.pid] = t.user + t.system
            # a worker is what it last did that was not idling
            if kind != "idle workers" or p.pid not in self.kind:
                self.kind[p.pid] = kind

    def by_kind(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for pid, s in self.seconds.items():
            totals[self.kind[pid]] = totals.get(self.kind[pid], 0.0) + s
        return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def tree(pid: int) -> tuple[psutil.Process, list[psutil.Process]] | None:
    try:
        root = psutil.Process(pid)
        return root, [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return None


def run_sampled(command: list[str], env: dict[str, str]) -> tuple[float, int, str, CpuLedger]:
    """(wall seconds, peak tree PSS bytes, output, CPU seconds by process) of a command."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, output, cpu = 0, [], CpuLedger()
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    while proc.poll() is None:
        if (found := tree(proc.pid)) is not None:
            peak = max(peak, tree_pss(found[1]))
            cpu.sample(*found)
        time.sleep(0.5)
    reader.join()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{''.join(output)[-4000:]}")
    return wall, peak, "".join(output), cpu


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
    wall, peak, _, cpu = run_sampled([py, "-m", "curation", "-q", "build", str(manifest)], env)
    card = json.loads((out / "dataset_card.json").read_text())
    working = sum(card["counts"]["items"][k] for k in ("used", "quarantined"))
    pipeline_s = card["timing"]["wall_s"].get("pipeline", 0.0)
    busiest, busiest_s, expert_total = "", 0.0, 0.0
    for name, e in card["experts"].items():
        expert_total += e["seconds"]
        share = e["seconds"] / max(1, e.get("actors", 1) * e.get("pools", 1))
        if share > busiest_s:
            busiest, busiest_s = name, share
    render_wall, *_ = run_sampled([py, "-m", "curation", "-q", "render", str(manifest)], env)
    preview_wall = None
    if (REPO / "curation" / "preview.py").exists():
        preview_wall, *_ = run_sampled([py, "-m", "curation", "-q", "preview", str(manifest), "-n", "20", "--html", str(out / "preview.html")], env)
    result = {
        "items": working, "rows": card["counts"]["rows"]["total"], "wall_s": wall, "pipeline_s": pipeline_s,
        "items_per_s": working / wall, "items_per_s_streaming": working / pipeline_s if pipeline_s else 0.0,
        "peak_pss_mib": peak / 2**20, "expert_s_total": expert_total, "busiest": busiest, "busiest_s": busiest_s,
        "busy_ratio": wall / expert_total if expert_total else float("nan"),
        "busy_ratio_busiest": wall / busiest_s if busiest_s else float("nan"), "ray_start_s": card["timing"]["wall_s"].get("ray_start", 0.0),
        "render_s": render_wall, "preview_s": preview_wall if preview_wall is not None else float("nan"),
        "peak_rows_held": card["timing"].get("peak_rows_held", 0),
        "cpu_s": cpu.by_kind(),
    }
    cpu_total = sum(result["cpu_s"].values())
    cpus = len(os.sched_getaffinity(0))
    floor_wall = cpu_total / cpus
    print(f"\n== {label}")
    print(f"  items {working}, rows {result['rows']}, build wall {wall:.1f} s (Ray start {result['ray_start_s']:.1f} s, streaming {pipeline_s:.1f} s)")
    print(f"  items/s: {result['items_per_s']:.2f} end to end, {result['items_per_s_streaming']:.2f} while streaming")
    print(f"  peak memory (PSS of the build and its Ray processes): {result['peak_pss_mib']:.0f} MiB; rows held by the writer at most: {result['peak_rows_held']}")
    per = ", ".join(f"{n} {e['seconds']:.1f}" for n, e in card["experts"].items())
    print(f"  experts' own time: {expert_total:.1f} s of runner time in all ({per}); busiest pool {busiest} {busiest_s:.1f} s")
    print(f"  build wall / experts' own time (goal ≤ 1.3): {result['busy_ratio']:.2f} over all experts, "
          f"{result['busy_ratio_busiest']:.2f} over the busiest pool; streaming part alone: "
          f"{pipeline_s / expert_total if expert_total else float('nan'):.2f} and {pipeline_s / busiest_s if busiest_s else float('nan'):.2f}")
    print(f"  CPU time of the build and its Ray processes: {cpu_total:.1f} s ("
          + ", ".join(f"{k} {v:.1f}" for k, v in result["cpu_s"].items()) + ")")
    print(f"  so on {cpus} CPUs no schedule finishes this work in under {floor_wall:.1f} s: build wall / experts' own time "
          f"≥ {floor_wall / expert_total if expert_total else float('nan'):.2f} over all experts, whatever the pipeline does")
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
