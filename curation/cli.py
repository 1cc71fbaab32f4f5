"""`m3-curate` (also `python -m curation`): one subcommand per stage.

A `CurationError` (bad manifest, missing folder, unreadable input) and an operating-system
failure to write (a full disk, a quota, a read-only or forbidden output folder) are printed as
one line naming the file, the key or the path, with exit status 2; any other exception is a bug
and keeps its traceback. Every command checks its manifest and its output folder before doing
any work (`curation.preflight`), so a mistake shows in about a second, before Ray or a model
starts.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from curation import signals
from curation.atomic import STORAGE_ERRNOS, errno_of
from curation.errors import CurationError



def whole(low: int, high: int | None = None, *, unset: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number from `low` (to `high`), or `unset`, the value that
    means "not given". Every number a command takes is declared with its range, so one it
    cannot use (`--save-steps 0`, `--limit -3`) is refused in argparse's line before any work,
    not found as a traceback or quietly taken as another setting."""
    wanted = f"a whole number ≥ {low}" if high is None else f"a whole number from {low} to {high}"
    wanted += f" (or {unset})" if unset is not None else ""

    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or (value != unset and not (low <= value and (high is None or value <= high))):
            raise argparse.ArgumentTypeError(f"{wanted} is wanted, got {text!r}")
        return value

    return whole_number


def number(*, above: float | None = None, low: float | None = None, below: float | None = None) -> Callable[[str], float]:
    """`whole`'s counterpart for a real number: above (>) or from (≥) a bound, and below one."""
    wanted = " and ".join(f"{sign} {bound:g}" for sign, bound in ((">", above), ("≥", low), ("<", below)) if bound is not None)

    def real_number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (value == value and (above is None or value > above) and (low is None or value >= low) and (below is None or value < below)):
            raise argparse.ArgumentTypeError(f"a number {wanted} is wanted, got {text!r}")
        return value

    return real_number


def _demo_archive(args: argparse.Namespace) -> None:
    from curation.demo import write_demo_archive
    from curation.preflight import writable_folder

    writable_folder(args.dir, "DIR")
    args.output_path = Path(args.dir)
    s = write_demo_archive(Path(args.dir), cases=args.cases, seed=args.seed, ct_cases=args.ct, brain_cases=args.brain,
                           cxr_images=args.cxr, distinct=args.distinct, jobs=args.jobs, ct_size=args.ct_size)
    print(
        f"demo archive written to {args.dir}: {s['ct']['patients']} CT patients ({s['ct']['files']} DICOM files), "
        f"{s['brain']['cases']} brain MRI cases, {s['cxr']['images']} chest X-rays; ground truth in {s['ground_truth']}"
    )


def _checked(args: argparse.Namespace, *, rows: bool, outputs: bool = True, experts: str = "describe") -> Any:
    """The command's manifest, loaded and checked (`curation.preflight`) before any work."""
    from curation.manifest import load_manifest
    from curation.preflight import preflight
    from curation.store.layout import Layout

    spec = load_manifest(args.manifest)
    if outputs:
        args.output_path = Layout.of(spec, getattr(args, "out", None)).out
    preflight(spec, args.manifest, out=getattr(args, "out", None), rows=rows, outputs=outputs, experts=experts)  # type: ignore[arg-type]
    return spec


def _index(args: argparse.Namespace) -> None:
    from curation.ingest.lean import keep_out_unused

    keep_out_unused()
    spec = _checked(args, rows=False)
    from curation.ingest.index import scan_to_files
    from curation.ingest.runners import LocalRunner
    from curation.store.layout import Layout

    layout = Layout.of(spec, args.out)
    layout.mark_internal()
    runner = LocalRunner(args.workers)
    try:
        summary = scan_to_files(spec, layout.index, layout.ledger, runner)
    finally:
        runner.close()
    print(summary.text())
    print(f"wrote {layout.index} and {layout.ledger}")


def _convert(args: argparse.Namespace) -> None:
    from curation.ingest.lean import keep_out_unused
    from curation.preflight import writable_folder

    keep_out_unused()
    spec = _checked(args, rows=False, outputs=False)
    out = Path(args.out)
    writable_folder(out, "--out")
    from curation.ingest.convert import convert

    result = convert(spec, out, compress=not args.uncompressed)
    print(f"wrote {len(result.written)} NIfTI files and index.parquet to {out}")
    for entry in result.failed:
        print(f"  set aside: {entry.uri}: {entry.reason}")


def _delegate(target: str, check: Callable[[argparse.Namespace], None] | None = None) -> Callable[[argparse.Namespace], Any]:
    """Run `module:function(args)`, importing the module only when its command runs (Ray,
    transformers and torch are heavy; `m3-curate index` should not pay for them). `check` runs
    first: the command's mistakes show before the heavy imports."""

    def run(args: argparse.Namespace) -> Any:
        import importlib

        if check is not None:
            check(args)
        module, _, function = target.partition(":")
        return getattr(importlib.import_module(module), function)(args)

    return run


def _check_build(args: argparse.Namespace) -> None:
    _checked(args, rows=True, experts="cached_or_build")


def _check_render(args: argparse.Namespace) -> None:
    _checked(args, rows=True, experts="cached")


def _check_preview(args: argparse.Namespace) -> None:
    from curation.preflight import writable_file

    _checked(args, rows=False)  # the tasks are checked by preview itself: --template needs none
    writable_file(args.html, "--html")


def _check_out(key: str = "out", what: str = "--out", file: bool = False, data: str = "data") -> Callable[[argparse.Namespace], None]:
    def check(args: argparse.Namespace) -> None:
        from curation.preflight import writable_file, writable_folder

        path = getattr(args, key)
        if path is not None:
            args.output_path = Path(path)
            (writable_file if file else writable_folder)(path, what)
            _outside_the_dataset(Path(path), getattr(args, data, None), what)

    return check


def _outside_the_dataset(path: Path, data: str | None, what: str) -> None:
    """An output inside the shards it is made from, or inside the build's `dataset/` that holds
    them, would be deleted by the next build (which replaces that folder whole), and would be
    shared with the dataset."""
    from curation.store.layout import shards_root

    if data is None:
        return
    try:
        shards = shards_root(data).resolve()
    except CurationError:
        return  # no shards there: the command says so
    dataset = shards.parent if (shards.parent / "dataset_card.json").is_file() else shards
    if path.resolve().is_relative_to(dataset):
        raise CurationError(f"{what} {path} is inside {dataset}, the dataset it reads: the next build replaces that folder whole, "
                            "and it is the folder shared; write elsewhere")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default where the help does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default is not None and action.default is not False and action.default != argparse.SUPPRESS
        if action.option_strings and shown and "%(default)" not in text and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _verbosity(p: argparse.ArgumentParser, default: object) -> argparse.ArgumentParser:
    """-q / -v. The main parser has them with their defaults, each subcommand again with
    SUPPRESS (a subcommand not given them leaves what the main parser read), so they work
    before or after the subcommand."""
    p.add_argument("-q", "--quiet", action="store_true", default=default,
                   help="print only warnings, errors and the result (no progress, default: off)")
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="print debug messages too (default: off)")
    return p


def parser() -> argparse.ArgumentParser:
    common = _verbosity(argparse.ArgumentParser(add_help=False), argparse.SUPPRESS)
    p = _verbosity(argparse.ArgumentParser(prog="m3-curate", description="Build expert-augmented instruction data for medical VLMs.",
                                           formatter_class=_Formatter), False)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, line: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=line, description=line, formatter_class=_Formatter, parents=[common])

    s = command("demo-archive", "write a synthetic archive with ground truth (CT DICOM, brain MRI NIfTI, chest X-rays)")
    s.add_argument("dir", help="the folder to write")
    s.add_argument("--cases", type=whole(1), default=4, help="patients per modality")
    s.add_argument("--seed", type=whole(0), default=0, help="the same seed gives the same bytes")
    s.add_argument("--ct", type=whole(1), help="CT patients (default: --cases)")
    s.add_argument("--brain", type=whole(1), help="brain MRI cases (default: --cases)")
    s.add_argument("--cxr", type=whole(1), help="chest X-rays (default: 8 per case, at least 16)")
    s.add_argument("--distinct", type=whole(1),
                   help="draw at most this many cases per kind (16x for X-rays) and copy the rest under new identities: large archives in minutes (default: draw every case)")
    s.add_argument("--jobs", type=whole(1), default=1, help="processes drawing cases")
    s.add_argument("--ct-size", choices=["demo", "full"], default="demo", help="full: CT at 512x512 with 500 slices")
    s.set_defaults(run=_demo_archive)

    s = command("index", "discover items: internal/index.parquet and internal/ledger.parquet")
    s.add_argument("manifest", help="the build's manifest (YAML)")
    s.add_argument("--out", help="output folder (default: the manifest's output.dir)")
    s.add_argument("--workers", type=whole(1), help="processes reading headers (default: the CPUs this process may use, a container's quota counted)")
    s.set_defaults(run=_index)

    s = command("convert", "write every indexed item as NIfTI (RAS, CT in HU): what the experts see")
    s.add_argument("manifest", help="the build's manifest (YAML)")
    s.add_argument("--out", required=True, help="folder for <item_id>.nii.gz, index.parquet and ledger.parquet")
    s.add_argument("--uncompressed", action="store_true", help="write .nii instead of .nii.gz (default: compressed)")
    s.set_defaults(run=_convert)

    s = command("build", "the whole pipeline on Ray: index, experts, render, shards, dataset card")
    s.add_argument("manifest", help="the build's manifest (YAML)")
    s.add_argument("--out", help="output folder (default: the manifest's output.dir)")
    s.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray started for this build)")
    s.add_argument("--limit", type=whole(1), help="use only the first N items, for a quick try (default: all)")
    s.add_argument("--force", action="store_true", help="let --limit replace a complete build in --out (default: refuse)")
    s.set_defaults(run=_delegate("curation.build.pipeline:build_command", _check_build))

    s = command("render", "rebuild every shard from cached findings only (no expert runs, no Ray)")
    s.add_argument("manifest", help="the build's manifest (YAML)")
    s.add_argument("--out", help="output folder of the build whose cache to use (default: the manifest's output.dir)")
    s.set_defaults(run=_delegate("curation.build.pipeline:render_command", _check_render))

    s = command("preview", "an HTML gallery of rendered samples for template tuning; --watch serves it live")
    s.add_argument("manifest", help="the build's manifest (YAML)")
    which = s.add_mutually_exclusive_group()
    which.add_argument("--task", help="one task of the manifest, by its template path (default: every task)")
    which.add_argument("--template", help="a template file no task names yet, tried on the manifest's items (default: none)")
    s.add_argument("-n", type=whole(1), default=8, help="samples per task")
    s.add_argument("--html", required=True, help="the page to write")
    s.add_argument("--out", help="output folder whose cache to use (default: the manifest's output.dir)")
    s.add_argument("--watch", action="store_true",
                   help="serve the page on 127.0.0.1, re-render when a template or phrasing file changes (default: write once)")
    s.add_argument("--port", type=whole(0, 65535), default=0, help="port for --watch (0: any free port)")
    s.set_defaults(run=_delegate("curation.preview:preview_command", _check_preview))

    s = command("audit", "check every row of a build against its meta, pictures and findings (grounding); exit 1 if any fails")
    s.add_argument("out", help="a build's output folder, its dataset/ folder or dataset/data/")
    s.set_defaults(run=_delegate("curation.audit:audit_command"))

    s = command("export", "export shards for other trainers (LLaVA/VILA JSON plus image files)")
    s.add_argument("format", choices=["llava"], help="llava: VILA/LLaVA JSON plus image files")
    s.add_argument("shards", help="a build's output folder, its dataset/ folder or dataset/data/")
    s.add_argument("out", help="folder for <split>.json and images/")
    s.add_argument("--layout", choices=["vila", "llava-next"], default="vila",
                   help="vila: `image` for one picture, `images` for several (what VILA-M3's pinned VILA reads); "
                        "llava-next: `image` always a list (LLaVA-NeXT, VILA's LLaVANextDataset)")
    s.set_defaults(run=_delegate("curation.export:export_command", _check_out("out", "OUT", data="shards")))

    s = command("finetune", "stage-4 fine-tuning on shards")
    s.add_argument("--data", required=True, help="a build's output folder, its dataset/ folder or dataset/data/")
    s.add_argument("--model", required=True, help="a local image-text-to-text model folder, or 'tiny'")
    s.add_argument("--out", required=True, help="folder for checkpoints and the trained model")
    s.add_argument("--epochs", type=number(above=0), default=1.0, help="passes over the training split")
    s.add_argument("--lr", type=number(above=0), help="peak learning rate (default: 2e-5, VILA-M3's for full tuning; 2e-4 with --lora; 1e-3 for --model tiny)")
    s.add_argument("--batch-size", type=whole(1), default=1, help="rows per device step")
    s.add_argument("--grad-accum", type=whole(1), default=1, help="steps accumulated per optimizer step")
    s.add_argument("--max-steps", type=whole(1, unset=-1), default=-1, help="stop after N optimizer steps (-1: run the epochs)")
    s.add_argument("--warmup-ratio", type=number(low=0, below=1), default=0.03, help="share of the steps spent warming up the learning rate")
    s.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) instead of all weights (default: all weights)")
    s.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out (default: start afresh)")
    s.add_argument("--workers", type=whole(0), default=0, help="Ray Train workers (0: train in this process)")
    s.add_argument("--use-gpu", action="store_true", help="one GPU per Ray Train worker (default: CPU)")
    s.add_argument("--seed", type=whole(0), default=0, help="seed of shuffling and initialisation")
    s.add_argument("--lora-rank", type=whole(1), default=16, help="LoRA rank r (alpha is 2r)")
    s.add_argument("--max-length", type=whole(1), help="set aside rows longer than this many tokens (default: the model's context)")
    s.add_argument("--save-steps", type=whole(1), default=500, help="checkpoint every N optimizer steps, and after each epoch")
    s.add_argument("--log-steps", type=whole(1), default=10, help="log the loss every N optimizer steps")
    s.add_argument("--shuffle-buffer", type=whole(1), default=256, help="rows held for shuffling")
    s.add_argument("--num-workers", type=whole(0), default=0, help="DataLoader processes preparing batches")
    s.add_argument("--cpu-threads", type=whole(1), help="torch threads when training on CPU (default: the idle CPUs this process may use)")
    s.add_argument("--address", help="Ray cluster address for --workers (default: RAY_ADDRESS, else a local Ray)")
    s.set_defaults(run=_delegate("curation.finetune:finetune_command", _check_out()))

    s = command("eval", "held-out metrics of a fine-tuned model as JSON")
    s.add_argument("--model", required=True, help="a model folder (finetune's --out)")
    s.add_argument("--data", required=True, help="a build's output folder, its dataset/ folder or dataset/data/")
    s.add_argument("--split", default="test", help="the split to evaluate")
    s.add_argument("--out", help="write the JSON here as well as to stdout (default: stdout only)")
    s.add_argument("--limit", type=whole(1), help="evaluate at most N rows (default: all)")
    s.add_argument("--max-new-tokens", type=whole(1), default=48, help="tokens generated per answer at most")
    s.add_argument("--batch-size", type=whole(1), default=8, help="prompts generated together, left-padded")
    s.add_argument("--cpu-threads", type=whole(1), help="torch threads when running on CPU (default: the idle CPUs this process may use)")
    s.set_defaults(run=_delegate("curation.finetune.evaluate:eval_command", _check_out(file=True)))
    return p


def write_failure(e: OSError, args: argparse.Namespace) -> str | None:
    """One line for an OS-level write failure (full disk, quota, read-only or forbidden output),
    naming the path: the file when the error carries it (Python's own I/O), else the command's
    output (pyarrow's errors carry none). None for any other OSError: a bug keeps its traceback."""
    code = errno_of(e)
    if code not in STORAGE_ERRNOS:
        return None
    reason = os.strerror(code)
    if e.filename is not None:
        return f"{e.filename}: {reason}"
    where = getattr(args, "output_path", None)
    return f"{where}: {reason} (while writing there)" if where is not None else f"a write failed: {reason}"


def run() -> NoReturn:
    """The `m3-curate` command and `python -m curation`: `main`, then the process ends
    without tearing its modules down one by one. After a command that imported MONAI and
    torch (a build reading bundles, `finetune`, `eval`) that teardown took 1.5–1.8 s and does
    nothing a user needs: by then every file is written and closed. The exit handlers still
    run (logging flushed, an open Ray session shut down, temporary folders removed); an
    exception that escapes `main` (a bug) ends the process the usual way, with its
    traceback."""
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`)
            pass
    atexit._run_exitfuncs()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    signals.stop_on_sigterm()
    try:
        code = args.run(args)
    except CurationError as e:
        print(f"m3-curate: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        line = write_failure(e, args)
        if line is None:
            raise
        print(f"m3-curate: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return signals.report_stop("m3-curate")
    return code if isinstance(code, int) else 0
