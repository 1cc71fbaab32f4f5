"""End-to-end build figures, each beside its baseline measured in the same run: items/s against
the serial loop (`bench/serial.py`), a cached rebuild against `m3-curate render`, peak memory,
how busy the pipeline keeps the experts, and a template-tuning preview from the cache.

    python bench/pipeline.py [--manifest manifests/demo.yaml | --weight-free] [--cases 4 24] [--sleep S]
                             [--no-serial] [--keep DIR] [--json FILE]

Without `--manifest`: manifests/demo.yaml (the committed demo bundles) when it has tasks, else —
or with `--weight-free` — a weight-free manifest (CT tissue + ground truth as VISTA3D/BRATS/CXR,
the templates in prompts/). Each `--cases N` writes a fresh `demo-archive --cases N` and points
the manifest at it (without `--cases`, the demo manifest runs on data/demo as it is). `--sleep S`
makes each weight-free expert run take S seconds more without using a CPU, as a GPU expert's
inference would, and gives each an actor pool, as experts with weights have: it shows how busy
the pipeline keeps experts whose own time dominates.

Each build runs as `python -m curation -q build` in a fresh output folder (embedded local
Ray, cold cache), as a user would run it. Reported:

  items/s      working items / wall time of the whole command (Ray start included), and over
               the streaming part alone; and over the serial loop's items/s on the same archive
               (`bench/serial.py`: one item at a time, the same experts and templates), run
               right after in the same invocation, both over their whole process's wall time
  peak memory  the largest proportional set size (PSS) of the build process and all its
               descendants (Ray's GCS, raylet, workers, actors), sampled every 0.5 s; PSS
               counts shared object-store pages once; the writer's rows held and spilled
  busy ratio   build wall time / the experts' own time, two ways: over all experts (Σ runner
               seconds of every pool: on one machine the experts share its CPUs, or its GPU, so
               1.0 means that shared resource never waited for the pipeline), and over the
               busiest pool (Σ its runner seconds / its actors: 1.0 means that pool was never
               idle). Also for the streaming part alone (after Ray and the driver's preparation).
  CPU time     CPU seconds of every process of the build, by kind (driver, Ray daemons, Ray
               Data's own actors, expert actors, task workers), sampled with the memory; divided
               by the CPUs it is the shortest wall time any schedule could reach
  rebuild      the same build again, every finding cached (it renders without Ray), over
               `m3-curate render` (cache only) run right after
  preview      `m3-curate preview MANIFEST -n 20` wall time from the cache
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


def tree_pss(procs: list[psutil.Process], kinds: dict[int, str] | None = None) -> tuple[int, dict[str, int]]:
    """Bytes of PSS of a process tree (0 for those that vanish meanwhile), in all and by kind
    of process (`kinds`: pid → kind, as `CpuLedger` names them)."""
    total, by_kind = 0, {}
    for p in procs:
        try:
            pss = p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        total += pss
        kind = (kinds or {}).get(p.pid, "other")
        by_kind[kind] = by_kind.get(kind, 0) + pss
    return total, by_kind


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
        self.peak_by_kind: dict[str, int] = {}  # PSS bytes by kind at the tree's peak (set by run_sampled)

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
    """(wall seconds, peak tree PSS bytes, output, CPU seconds by process) of a command; the
    PSS by kind of process at the peak is `CpuLedger.peak_by_kind`."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, output, cpu = 0, [], CpuLedger()
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    while proc.poll() is None:
        if (found := tree(proc.pid)) is not None:
            cpu.sample(*found)
            total, by_kind = tree_pss(found[1], cpu.kind)
            if total > peak:
                peak, cpu.peak_by_kind = total, by_kind
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


def with_output(manifest: Path, out: Path, folder: Path, *, archive: Path | None = None) -> Path:
    """A copy of the manifest in `folder`, its paths resolved, its output folder (and cache)
    `out`; with `archive`, its sources read that demo archive instead of data/demo."""
    from curation.manifest import resolve_paths

    data = resolve_paths(yaml.safe_load(manifest.read_text()), manifest.parent.resolve())
    data["output"]["dir"] = str(out)
    data["output"].pop("cache", None)
    if archive is not None:
        demo = str((REPO / "data" / "demo").resolve())
        for src in data["sources"]:
            for key in ("root", "file", "labels"):
                if isinstance(src.get(key), str) and src[key].startswith(demo):
                    src[key] = str(archive) + src[key][len(demo):]
    path = folder / manifest.name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def busiest_pool(card: dict) -> tuple[str, float, float]:
    """(busiest pool, its runner seconds per actor thread, all experts' runner seconds). The
    expert hosts are one pool: their experts' seconds together, over hosts × threads."""
    pools: dict[str, tuple[float, int]] = {}
    total = 0.0
    for name, e in card["experts"].items():
        total += e["seconds"]
        if e.get("in_expert_hosts"):
            seconds, _ = pools.get("expert hosts", (0.0, 0))
            pools["expert hosts"] = (seconds + e["seconds"], e["actors"] * e.get("threads_per_actor", 1))
        else:
            pools[name] = (e["seconds"], e.get("actors", 1) * e.get("pools", 1))
    shares = {name: seconds / max(1, slots) for name, (seconds, slots) in pools.items()}
    busiest = max(shares, key=shares.get, default="")
    return busiest, shares.get(busiest, 0.0), total


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def idle_of(timeline: Path, expert: str, started: float, ended: float) -> dict[str, float]:
    """Where the busiest pool's wall time went that its runs did not use (weight-free
    experts log each run's start and end): before its first run, between runs (gaps over
    10 ms, summed), after its last run."""
    runs = sorted((float(a), float(b)) for name, _, a, b in (line.split() for line in timeline.read_text().splitlines()) if name == expert)
    if not runs:
        return {}
    gaps = [max(0.0, nxt[0] - prev[1]) for prev, nxt in zip(runs, runs[1:])]
    return {"before_first_run_s": runs[0][0] - started, "between_runs_s": sum(g for g in gaps if g > 0.01),
            "longest_gap_s": max(gaps, default=0.0), "after_last_run_s": ended - runs[-1][1], "runs": len(runs)}


def measure_build(manifest: Path, out: Path, env: dict[str, str]) -> dict:
    timeline = out.parent / f"{out.name}-timeline.txt"
    env = {**env, "M3_TEST_TIMELINE": str(timeline)}
    started = time.time()
    wall, peak, _, cpu = run_sampled([sys.executable, "-m", "curation", "-q", "build", str(manifest)], env)
    ended = time.time()
    card = json.loads((out / "dataset" / "dataset_card.json").read_text())
    (out.parent / f"{out.name}-card.json").write_text(json.dumps(card, indent=1))  # the rebuild below writes its own
    working = sum(card["counts"]["items"][k] for k in ("used", "quarantined"))
    pipeline_s = card["timing"]["wall_s"].get("pipeline", 0.0)
    busiest, busiest_s, expert_total = busiest_pool(card)
    cpu_s = cpu.by_kind()
    return {
        "items": working, "rows": card["counts"]["rows"]["total"], "wall_s": wall, "pipeline_s": pipeline_s,
        "items_per_s": working / wall, "items_per_s_streaming": ratio(working, pipeline_s),
        "peak_pss_mib": peak / 2**20, "expert_s_total": expert_total, "busiest": busiest, "busiest_s": busiest_s,
        "busy_ratio": ratio(wall, expert_total), "busy_ratio_busiest": ratio(wall, busiest_s),
        "busy_ratio_streaming": ratio(pipeline_s, expert_total), "busy_ratio_busiest_streaming": ratio(pipeline_s, busiest_s),
        "ray_start_s": card["timing"]["wall_s"].get("ray_start", 0.0), "peak_rows_held": card["timing"].get("peak_rows_held", 0),
        "rows_spilled": card["timing"].get("rows_spilled", 0), "cpu_s": cpu_s, "cpu_s_total": sum(cpu_s.values()),
        "peak_pss_mib_by_kind": {k: v / 2**20 for k, v in sorted(cpu.peak_by_kind.items(), key=lambda kv: -kv[1])},
        "experts": {n: {"seconds": e["seconds"], "runs": e["runs"], "actors": e.get("actors")} for n, e in card["experts"].items()},
        "busiest_idle": idle_of(timeline, busiest, started, ended) if timeline.exists() else {},
        "wall_parts_s": card["timing"]["wall_s"], "stage_s": card["timing"]["stage_s"],
        "rows_by_source": card["counts"]["rows"]["by_source"],
    }


def measure_serial(manifest: Path, work: Path, env: dict[str, str]) -> dict:
    folder = work / "serial"
    wall, peak, output, _ = run_sampled([sys.executable, str(REPO / "bench" / "serial.py"), str(manifest), "--out", str(folder),
                                         "--json", str(work / "serial.json")], env)
    result = json.loads((work / "serial.json").read_text())
    # items/s over the process's wall, as the build's: its own timer leaves out the interpreter's
    # start and its exit (tearing torch and MONAI down, 1.5 s), which the build's figure has
    return {**result, "loop_wall_s": result["wall_s"], "wall_s": wall, "items_per_s": result["items"] / wall,
            "peak_pss_mib": peak / 2**20}


def bench_one(manifest: Path, out: Path, label: str, *, sleep: float = 0.0, serial: bool = True) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    if sleep:
        env["M3_TEST_RUN_SLEEP"] = str(sleep)
    py = sys.executable
    result = {"label": label, "build": measure_build(manifest, out, env)}
    if serial:
        result["serial"] = measure_serial(manifest, out.parent / f"{out.name}-serial", env)
        result["vs_serial"] = ratio(result["build"]["items_per_s"], result["serial"]["items_per_s"])
    rebuild_wall, *_ = run_sampled([py, "-m", "curation", "-q", "build", str(manifest)], env)
    render_wall, *_ = run_sampled([py, "-m", "curation", "-q", "render", str(manifest)], env)
    preview_wall, *_ = run_sampled([py, "-m", "curation", "-q", "preview", str(manifest), "-n", "20", "--html", str(out / "preview.html")], env)
    result.update(rebuild_s=rebuild_wall, render_s=render_wall, rebuild_vs_render=ratio(rebuild_wall, render_wall), preview_s=preview_wall)
    report(result)
    return result


def report(r: dict) -> None:
    b = r["build"]
    cpus = len(os.sched_getaffinity(0))
    print(f"\n== {r['label']}")
    print(f"  items {b['items']}, rows {b['rows']}, build wall {b['wall_s']:.1f} s (Ray start {b['ray_start_s']:.1f} s, "
          f"streaming {b['pipeline_s']:.1f} s, shards/ledger/card after it {b['wall_parts_s'].get('write', 0):.1f} s)")
    print(f"  items/s: {b['items_per_s']:.2f} end to end, {b['items_per_s_streaming']:.2f} while streaming")
    if "serial" in r:
        s = r["serial"]
        print(f"  serial loop (bench/serial.py, same archive, experts and templates): {s['items']} items, {s['rows']} conversations "
              f"in {s['wall_s']:.1f} s as a process ({s['loop_wall_s']:.1f} s by its own timer), {s['items_per_s']:.2f} items/s; "
              f"pipeline / serial items/s: {r['vs_serial']:.2f}")
    print(f"  peak memory (PSS of the build and its Ray processes): {b['peak_pss_mib']:.0f} MiB ("
          + ", ".join(f"{k} {v:.0f}" for k, v in b["peak_pss_mib_by_kind"].items())
          + f"); writer: {b['peak_rows_held']} rows held at most, {b['rows_spilled']} spilled")
    per = ", ".join(f"{n} {e['seconds']:.1f}" for n, e in b["experts"].items())
    print(f"  experts' own time: {b['expert_s_total']:.1f} s of runner time in all ({per}); busiest pool {b['busiest']} {b['busiest_s']:.1f} s")
    print(f"  build wall / experts' own time: {b['busy_ratio']:.2f} over all experts, {b['busy_ratio_busiest']:.2f} over the busiest "
          f"pool; streaming part alone: {b['busy_ratio_streaming']:.2f} and {b['busy_ratio_busiest_streaming']:.2f}")
    if b["busiest_idle"]:
        i = b["busiest_idle"]
        print(f"  the busiest pool's idle time (its {i['runs']} runs' log): {i['before_first_run_s']:.1f} s before its first run, "
              f"{i['between_runs_s']:.1f} s between runs (longest gap {i['longest_gap_s']:.1f} s), {i['after_last_run_s']:.1f} s after its last")
    print(f"  CPU time of the build and its Ray processes: {b['cpu_s_total']:.1f} s ("
          + ", ".join(f"{k} {v:.1f}" for k, v in b["cpu_s"].items()) + f"); on {cpus} CPUs no schedule finishes it in under "
          f"{b['cpu_s_total'] / cpus:.1f} s")
    print(f"  rebuild with every finding cached: {r['rebuild_s']:.1f} s; render from cache: {r['render_s']:.1f} s; "
          f"rebuild / render: {r['rebuild_vs_render']:.2f}; preview -n 20: {r['preview_s']:.1f} s")


def runs_for(args: argparse.Namespace, work: Path) -> list[tuple[Path, Path, str]]:
    """(manifest, output folder, label) for each build to measure."""
    from curation.demo import write_demo_archive

    manifest = args.manifest
    if manifest is None and not args.weight_free:
        demo = REPO / "manifests" / "demo.yaml"
        if (yaml.safe_load(demo.read_text()) or {}).get("tasks"):
            manifest = demo
    if manifest is not None and not args.cases:
        return [(with_output(manifest, work / "out", work), work / "out", str(manifest))]
    out, written = [], set()
    for k, cases in enumerate(args.cases or [4, 12]):
        # a size given twice is measured twice from a cold cache: each run gets a folder of its own
        archive, folder = work / f"archive{cases}", work / f"run{k}-{cases}"
        folder.mkdir(parents=True, exist_ok=True)
        if cases not in written:
            write_demo_archive(archive, cases=cases, seed=0)
            written.add(cases)
        extra = f", +{args.sleep:g} s per expert run" if args.sleep else ""
        if manifest is not None:
            out.append((with_output(manifest, folder / "out", folder, archive=archive), folder / "out", f"{manifest}, demo-archive --cases {cases}"))
        else:
            path = weight_free_manifest(archive, folder / "out", folder / "m.yaml", counting=bool(args.sleep))
            out.append((path, folder / "out", f"weight-free demo build, demo-archive --cases {cases}{extra}"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--manifest", type=Path, help="default: manifests/demo.yaml if it has tasks, else a weight-free demo build")
    ap.add_argument("--weight-free", action="store_true", help="the weight-free build over fresh demo archives, even if the demo has tasks")
    ap.add_argument("--cases", type=int, nargs="+", help="demo-archive sizes (default: the demo manifest on data/demo; weight-free: 4 12)")
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds added to each weight-free expert run (emulates GPU inference)")
    ap.add_argument("--no-serial", action="store_true", help="skip the serial baseline")
    ap.add_argument("--keep", type=Path, help="keep outputs here instead of a temporary folder")
    ap.add_argument("--json", type=Path, help="write every figure here as JSON")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    work.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30), "load_avg_at_start": os.getloadavg()}
    print(f"machine: {machine['cpus']} CPUs, {machine['memory_gib']} GiB, load average {machine['load_avg_at_start'][0]:.1f}; outputs in {work}")
    results = []
    try:
        for manifest, out, label in runs_for(args, work):
            results.append(bench_one(manifest, out, label, sleep=args.sleep, serial=not args.no_serial))
    finally:
        if args.json:
            args.json.write_text(json.dumps({"machine": machine, "load_avg_at_end": os.getloadavg(), "runs": results}, indent=1))
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
