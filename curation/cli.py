"""`m3-curate` (also `python -m curation`): one subcommand per stage.

A `CurationError` (bad manifest, missing folder, unreadable input) is printed as one line and
exits with status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from curation.errors import CurationError


def _demo_archive(args: argparse.Namespace) -> None:
    from curation.demo import write_demo_archive

    s = write_demo_archive(Path(args.dir), cases=args.cases, seed=args.seed)
    print(
        f"demo archive written to {args.dir}: {s['ct']['patients']} CT patients ({s['ct']['files']} DICOM files), "
        f"{s['brain']['cases']} brain MRI cases, {s['cxr']['images']} chest X-rays; ground truth in {s['ground_truth']}"
    )


def _out_dir(args: argparse.Namespace, spec_out: Path) -> Path:
    return Path(args.out) if args.out else spec_out


def _index(args: argparse.Namespace) -> None:
    from curation.index import build_index, write_index
    from curation.manifest import load_manifest

    spec = load_manifest(args.manifest)
    index = build_index(spec)
    index_path, ledger_path = write_index(index, _out_dir(args, spec.output.dir))
    print(index.summary())
    print(f"wrote {index_path} and {ledger_path}")


def _convert(args: argparse.Namespace) -> None:
    from curation.convert import convert
    from curation.manifest import load_manifest

    spec = load_manifest(args.manifest)
    out = Path(args.out)
    result = convert(spec, out, compress=not args.uncompressed)
    print(f"wrote {len(result.written)} NIfTI files and index.parquet to {out}")
    for entry in result.failed:
        print(f"  set aside: {entry.uri}: {entry.reason}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="m3-curate", description="Build expert-augmented instruction data for medical VLMs.")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("demo-archive", help="write a synthetic archive with ground truth")
    s.add_argument("dir")
    s.add_argument("--cases", type=int, default=4, help="patients per modality (default 4)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(run=_demo_archive)

    s = sub.add_parser("index", help="discover items: index.parquet + ledger.parquet")
    s.add_argument("manifest")
    s.add_argument("--out", help="output folder (default: the manifest's output.dir)")
    s.set_defaults(run=_index)

    s = sub.add_parser("convert", help="write every indexed item as NIfTI (RAS, CT in HU)")
    s.add_argument("manifest")
    s.add_argument("--out", required=True)
    s.add_argument("--uncompressed", action="store_true", help="write .nii instead of .nii.gz")
    s.set_defaults(run=_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        args.run(args)
    except CurationError as e:
        print(f"m3-curate: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("m3-curate: interrupted", file=sys.stderr)
        return 130
    return 0
