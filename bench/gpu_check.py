"""The GPU check: one prepared script for the day a CUDA machine is lent, in well under ten
minutes, needing no network and making its own inputs.

    python bench/gpu_check.py [--json FILE] [--keep DIR]      # on a CUDA machine
    python bench/gpu_check.py --cpu-smoke                      # the same steps at tiny sizes on CPU

Three checks, each printed as one line of the summary:

1. `vista3d`: the real `vista3d132` architecture (MONAI's, seeded random weights written as a
   bundle: 870 MB) through the `vista3d` runner over a full-size synthetic CT (512×512×160 at
   0.8×0.8×2.5 mm, resampled by the bundle to 1.5 mm) with the bundle's 128³ window and
   autocast: seconds per item, items/s, peak GPU memory.
2. `build`: `m3-curate build` of the demo manifest over a fresh demo archive, VISTA3D being
   that vista3d132 bundle; on a GPU cluster every expert with weights gets an actor pool with
   a GPU share (`num_gpus`): items/s, build wall / the busiest pool's own time, peak GPU memory
   (nvidia-smi, sampled), peak host memory of the build and its Ray processes.
3. `finetune`: a few optimizer steps of the tiny LLaVA on that build's shards with bf16
   autocast and gradient checkpointing on: rows/s, peak GPU memory.

Without CUDA it stops at once with one line and exit status 2. `--cpu-smoke` runs every step
on CPU at tiny sizes (a 40×40×30 CT with a 64³ window, a one-case archive with the demo CT
bundle as VISTA3D, two fine-tune steps; bf16 is CUDA-only, gradient checkpointing stays on) so
that the script is known to work before a GPU is spent on it. Never run in CI.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]


@dataclass(frozen=True)
class Sizes:
    ct_shape: tuple[int, int, int]
    ct_spacing: tuple[float, float, float]
    patch: int | None  # None: the bundle's own window (128³)
    vista3d_runs: int
    cases: int
    vista3d132_in_build: bool
    finetune_steps: int


FULL = Sizes(ct_shape=(512, 512, 160), ct_spacing=(0.8, 0.8, 2.5), patch=None, vista3d_runs=3, cases=4, vista3d132_in_build=True,
             finetune_steps=20)
SMOKE = Sizes(ct_shape=(40, 40, 30), ct_spacing=(1.8, 1.8, 2.4), patch=64, vista3d_runs=1, cases=1, vista3d132_in_build=False,
              finetune_steps=2)


class GpuMemory:
    """Peak memory used on the GPUs (MiB, all processes), sampled with nvidia-smi every 0.5 s."""

    def __init__(self) -> None:
        self.peak: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10, check=True).stdout
                used = sum(float(x) for x in out.split())
                self.peak = max(self.peak or 0.0, used)
            except (OSError, subprocess.SubprocessError, ValueError):
                return
            self._stop.wait(0.5)

    def __enter__(self) -> GpuMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def check_vista3d(work: Path, sizes: Sizes, device: str) -> dict[str, Any]:
    import torch
    from experts_factory import ct_volume, study_item, vista3d_bundle

    from curation.manifest import ExpertSpec
    from expert_runners.base import ExpertInput, make_runner

    started = time.perf_counter()
    bundle = vista3d_bundle(work / "vista3d132", seed=0)
    written = time.perf_counter() - started
    options = {"patch_size": sizes.patch} if sizes.patch else {}
    runner = make_runner(ExpertSpec(name="VISTA3D", runner="vista3d", bundle=bundle, options=options))
    started = time.perf_counter()
    runner.setup(device)
    setup = time.perf_counter() - started
    volume, _ = ct_volume(sizes.ct_shape, sizes.ct_spacing)
    inp = ExpertInput(item=study_item(volume, item_id="full-size-ct"), volume=volume)
    runner.run(inp, "everything")  # warm-up: kernel selection, first allocations
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(sizes.vista3d_runs):
        started = time.perf_counter()
        findings = runner.run(inp, "everything")
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    mean = sum(times) / len(times)
    return {"bundle_written_s": written, "setup_s": setup, "ct_shape": list(sizes.ct_shape), "s_per_item": mean,
            "items_per_s": 1 / mean, "timing": findings.timing, "structures": len(findings.structures),
            "gpu_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None, "bundle": str(bundle)}


def check_build(work: Path, sizes: Sizes, vista3d132: str | None) -> dict[str, Any]:
    import yaml
    from pipeline import measure_build, with_output

    from curation.demo import write_demo_archive

    archive, out = work / "archive", work / "out"
    write_demo_archive(archive, cases=sizes.cases, seed=0)
    manifest = with_output(REPO / "manifests" / "demo.yaml", out, work, archive=archive)
    if vista3d132:
        data = yaml.safe_load(manifest.read_text())
        vista = next(e for e in data["experts"] if e["runner"] == "vista3d")
        vista.update(bundle=vista3d132, memory_gb=4)
        manifest.write_text(yaml.safe_dump(data, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    with GpuMemory() as gpu:
        result = measure_build(manifest, out, env)
    card = json.loads((out / "dataset" / "dataset_card.json").read_text())
    pools = {n: {"actors": e.get("actors"), "gpus_per_actor": e.get("gpus_per_actor")} for n, e in card["experts"].items()}
    return {**result, "gpu_peak_mib": gpu.peak, "pools": pools, "out": str(out)}


def check_finetune(work: Path, data: str, sizes: Sizes, device: str) -> dict[str, Any]:
    import dataclasses

    import torch

    from curation.cli import parser
    from curation.finetune.train import TrainConfig, prepare, train

    argv = ["finetune", "--data", data, "--model", "tiny", "--out", str(work / "ft"), "--max-steps", str(sizes.finetune_steps),
            "--batch-size", "4", "--log-steps", "1", *(["--use-gpu"] if device == "cuda" else [])]
    config = prepare(TrainConfig.from_args(parser().parse_args(argv)))
    config = dataclasses.replace(config, bf16=device == "cuda", gradient_checkpointing=True)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    summary = train(config)
    wall = time.perf_counter() - started
    return {"steps": summary["steps"], "rows": summary["rows"], "seconds": summary["seconds"], "wall_s": wall,
            "rows_per_s": summary["rows"] / max(summary["seconds"], 1e-9), "bf16": config.bf16,
            "gradient_checkpointing": config.gradient_checkpointing, "final_loss": summary["final_loss"],
            "gpu_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None}


def mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} MiB"


def summary_lines(r: dict[str, Any]) -> list[str]:
    v, b, f = r["vista3d"], r["build"], r["finetune"]
    return [
        f"gpu_check ({r['mode']}, {r['device_name']}, torch {r['torch']}, {r['seconds']:.0f} s in all)",
        f"  vista3d132 on a {'×'.join(map(str, v['ct_shape']))} CT: {v['s_per_item']:.2f} s/item ({v['items_per_s']:.2f} items/s), "
        f"set-up {v['setup_s']:.1f} s, peak GPU memory {mib(v['gpu_peak_mib'])}; phases {json.dumps(v['timing'])}",
        f"  build ({b['items']} items, {b['rows']} rows): {b['wall_s']:.1f} s, {b['items_per_s']:.2f} items/s "
        f"({b['items_per_s_streaming']:.2f} streaming); busiest pool {b['busiest']}: wall / own time {b['busy_ratio_busiest']:.2f} "
        f"({b['busy_ratio_busiest_streaming']:.2f} streaming); GPU {mib(b['gpu_peak_mib'])}, host {b['peak_pss_mib']:.0f} MiB; "
        f"pools {json.dumps(b['pools'])}",
        f"  finetune (tiny, {f['steps']} steps, bf16 {f['bf16']}, gradient checkpointing {f['gradient_checkpointing']}): "
        f"{f['rows_per_s']:.1f} rows/s, peak GPU memory {mib(f['gpu_peak_mib'])}, final loss {f['final_loss']}",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="every step at tiny sizes on CPU, to check the script itself")
    ap.add_argument("--json", type=Path, help="write every figure here as JSON")
    ap.add_argument("--keep", type=Path, help="keep the work folder here instead of a temporary one")
    args = ap.parse_args()
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); run on a GPU machine, "
              "or with --cpu-smoke to check the script on CPU", file=sys.stderr)
        return 2
    device, sizes = ("cpu", SMOKE) if args.cpu_smoke else ("cuda", FULL)
    work = args.keep or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        vista = check_vista3d(work, sizes, device)
        build = check_build(work, sizes, vista["bundle"] if sizes.vista3d132_in_build else None)
        result = {"mode": "cpu-smoke" if args.cpu_smoke else "gpu", "torch": torch.__version__,
                  "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "CPU",
                  "vista3d": vista, "build": build, "finetune": check_finetune(work, build["out"], sizes, device)}
        result["seconds"] = time.perf_counter() - started
        print("\n".join(summary_lines(result)))
        if args.json:
            args.json.write_text(json.dumps(result, indent=1, default=str))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
