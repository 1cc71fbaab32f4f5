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


def _index(args: argparse.Namespace) -> None:
    from curation.ingest.index import build_index, write_index
    from curation.manifest import load_manifest
    from curation.store.layout import Layout

    spec = load_manifest(args.manifest)
    index = build_index(spec)
    layout = Layout.of(spec, args.out)
    layout.mark_internal()
    index_path, ledger_path = write_index(index, layout.index, layout.ledger)
    print(index.summary())
    print(f"wrote {index_path} and {ledger_path}")


def _convert(args: argparse.Namespace) -> None:
    from curation.ingest.convert import convert
    from curation.manifest import load_manifest

    spec = load_manifest(args.manifest)
    out = Path(args.out)
    result = convert(spec, out, compress=not args.uncompressed)
    print(f"wrote {len(result.written)} NIfTI files and index.parquet to {out}")
    for entry in result.failed:
        print(f"  set aside: {entry.uri}: {entry.reason}")


def _delegate(target: str):
    """Run `module:function(args)`, importing the module only when its command runs (Ray,
    transformers and torch are heavy; `m3-curate index` should not pay for them)."""

    def run(args: argparse.Namespace) -> None:
        import importlib

        module, _, function = target.partition(":")
        getattr(importlib.import_module(module), function)(args)

    return run


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

    s = sub.add_parser("build", help="the whole pipeline on Ray: index, experts, render, shards")
    s.add_argument("manifest")
    s.add_argument("--out", help="output folder (default: the manifest's output.dir)")
    s.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray started for this build)")
    s.add_argument("--limit", type=int, help="use only the first N items (for a quick try)")
    s.add_argument("--force", action="store_true", help="let --limit replace a complete build in --out")
    s.set_defaults(run=_delegate("curation.build.pipeline:build_command"))

    s = sub.add_parser("render", help="rebuild shards from cached findings only (no expert runs)")
    s.add_argument("manifest")
    s.add_argument("--out", help="output folder (default: the manifest's output.dir)")
    s.set_defaults(run=_delegate("curation.build.pipeline:render_command"))

    s = sub.add_parser("preview", help="a static HTML gallery of rendered samples, for template tuning")
    s.add_argument("manifest")
    which = s.add_mutually_exclusive_group()
    which.add_argument("--task", help="a task of the manifest, by its template path")
    which.add_argument("--template", help="a template file no task names yet, tried on the manifest's items")
    s.add_argument("-n", type=int, default=8, help="number of samples (default 8)")
    s.add_argument("--html", required=True, help="the page to write")
    s.add_argument("--out", help="output folder whose cache to use (default: the manifest's output.dir)")
    s.set_defaults(run=_delegate("curation.preview:preview_command"))

    s = sub.add_parser("export", help="export shards for other trainers")
    s.add_argument("format", choices=["llava"], help="llava: VILA/LLaVA JSON plus image files")
    s.add_argument("shards", help="a build's output folder or its shards/ folder")
    s.add_argument("out")
    s.set_defaults(run=_delegate("curation.export:export_command"))

    s = sub.add_parser("finetune", help="stage-4 fine-tuning on shards")
    s.add_argument("--data", required=True, help="a build's output folder or its shards/ folder")
    s.add_argument("--model", required=True, help="a local image-text-to-text model folder, or 'tiny'")
    s.add_argument("--out", required=True)
    s.add_argument("--epochs", type=float, default=1.0)
    s.add_argument("--lr", type=float, help="peak learning rate (default: 2e-5, VILA-M3's for full tuning; 2e-4 with --lora; 1e-3 for --model tiny)")
    s.add_argument("--batch-size", type=int, default=1)
    s.add_argument("--grad-accum", type=int, default=1)
    s.add_argument("--max-steps", type=int, default=-1)
    s.add_argument("--warmup-ratio", type=float, default=0.03)
    s.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) instead of all weights")
    s.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    s.add_argument("--workers", type=int, default=0, help="Ray Train workers (0: train in this process)")
    s.add_argument("--use-gpu", action="store_true", help="one GPU per Ray Train worker")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--lora-rank", type=int, default=16, help="LoRA rank r (alpha is 2r; default 16)")
    s.add_argument("--max-length", type=int, help="drop rows longer than this many tokens (default: keep all)")
    s.add_argument("--save-steps", type=int, default=500, help="checkpoint every N optimizer steps (default 500)")
    s.add_argument("--log-steps", type=int, default=10)
    s.add_argument("--shuffle-buffer", type=int, default=256, help="rows held for shuffling (default 256)")
    s.add_argument("--num-workers", type=int, default=0, help="DataLoader processes preparing batches (default 0)")
    s.add_argument("--cpu-threads", type=int, help="torch threads when training on CPU")
    s.add_argument("--address", help="Ray cluster address for --workers (default: RAY_ADDRESS, else a local Ray)")
    s.set_defaults(run=_delegate("curation.finetune:finetune_command"))

    s = sub.add_parser("eval", help="held-out metrics as JSON")
    s.add_argument("--model", required=True, help="a model folder (finetune's --out)")
    s.add_argument("--data", required=True, help="a build's output folder or its shards/ folder")
    s.add_argument("--split", default="test")
    s.add_argument("--out", help="write the JSON here as well as to stdout")
    s.add_argument("--limit", type=int, help="evaluate at most N rows")
    s.add_argument("--max-new-tokens", type=int, default=48)
    s.add_argument("--batch-size", type=int, default=8, help="prompts generated together, left-padded (default 8)")
    s.add_argument("--cpu-threads", type=int, help="torch threads when running on CPU")
    s.set_defaults(run=_delegate("curation.finetune.evaluate:eval_command"))
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
