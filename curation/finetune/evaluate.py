"""`m3-curate eval --model DIR --data DIR [--split test]`: held-out metrics as JSON.

For every assistant turn of every row of the split, the model generates with the
conversation so far as its prompt (the reference turns before it, images included), and
`scoring.TurnScorer` scores what it wrote against the row's `meta`: the call that turn must
make or no call at all, and at the answer turn the closed answer (see `curation.finetune.scoring`
for the measures, and the text heuristics used for rows without `meta`).

Cost: one generation of at most `max_new_tokens` tokens per assistant turn, so eval time
grows with the number of assistant turns in the split (not with the turns that call), times
the prompt length; prompts are generated `batch_size` at a time.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from curation.finetune.scoring import CALL_RE, TurnScorer, parse_calls

__all__ = ["CALL_RE", "TurnScorer", "eval_command", "evaluate", "generate_turns", "load_model", "parse_calls"]

log = logging.getLogger(__name__)

EVAL_COLUMNS = ["id", "task", "expert", "messages", "images", "meta"]
"""What eval reads of a row (`meta` where the shards have it)."""


def load_model(model: str | Path, cpu_threads: int | None) -> tuple[Any, Any]:
    """The model in folder `model`, on the GPU if there is one, and its processor."""
    import torch
    from transformers import AutoModelForImageTextToText

    from curation.finetune.machine import cpu_threads as threads
    from curation.finetune.model_folder import loading
    from curation.finetune.processors import load_processor

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(threads(cpu_threads))
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    with loading(model, "copy the model folder again, or give another (finetune's --out)"):
        net = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype).to(device).eval()
        processor = load_processor(model)  # without torchvision: the family's processor minus its video part
    return net, processor


def _generate(model: Any, processor: Any, prompts: list[list[dict[str, Any]]], max_new_tokens: int) -> list[str]:
    import torch

    inputs = processor.apply_chat_template(
        prompts, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        processor_kwargs={"padding": True, "padding_side": "left"},
    ).to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    return [processor.decode(seq, skip_special_tokens=True).strip() for seq in new]


def generate_turns(
    model: Any, processor: Any, rows: Iterable[dict[str, Any]], *, batch_size: int, max_new_tokens: int
) -> Iterator[tuple[dict[str, Any], int, str]]:
    """`(row, turn, prediction)` for every assistant turn of every row, in order: the model's
    answer with the messages before that turn as its prompt, `batch_size` prompts at a time."""
    from curation.finetune.data import row_to_chat

    pending: list[tuple[dict[str, Any], int, list[dict[str, Any]]]] = []
    for row in rows:
        chat, _ = row_to_chat(row)
        for turn, message in enumerate(row["messages"]):
            if message["role"] == "assistant":
                pending.append((row, turn, chat[:turn]))
        while len(pending) >= batch_size:
            batch, pending = pending[:batch_size], pending[batch_size:]
            yield from _predicted(model, processor, batch, max_new_tokens)
    if pending:
        yield from _predicted(model, processor, pending, max_new_tokens)


def _predicted(model: Any, processor: Any, batch: list[tuple[dict[str, Any], int, list[dict[str, Any]]]],
               max_new_tokens: int) -> Iterator[tuple[dict[str, Any], int, str]]:
    predictions = _generate(model, processor, [prompt for _, _, prompt in batch], max_new_tokens)
    for (row, turn, _), prediction in zip(batch, predictions):
        yield row, turn, prediction


def evaluate(
    model: str | Path,
    data: str | Path,
    *,
    split: str = "test",
    limit: int | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    cpu_threads: int | None = None,
) -> dict[str, Any]:
    """Generate on the split's rows with the model in folder `model` and score every turn."""
    from curation.finetune.data import TRAIN_COLUMNS
    from curation.store.layout import iter_rows, shard_files

    shards = shard_files(data, split, columns=TRAIN_COLUMNS)
    net, processor = load_model(model, cpu_threads)
    rows = iter_rows(shards.files, columns=EVAL_COLUMNS, limit=limit, stamps=shards.stamps)  # a shard without `expert` or `meta` is scored from its text
    t0 = time.monotonic()
    scorer = TurnScorer()
    generations = 0
    for row, turn, prediction in generate_turns(net, processor, rows, batch_size=batch_size, max_new_tokens=max_new_tokens):
        scorer.add(row, turn, prediction)
        generations += 1
    report = scorer.report()
    seconds = time.monotonic() - t0
    return {
        "model": str(model), "data": str(data), "split": split, **report,
        "generations": generations, "seconds": round(seconds, 2), "set_aside_shards": shards.set_aside,
    }


def eval_command(args: argparse.Namespace) -> None:
    """`m3-curate eval`: print the metrics JSON (and write it to `--out`)."""
    from curation.errors import CurationError

    if not (Path(args.model) / "config.json").exists():
        raise CurationError(f"--model {args.model}: not a model folder (no config.json); give finetune's --out folder")
    result = evaluate(
        args.model, args.data, split=args.split, limit=args.limit,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, cpu_threads=args.cpu_threads,
    )
    text = json.dumps(result, indent=1)
    if args.out:
        from curation.atomic import write_text

        write_text(Path(args.out), text + "\n")
    print(text)
