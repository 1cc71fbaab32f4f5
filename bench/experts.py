"""Expert runner speed on this machine: items per second and where the time goes.

    python bench/experts.py [--cases 4] [--repeat 1] [--bundles expert_runners/demo_bundles] [--vista3d132]

Writes a demo archive (seed 0, `--cases` CT and brain cases, 8 chest X-rays per case) into a
temporary folder, indexes it through the demo manifest's sources, then for each runner:

- `setup` once (weights loaded; reported apart, it happens once per worker);
- one untimed warm-up item (first-call allocations, kernel selection);
- each item `--repeat` times: the source reader's `load` (and `load_labels` for the `labels`
  runner) timed here as *read*, then `runner.run(ExpertInput(...), args)`, whose
  `Findings.timing` splits the run into the runner's own phases: *load* (input conversion,
  lazy setup), *preprocess*, *inference*, *postprocess* (findings, pictures, PNG encoding);
  *other* is the run's remaining time (validation, `accepts`, error wrapping).

Columns are milliseconds per item (means); items/s counts read + run. Runners: `ct_tissue`,
`labels` (CT, brain and X-ray ground truth), `vista3d` / `brats` / `cxr_ensemble` with the demo
bundles, and with `--vista3d132` the real VISTA3D architecture (`vista3d132`, seeded *random*
weights, 870 MB written to the temporary folder) on a small synthetic 40×40×30 volume with the
prompt "hepatic tumor" and a 64³ window — its speed only; its output means nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from curation.demo import write_demo_archive  # noqa: E402
from curation.ingest.index import build_index  # noqa: E402
from curation.ingest import readers_for  # noqa: E402
from curation.items import StudyItem  # noqa: E402
from curation.manifest import ExpertSpec  # noqa: E402
from expert_runners.base import ExpertInput, ExpertRunner, make_runner  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from demo_experts_quality import DEFAULT_BUNDLES, archive_spec, expert_specs  # noqa: E402

PHASES = ("load", "preprocess", "inference", "postprocess")


@dataclass(slots=True)
class Row:
    title: str
    source: str
    setup_s: float = 0.0
    read: list[float] = field(default_factory=list)
    run: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PHASES})

    def cells(self) -> list[str]:
        n = len(self.run)
        total = sum(self.read) + sum(self.run)
        phase_ms = {p: 1000 * float(np.mean(v)) if v else 0.0 for p, v in self.phases.items()}
        other = 1000 * float(np.mean(self.run)) - sum(phase_ms.values())
        return [self.title, self.source, str(n), f"{n / total:.2f}", f"{1000 * np.mean(self.read):.0f}",
                *(f"{phase_ms[p]:.0f}" for p in PHASES), f"{max(other, 0.0):.0f}", f"{self.setup_s:.2f}"]


HEADER = ["runner (expert)", "source", "items", "items/s", "read", "load", "preprocess", "inference", "postprocess", "other", "setup s"]


def measure(title: str, source: str, runner: ExpertRunner, items: list[tuple[StudyItem, Any]], args: str, *,
            with_labels: bool, repeat: int) -> Row:
    """Time `runner` over `items` (pairs of item and a zero-argument loader returning
    (volume, labels))."""
    row = Row(title, source)
    started = time.perf_counter()
    runner.setup("cpu")
    row.setup_s = time.perf_counter() - started
    first, load_first = items[0]
    volume, labels = load_first()
    runner.run(ExpertInput(first, volume, labels if with_labels else None), args)  # warm-up
    for _ in range(repeat):
        for item, load in items:
            t0 = time.perf_counter()
            volume, labels = load()
            t1 = time.perf_counter()
            findings = runner.run(ExpertInput(item, volume, labels if with_labels else None), args)
            t2 = time.perf_counter()
            row.read.append(t1 - t0)
            row.run.append(t2 - t1)
            for p in PHASES:
                row.phases[p].append(findings.timing.get(p, 0.0))
    return row


def loaders(items: list[StudyItem], reader: Any, with_labels: bool) -> list[tuple[StudyItem, Any]]:
    def loader(item: StudyItem) -> Any:
        return lambda: (reader.load(item), reader.load_labels(item) if with_labels else None)

    return [(item, loader(item)) for item in items]


def vista3d132_row(work: Path, repeat: int) -> Row:
    from experts_factory import ct_volume, study_item, vista3d_bundle

    started = time.perf_counter()
    bundle = vista3d_bundle(work / "vista3d132", seed=0)
    print(f"  (vista3d132 bundle with random weights written in {time.perf_counter() - started:.0f} s)", flush=True)
    runner = make_runner(ExpertSpec(name="VISTA3D", runner="vista3d", bundle=bundle, options={"patch_size": 64}))
    volume, _ = ct_volume()
    item = study_item(volume, item_id="synthetic-40x40x30")
    return measure("vista3d (vista3d132, RANDOM weights)", "40×40×30 synthetic", runner,
                   [(item, lambda: (volume, None))] * 2, "hepatic tumor", with_labels=False, repeat=repeat)


def print_table(rows: list[Row]) -> None:
    table = [HEADER, *(r.cells() for r in rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    for n, r in enumerate(table):
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=4, help="CT and brain cases of the archive (chest X-rays: 8 per case)")
    p.add_argument("--repeat", type=int, default=1, help="timed passes over the items")
    p.add_argument("--bundles", type=Path, default=DEFAULT_BUNDLES)
    p.add_argument("--vista3d132", action="store_true", help="also time the real VISTA3D architecture with random weights (writes 870 MB)")
    args = p.parse_args(argv)
    import torch

    with tempfile.TemporaryDirectory(prefix="m3-bench-experts-") as tmp:
        work = Path(tmp)
        write_demo_archive(work / "archive", cases=args.cases, seed=0)
        spec = archive_spec(work / "archive", work)
        index = build_index(spec)
        readers = readers_for(spec)
        by_source: dict[str, list[StudyItem]] = {}
        for item in index.items:
            by_source.setdefault(item.source, []).append(item)
        demo = expert_specs(args.bundles.resolve())
        plan: list[tuple[str, str, ExpertSpec, str, bool]] = [
            ("ct_tissue", "ct", ExpertSpec(name="CTTissue", runner="ct_tissue"), "", False),
            ("labels (CT, vista3d preset)", "ct", ExpertSpec(name="CTLabels", runner="labels", options={"preset": "vista3d"}), "", True),
            ("labels (brain, brats preset)", "brain", ExpertSpec(name="BRATSLabels", runner="labels", options={"preset": "brats"}), "", True),
            ("labels (CXR table)", "cxr", ExpertSpec(name="CXRLabels", runner="labels"), "", True),
            ("vista3d (demo ct_organs)", "ct", demo["ct"], "everything", False),
            ("brats (demo brats_demo)", "brain", demo["brats"], "", False),
            ("cxr_ensemble (demo cxr_demo)", "cxr", demo["cxr"], "", False),
        ]
        print(f"archive: seed 0, {args.cases} cases: {', '.join(f'{len(v)} {k}' for k, v in by_source.items())} items; "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per item (means of {args.repeat} pass(es))", flush=True)
        rows = []
        for title, source, expert, run_args, with_labels in plan:
            items = loaders(by_source[source], readers[source], with_labels)
            rows.append(measure(f"{title}", source, make_runner(expert), items, run_args, with_labels=with_labels, repeat=args.repeat))
            print(f"  {title}: done", flush=True)
        if args.vista3d132:
            rows.append(vista3d132_row(work, args.repeat))
    print()
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
