"""Stage-4 fine-tuning end to end on this machine: shards → tiny LLaVA → eval on the test split.

    python bench/finetune.py                       # factory shards, 500 conversations
    python bench/finetune.py --build [--cases 10] [--test 0.25]  # a real `m3-curate build` of a demo archive
    python bench/finetune.py --data OUT            # an existing build's output folder
    options: [--epochs 10] [--lr 1e-3] [--hidden-size 256] [--heads 16] [--keep DIR]

Data, by default: factory shards (`tests/shards_factory.py`: VILA-M3's conversation kinds in
ROW_SCHEMA, split by patient), where the right call follows from each question. `--build`
writes `m3-curate demo-archive --cases N` and runs `m3-curate build` over it with
`manifests/demo.yaml` (or `--manifest`), its sources pointed at that archive (a source whose
file the archive lacks is left out, and said so) and images at most 128 pixels.

Then, as `m3-curate finetune --model tiny` and `m3-curate eval` do:
  1. a tokenizer trained on the train split's text and a LLaVA of about 1.6 M parameters,
     trained from scratch (hence a learning rate far above VILA-M3's 2e-5 for a pretrained
     8B model) for `--epochs` epochs;
  2. generation on the test split, scored as `m3-curate eval` scores it.

Prints rows, parameters, training time and rows/s, first and last loss, and the test split's
scores as `m3-curate eval` computes them, every assistant turn scored: expert-selection
accuracy (overall, per expert, expert name alone), the false-call rate (turns that must not
call, where the model called) and the missed-call rate, closed-question exact match, each
task's confusion of expected against predicted calls, what the expectations came from (`meta`
or, for shards without it, the text) and eval time. Goals: expert-selection accuracy ≥ 0.95
(VILA-M3 reports 0.9987 CXR, 0.9998 VISTA3D with its real models), false calls ≤ 2 %.

`--cpu-threads 1` (the default) is much faster than PyTorch's default on a small, shared
machine: a model this small otherwise spends its time in OpenMP barriers when two threads
contend with other processes for two cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def real_build(work: Path, cases: int, seed: int, manifest: Path, test: float | None = None) -> tuple[Path, list[str]]:
    """`m3-curate demo-archive --cases N` + `m3-curate build` with `manifest` (the demo's by
    default), its sources pointed at the new archive. Returns the build folder and notes."""
    from curation.manifest import resolve_paths

    cli = [sys.executable, "-m", "curation", "-q"]
    archive, out = work / "archive", work / "build"
    shutil.rmtree(archive, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([*cli, "demo-archive", str(archive), "--cases", str(cases), "--seed", str(seed)], check=True, cwd=REPO)
    spec = yaml.safe_load(manifest.read_text())
    notes, kept = [], []
    for source in spec["sources"]:
        if source.get("kind") == "qa":
            notes.append(f"source {source['name']!r} left out: its question-answer file describes the demo archive's images, not these")
            continue
        source["root"] = str(archive / Path(source["root"]).name)  # ../data/demo/ct → ARCHIVE/ct
        kept.append(source)
    spec = resolve_paths(spec, manifest.parent.resolve())  # the copy lives elsewhere: bundles, prompts against the original
    names = {source["name"] for source in kept}
    spec["sources"] = kept
    spec["tasks"] = [task for task in spec["tasks"] if task["source"] in names]
    spec["output"] = {**spec.get("output", {}), "dir": str(out), "rows_per_shard": 200, "image_max_side": 128}
    if test is not None:  # a larger test split: more expert-selection turns to score
        spec["split"] = {**spec.get("split", {}), "test": test}
        notes.append(f"test split {test:g} of the patients")
    path = work / "manifest.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    subprocess.run([*cli, "build", str(path)], check=True, cwd=REPO)
    return out, notes


def share(block: dict, hits: str = "correct", rate: str = "accuracy") -> str:
    return f"{block[rate]:.4f} ({block[hits]}/{block['turns']})" if block["turns"] else "n/a"


def print_scores(result: dict, seconds: float) -> None:
    """The eval JSON's figures, a line each, and every task's confusion of calls."""
    sel, closed, basis = result["expert_selection"], result["closed_questions"], result["basis"]
    print(f"eval        {result['rows']} test rows, {result['generations']} assistant turns generated, in {seconds:.1f} s; "
          f"expected calls from meta in {basis['meta']} rows, from the text in {basis['text']}"
          + (f" ({', '.join(f'{k}: {n}' for k, n in basis['text_reasons'].items())})" if basis["text"] else ""))
    per_expert = ", ".join(f"{k} {share(v)}" for k, v in sel["by_expert"].items())
    print(f"expert selection accuracy   {share(sel)}; {per_expert}; goal >= 0.95")
    print(f"expert name accuracy        {sel['expert_name_accuracy']}")
    print(f"false calls                 {share(result['false_calls'], 'with_call', 'rate')} of the turns that must not call; goal <= 0.02")
    print(f"missed calls                {share(result['missed_calls'], 'without_call', 'rate')} of the turns that must call")
    print(f"decisions                   {share(result['decisions'])} (call right or rightly none, every turn)")
    kinds = ", ".join(f"{k} {share(v)}" for k, v in closed["by_kind"].items())
    print(f"closed-question exact match {closed['exact_match']} ({closed['correct']}/{closed['questions']}); {kinds}")
    for task, t in result["by_task"].items():
        print(f"  {task}: {t['rows']} rows, selection {t['selection_accuracy']}, false calls {t['false_call_rate']}")
        for expected, predicted in t["confusion"].items():
            print(f"    expected {expected:<28} → " + ", ".join(f"{p} {n}" for p, n in sorted(predicted.items(), key=lambda kv: -kv[1])))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--data", help="an existing build's output folder")
    which.add_argument("--build", action="store_true", help="build a demo archive with `m3-curate build` first")
    p.add_argument("--cases", type=int, default=10, help="demo archive cases for --build (default 10)")
    p.add_argument("--test", type=float, help="with --build: this share of the patients as the test split (default: the manifest's)")
    p.add_argument("--manifest", type=Path, default=REPO / "manifests" / "demo.yaml", help="manifest for --build (default: the demo's)")
    p.add_argument("--conversations", type=int, default=500, help="factory conversations (default 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=float, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--cpu-threads", type=int, default=1)
    p.add_argument("--keep", help="work in this folder and keep it (default: a temporary folder)")
    return p.parse_args()


def shards(args: argparse.Namespace, work: Path) -> tuple[Path, str]:
    """The shards to train and score on, and a line saying where they came from."""
    if args.data:
        return Path(args.data), f"build output {args.data}"
    if args.build:
        data, notes = real_build(work, args.cases, args.seed, args.manifest, args.test)
        return data, f"`m3-curate build {args.manifest.name}` of a {args.cases}-case demo archive" + "".join(f"; {n}" for n in notes)
    from shards_factory import write_shards

    data = work / "data"
    shutil.rmtree(data, ignore_errors=True)
    write_shards(data, conversations=args.conversations, seed=args.seed, rows_per_shard=100, row_group_size=32)
    return data, f"factory shards ({args.conversations} conversations)"


def train_tiny(args: argparse.Namespace, data: Path, out: Path) -> None:
    """Build and train the tiny LLaVA into `out`, printing what it is and how training went."""
    from transformers import AutoConfig

    from curation.finetune.train import TrainConfig, prepare, train

    shutil.rmtree(out, ignore_errors=True)
    config = TrainConfig(
        data=str(data), model="tiny", out=str(out), epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
        warmup_ratio=0.03, seed=args.seed, save_steps=10_000, log_steps=50, cpu_threads=args.cpu_threads,
        tiny={"hidden_size": args.hidden_size, "heads": args.heads},
    )
    t = time.perf_counter()
    config = prepare(config)
    t_build = time.perf_counter() - t
    t = time.perf_counter()
    summary = train(config)
    t_train = time.perf_counter() - t
    vocab = AutoConfig.from_pretrained(out).text_config.vocab_size
    print(f"model       tiny LLaVA, {summary['trainable_parameters']:,} parameters, vocabulary {vocab} (built in {t_build:.1f} s)")
    print(
        f"train       {summary['steps']} steps × {args.batch_size} rows ({args.epochs:g} epochs) in {t_train:.1f} s, "
        f"{summary['steps'] * args.batch_size / t_train:.1f} rows/s; loss {summary['losses'][0][1]:.3f} → {summary['final_loss']:.3f}"
    )


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    from curation.finetune.data import count_rows
    from curation.finetune.evaluate import evaluate
    from curation.store.layout import shard_files, shards_root

    work = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = t = time.perf_counter()
        data, origin = shards(args, work)
        splits = [s for s in ("train", "val", "test") if any((shards_root(data) / s).glob("*.parquet"))]
        print(f"data        {origin}: rows { {s: count_rows(shard_files(data, s).files) for s in splits} } ({time.perf_counter() - t:.1f} s)")
        train_tiny(args, data, work / "model")
        t = time.perf_counter()
        result = evaluate(work / "model", data, split="test", cpu_threads=args.cpu_threads)
        (work / "eval.json").write_text(json.dumps(result, indent=1))
        print_scores(result, time.perf_counter() - t)
        print(f"total       {(time.perf_counter() - t0) / 60:.1f} min")
        print(f"eval JSON   {work / 'eval.json'}" if args.keep else "eval JSON   (temporary; --keep DIR keeps it)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
