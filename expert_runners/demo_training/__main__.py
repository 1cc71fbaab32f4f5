"""`python -m expert_runners.demo_training OUT [--seed S] [--cases N] [--only NAMES] [--jobs J]`."""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from pathlib import Path

from curation.errors import CurationError
from curation.signals import command_pool, report_stop, stop_on_sigterm
from expert_runners.demo_training import BUNDLES, DEFAULT_CASES, DEFAULT_SEED, train_bundle
from expert_runners.demo_training.common import check_seed, file_size


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m expert_runners.demo_training",
                                description="Train the demo bundles (small MONAI models) on synthetic phantoms.")
    p.add_argument("out", type=Path, help="folder for the bundles (OUT/ct_organs, OUT/brats_demo, OUT/cxr_demo)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"phantom and training seed (default {DEFAULT_SEED}; 0 is the evaluation archive's)")
    p.add_argument("--cases", type=int, default=DEFAULT_CASES,
                   help=f"CT and brain training phantoms; chest X-rays are 20 × this (default {DEFAULT_CASES})")
    p.add_argument("--only", default=",".join(BUNDLES), help=f"comma-separated subset of {','.join(BUNDLES)}")
    p.add_argument("--jobs", type=int, default=2,
                   help="bundles trained at once, one process and one torch thread each (default 2; the weights do not depend on it)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        check_seed(args.seed)
        if args.cases < 2:
            raise CurationError(f"demo training: --cases must be at least 2, got {args.cases}")
        if args.jobs < 1:
            raise CurationError(f"demo training: --jobs must be at least 1, got {args.jobs}")
        only = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(only) - set(BUNDLES))
        if unknown or not only:
            raise CurationError(f"demo training: --only {args.only!r}: use names among {', '.join(BUNDLES)}")
    except CurationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = [n for n in BUNDLES if n in only]  # ct_organs first: the longest
    started = time.perf_counter()
    stop_on_sigterm()
    try:
        results = train(names, args)
    except KeyboardInterrupt:
        return report_stop("demo training")
    for name, root, seconds in results:
        print(f"{name}: {seconds:.0f} s, {file_size(root) / 1e6:.2f} MB at {root}", flush=True)
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


def train(names: list[str], args: argparse.Namespace) -> list[tuple[str, Path, float]]:
    if args.jobs == 1 or len(names) == 1:
        return [train_bundle(n, args.out, args.seed, args.cases) for n in names]
    # spawn, not fork: a forked child of a process that has used torch's thread pool can hang
    with command_pool(multiprocessing.get_context("spawn"), min(args.jobs, len(names))) as pool:
        return pool.starmap(train_bundle, [(n, args.out, args.seed, args.cases) for n in names], chunksize=1)


if __name__ == "__main__":
    sys.exit(main())
