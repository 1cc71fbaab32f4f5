"""How good the demo bundles are on demo phantoms held out from their training.

    python bench/demo_experts_quality.py [--bundles expert_runners/demo_bundles] [--cases 4] [--seed 0]
                                         [--only ct,brats,cxr] [--archive DIR]

Writes a demo archive (`write_demo_archive(tmp, cases, seed)`; the defaults are those of
`data/demo`, seed 0, 4 cases and 32 chest X-rays, none of which any bundle was trained on:
training uses seed 1 and refuses seed 0), indexes it through the demo manifest's sources, loads
each item with its source reader and runs the bundles through the real runners
(`make_runner` + `ExpertInput` + `run`), then compares with the archive's ground truth:

- CT (`ct_organs` via `vista3d`): Dice per structure on the item's own grid, from the run with
  argument `everything` (organs, lungs, vertebrae), and Dice of hepatic tumour (label 26) from
  the run with argument `hepatic tumor`, on the cases that have tumours; tumour voxels predicted
  in tumour-free cases are reported as false-positive mL;
- brain (`brats_demo` via `brats`): Dice of TC (1∪4), WT (1∪2∪4) and ET (4) on cases with a
  tumour; false-positive mL on the others;
- CXR (`cxr_demo` via `cxr_ensemble`): AUROC per label over the images, macro mean over the
  labels that have positives (and negatives), and accuracy at the runner's threshold.

The label maps behind the Dice come from the runners' own `segment` (wrapped to keep a copy),
called by `run` exactly as in a build. Goals (issue 3): mean Dice ≥ 0.85 over CT organs, ≥ 0.7
on hepatic tumours, CXR AUROC ≥ 0.9.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from curation.demo import CT_LABELS, write_demo_archive  # noqa: E402
from curation.ingest.index import build_index  # noqa: E402
from curation.ingest import readers_for  # noqa: E402
from curation.items import StudyItem  # noqa: E402
from curation.manifest import BuildSpec, ExpertSpec, load_manifest  # noqa: E402
from expert_runners.base import ExpertInput, ExpertRunner, make_runner  # noqa: E402
from expert_runners.demo_training.common import auroc, dice  # noqa: E402

DEMO_MANIFEST = REPO / "manifests" / "demo.yaml"
SOURCES = ("ct", "brain", "cxr")  # the manifest's sources over the archive's three parts
DEFAULT_BUNDLES = REPO / "expert_runners" / "demo_bundles"
TUMOUR = CT_LABELS["hepatic tumor"]
# The soft-tissue organs the goal "mean Dice over CT organs" is about; vertebrae are reported beside them.
ORGANS = ("liver", "spleen", "right kidney", "left kidney", "aorta", "left lung lower lobe", "right lung lower lobe")
VERTEBRAE = tuple(n for n in CT_LABELS if n.startswith("vertebrae"))
GOALS = {"ct organs": 0.85, "hepatic tumour": 0.7, "cxr auroc": 0.9}


def archive_spec(archive: Path, work: Path) -> BuildSpec:
    """The demo manifest's CT, brain and X-ray sources, pointed at `archive` (written as a
    manifest beside it so `load_manifest` resolves the label paths as for `data/demo`)."""
    data = yaml.safe_load(DEMO_MANIFEST.read_text())
    data["sources"] = [s for s in data["sources"] if s["name"] in SOURCES]
    for source in data["sources"]:
        source["root"] = str(archive / Path(source["root"]).name)
    data["experts"], data["tasks"] = [], []
    data["output"] = {"dir": str(work / "out")}
    path = work / "bench.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_manifest(path)


def expert_specs(bundles: Path) -> dict[str, ExpertSpec]:
    return {
        "ct": ExpertSpec(name="VISTA3D", runner="vista3d", bundle=bundles / "ct_organs"),
        "brats": ExpertSpec(name="BRATS", runner="brats", bundle=bundles / "brats_demo"),
        "cxr": ExpertSpec(name="CXR", runner="cxr_ensemble", bundle=bundles / "cxr_demo",
                          models=[{"path": "models/model.pt2", "kind": "torch_export", "size": 256}]),
    }


def capture(runner: ExpertRunner) -> list[np.ndarray]:
    """Keep a copy of every label map the runner's `segment` returns (its `run` calls it)."""
    kept: list[np.ndarray] = []
    segment: Callable[..., np.ndarray] = runner.segment  # type: ignore[attr-defined]

    def wrapped(*args: Any, **kwargs: Any) -> np.ndarray:
        out = segment(*args, **kwargs)
        kept.append(out)
        return out

    runner.segment = wrapped  # type: ignore[attr-defined]
    return kept


def _mean(values: list[float | None]) -> float:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else float("nan")


def bench_ct(items: list[StudyItem], reader: Any, spec: ExpertSpec) -> dict[str, float]:
    runner = make_runner(spec)
    runner.setup("cpu")
    kept = capture(runner)
    per_label: dict[str, list[float | None]] = {n: [] for n in CT_LABELS if n != "hepatic tumor"}
    tumour, tumour_fp = [], []
    pooled = [0, 0]
    for item in items:
        volume, truth = reader.load(item), reader.load_labels(item)
        gt = np.asarray(truth.array).astype(np.int32)
        runner.run(ExpertInput(item, volume), "everything")
        pred = kept[-1]
        for name in per_label:
            per_label[name].append(dice(pred == CT_LABELS[name], gt == CT_LABELS[name]))
        runner.run(ExpertInput(item, volume), "hepatic tumor")
        pred_t, gt_t = kept[-1] == TUMOUR, gt == TUMOUR
        voxel_ml = abs(float(np.linalg.det(volume.affine[:3, :3]))) / 1000.0
        if gt_t.any():
            tumour.append(dice(pred_t, gt_t))
            pooled[0] += 2 * int((pred_t & gt_t).sum())
            pooled[1] += int(pred_t.sum()) + int(gt_t.sum())
        else:
            tumour_fp.append(float(pred_t.sum()) * voxel_ml)
    print(f"\nCT ({len(items)} cases, runner vista3d, bundle {spec.bundle})")
    for name, values in per_label.items():
        print(f"  {name:24s} Dice {_mean(values):.3f}   per case {[None if v is None else round(v, 3) for v in values]}")
    out = {"ct organs": _mean([_mean(per_label[n]) for n in ORGANS]),
           "ct vertebrae": _mean([_mean(per_label[n]) for n in VERTEBRAE]),
           "ct all structures": _mean([_mean(v) for v in per_label.values()]),
           "hepatic tumour": _mean(tumour),
           "hepatic tumour pooled": pooled[0] / pooled[1] if pooled[1] else float("nan")}
    print(f"  mean over organs ({', '.join(ORGANS)}): {out['ct organs']:.3f}")
    print(f"  mean over vertebrae T11–L3: {out['ct vertebrae']:.3f}; over all {len(per_label)} structures: {out['ct all structures']:.3f}")
    print(f"  hepatic tumour Dice {out['hepatic tumour']:.3f} (mean of {len(tumour)} cases with tumours: "
          f"{[round(v, 3) for v in tumour if v is not None]}; pooled {out['hepatic tumour pooled']:.3f}); "
          f"false positives in {len(tumour_fp)} tumour-free cases: {[round(v, 2) for v in tumour_fp]} mL")
    return out


def bench_brats(items: list[StudyItem], reader: Any, spec: ExpertSpec) -> dict[str, float]:
    runner = make_runner(spec)
    runner.setup("cpu")
    kept = capture(runner)
    regions = {"TC": (1, 4), "WT": (1, 2, 4), "ET": (4,)}
    scores: dict[str, list[float | None]] = {r: [] for r in regions}
    false_ml = []
    for item in items:
        volume, truth = reader.load(item), reader.load_labels(item)
        gt = np.asarray(truth.array).astype(np.int32)
        runner.run(ExpertInput(item, volume))
        pred = kept[-1]
        voxel_ml = abs(float(np.linalg.det(volume.affine[:3, :3]))) / 1000.0
        if (gt > 0).any():
            for region, ids in regions.items():
                scores[region].append(dice(np.isin(pred, ids), np.isin(gt, ids)))
        else:
            false_ml.append(float((pred > 0).sum()) * voxel_ml)
    print(f"\nBrain MRI ({len(items)} cases, runner brats, bundle {spec.bundle})")
    out = {}
    for region, values in scores.items():
        out[f"brats {region}"] = _mean(values)
        print(f"  {region} Dice {out[f'brats {region}']:.3f}   per tumour case {[round(v, 3) for v in values if v is not None]}")
    print(f"  predicted tumour in {len(false_ml)} tumour-free cases: {[round(v, 2) for v in false_ml]} mL")
    return out


def bench_cxr(items: list[StudyItem], reader: Any, spec: ExpertSpec) -> dict[str, float]:
    runner = make_runner(spec)
    runner.setup("cpu")
    probs: dict[str, list[float]] = {}
    truth: dict[str, list[int]] = {}
    correct = total = 0
    for item in items:
        findings = runner.run(ExpertInput(item, reader.load(item)))
        labels = item.attrs["labels"]
        for c in findings.classes:
            probs.setdefault(c.name, []).append(c.probability)
            truth.setdefault(c.name, []).append(int(labels[c.name]))
            correct += int(c.present == bool(int(labels[c.name])))
            total += 1
    print(f"\nChest X-ray ({len(items)} images, runner cxr_ensemble, bundle {spec.bundle})")
    aucs = {}
    for name in probs:
        y = np.array(truth[name])
        a = auroc(np.array(probs[name]), y)
        if a is not None:
            aucs[name] = a
            print(f"  {name:24s} AUROC {a:.3f}   ({int(y.sum())} positive of {len(y)})")
    silent = [n for n in probs if n not in aucs]
    out = {"cxr auroc": float(np.mean(list(aucs.values()))) if aucs else float("nan"), "cxr accuracy": correct / max(total, 1)}
    print(f"  macro AUROC over {len(aucs)} labels with positives: {out['cxr auroc']:.3f}; "
          f"accuracy at the threshold over all {len(probs)} labels: {out['cxr accuracy']:.3f}")
    print(f"  labels without positives in these images (no AUROC): {', '.join(silent)}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundles", type=Path, default=DEFAULT_BUNDLES, help="folder holding ct_organs, brats_demo, cxr_demo")
    p.add_argument("--cases", type=int, default=4, help="CT and brain cases of the evaluation archive (default 4, as data/demo)")
    p.add_argument("--seed", type=int, default=0, help="evaluation archive seed (default 0, as data/demo; training used another)")
    p.add_argument("--only", default="ct,brats,cxr", help="comma-separated subset of ct,brats,cxr")
    p.add_argument("--archive", type=Path, help="write (or reuse) the evaluation archive here instead of a temporary folder")
    args = p.parse_args(argv)
    only = {s.strip() for s in args.only.split(",")}
    with tempfile.TemporaryDirectory(prefix="m3-demo-quality-") as tmp:
        work = Path(tmp)
        archive = args.archive or work / "archive"
        started = time.perf_counter()
        truth_file = archive / "ground_truth.json"
        if not (truth_file.is_file() and yaml.safe_load(truth_file.read_text()).get("seed") == args.seed
                and yaml.safe_load(truth_file.read_text()).get("cases") == args.cases):
            write_demo_archive(archive, cases=args.cases, seed=args.seed)
        spec = archive_spec(archive, work)
        index = build_index(spec)
        readers = readers_for(spec)
        by_source: dict[str, list[StudyItem]] = {}
        for item in index.items:
            by_source.setdefault(item.source, []).append(item)
        print(f"evaluation archive: seed {args.seed}, {args.cases} cases, {len(index.items)} items ({time.perf_counter() - started:.1f} s)")
        experts = expert_specs(args.bundles.resolve())
        results: dict[str, float] = {}
        for key, source, fn in (("ct", "ct", bench_ct), ("brats", "brain", bench_brats), ("cxr", "cxr", bench_cxr)):
            if key in only:
                t = time.perf_counter()
                results |= fn(by_source[source], readers[source], experts[key])
                print(f"  ({time.perf_counter() - t:.1f} s)")
    print("\nsummary")
    for name, value in results.items():
        goal = GOALS.get(name)
        verdict = "" if goal is None else f"  goal ≥ {goal}: {'met' if value >= goal else 'NOT met'}"
        print(f"  {name:24s} {value:.3f}{verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
