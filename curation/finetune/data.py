"""Shards in, model batches out: a streaming reader and a chat-template collator.

Reading never loads a split into memory: `ShardStream` walks Parquet row groups (the unit of
work; only their metadata is read up front), shuffles their order per epoch with the seed,
splits them across training processes, reads each with `iter_batches` (only the columns
training needs) and passes rows through a bounded shuffle buffer. The mixture is taken as
written: the build already repeated rows by task weight, so every row counts once per epoch.

`ChatCollator` turns rows into a batch with the model's own processor: the processor's chat
template applied to `messages` with the row's PNGs in its image parts, and labels that are
-100 everywhere except on assistant tokens.
"""

from __future__ import annotations

import io
import logging
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from PIL import Image

from curation.errors import CurationError
from curation.store.layout import shard_files

log = logging.getLogger(__name__)

TRAIN_COLUMNS = ["id", "task", "messages", "images"]
IGNORE = -100


def count_rows(files: Sequence[Path]) -> int:
    """Rows in `files`, from the Parquet footers alone."""
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def iter_rows(files: Sequence[Path], *, columns: Sequence[str] | None = None, limit: int | None = None, batch_rows: int = 64) -> Iterator[dict[str, Any]]:
    """Rows of `files` in order, as dicts, a record batch at a time."""
    n = 0
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=list(columns) if columns else None):
            for row in batch.to_pylist():
                if limit is not None and n >= limit:
                    return
                n += 1
                yield row


@dataclass(frozen=True, slots=True)
class _Unit:
    file: Path
    row_group: int
    rows: int


class ShardStream(torch.utils.data.IterableDataset):
    """Endless, deterministic stream of collated batches over one split's shards.

    Epoch `e` visits every row group once, in an order drawn from `(seed, e)`; rows pass
    through a shuffle buffer of `shuffle_buffer` rows. With `world_size` processes, each takes
    every `world_size`-th row group (or, with fewer row groups than processes, every
    `world_size`-th row). `skip_batches` replays the stream without collating up to where a
    checkpoint stopped, so a resumed run sees the same batches as an uninterrupted one. Under a
    `DataLoader` with workers, worker `w` collates batches `skip_batches + w`,
    `skip_batches + w + num_workers`, … so their round-robin order is the single-process one.
    """

    def __init__(
        self,
        files: Sequence[Path],
        *,
        collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
        batch_size: int,
        seed: int = 0,
        shuffle_buffer: int = 256,
        rank: int = 0,
        world_size: int = 1,
        skip_batches: int = 0,
        columns: Sequence[str] = TRAIN_COLUMNS,
    ):
        if batch_size < 1:
            raise CurationError(f"--batch-size {batch_size}: must be at least 1")
        self.units = [
            _Unit(Path(f), g, meta.row_group(g).num_rows)
            for f in files
            for meta in [pq.ParquetFile(f).metadata]
            for g in range(meta.num_row_groups)
        ]
        if not any(u.rows for u in self.units):
            raise CurationError(f"{Path(files[0]).parent if files else 'shards'}: the shards hold no rows")
        self.collate, self.batch_size, self.seed = collate, batch_size, seed
        self.shuffle_buffer, self.rank, self.world_size = max(1, shuffle_buffer), rank, world_size
        self.skip_batches, self.columns = skip_batches, list(columns)

    def epoch_units(self, epoch: int) -> list[_Unit]:
        """The row groups this process reads in `epoch`, in order (all of them when there
        are fewer row groups than processes: then rows are split instead)."""
        order = list(self.units)
        random.Random(f"{self.seed}:{epoch}:units").shuffle(order)
        return order if len(order) < self.world_size else order[self.rank :: self.world_size]

    def rows(self) -> Iterator[dict[str, Any]]:
        """This process's rows, epoch after epoch, without end."""
        epoch = 0
        by_row = len(self.units) < self.world_size
        while True:
            mine = self.epoch_units(epoch)
            rng = random.Random(f"{self.seed}:{epoch}:rows:{self.rank}")
            buffer: list[dict[str, Any]] = []
            k = 0
            for unit in mine:
                pf = pq.ParquetFile(unit.file)
                for batch in pf.iter_batches(batch_size=64, row_groups=[unit.row_group], columns=self.columns):
                    for row in batch.to_pylist():
                        k += 1
                        if by_row and (k - 1) % self.world_size != self.rank:
                            continue
                        if len(buffer) < self.shuffle_buffer:
                            buffer.append(row)
                            continue
                        j = rng.randrange(len(buffer))
                        buffer[j], row = row, buffer[j]
                        yield row
            rng.shuffle(buffer)
            yield from buffer
            epoch += 1

    def raw_batches(self) -> Iterator[list[dict[str, Any]]]:
        rows = self.rows()
        while True:
            yield [next(rows) for _ in range(self.batch_size)]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        for n, batch in enumerate(self.raw_batches()):
            if n >= self.skip_batches and (n - self.skip_batches) % workers == worker:
                yield self.collate(batch)


def row_to_chat(row: dict[str, Any]) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """The row's `messages` with its PNGs placed in the image parts (the form processors'
    `apply_chat_template` reads), and the images in order."""
    images = [Image.open(io.BytesIO(im["bytes"])).convert("RGB") for im in row.get("images") or []]
    messages, k = [], 0
    for message in row["messages"]:
        parts = []
        for part in message["content"]:
            if part["type"] == "image":
                if k >= len(images):
                    break
                parts.append({"type": "image", "image": images[k]})
                k += 1
            else:
                parts.append({"type": part["type"], "text": part.get("text") or ""})
        messages.append({"role": message["role"], "content": parts})
    if k != len(images) or sum(p["type"] == "image" for m in row["messages"] for p in m["content"]) != len(images):
        raise CurationError(f"row {row.get('id')}: {len(images)} images but a different number of image parts in messages")
    return messages, images


_GENERATION = re.compile(r"{%-?\s*generation\s*-?%}")


def has_generation_markers(processor: Any) -> bool:
    template = processor.chat_template
    if isinstance(template, dict):
        template = template.get("default", "")
    return bool(template and _GENERATION.search(template))


def assistant_char_spans(processor: Any, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """For chat templates without `{% generation %}`: the rendered text and the character span
    of each assistant turn, found by rendering each prefix of the conversation (the span of
    turn i is what rendering turn i adds after the generation prompt)."""
    render = processor.apply_chat_template
    full = render(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = render(messages[: i + 1], tokenize=False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise CurationError(
                "the model's chat template renders a conversation differently from its prefixes, so assistant turns "
                "cannot be located; give the processor a chat template that wraps assistant turns in {% generation %}"
            )
        spans.append((len(before), len(upto.rstrip())))  # not the template's trailing whitespace
    return full, spans


def _mask_from_offsets(offsets: Sequence[Sequence[int]], spans: list[tuple[int, int]], replacements: Sequence[dict]) -> list[int]:
    """Tokens overlapping an assistant span (character spans moved past expanded image tokens,
    as transformers does for `{% generation %}` masks)."""
    import bisect

    ends = [r["span"][1] for r in replacements]
    gained = [0] + [r["new_span"][1] - r["span"][1] for r in replacements]
    mask = [0] * len(offsets)
    for span in spans:
        lo, hi = (c + gained[bisect.bisect_right(ends, c)] for c in span)
        for pos, (a, b) in enumerate(offsets):
            if a < hi and b > lo:
                mask[pos] = 1
    return mask


class ChatCollator:
    """Rows → `input_ids`, `attention_mask`, pixel inputs and `labels` (assistant tokens only).

    Uses the processor's chat template. When the template marks assistant turns with
    `{% generation %}` the processor's own assistant mask is used; otherwise assistant turns
    are located by rendering prefixes. Rows longer than `max_length` tokens are dropped (and
    counted in `dropped`) rather than cut, so no image loses its tokens.
    """

    def __init__(self, processor: Any, *, max_length: int | None = None, assistant_only: bool = True):
        self.processor, self.max_length, self.assistant_only = processor, max_length, assistant_only
        self.native_mask = has_generation_markers(processor)
        self.dropped = 0

    def _encode(self, chats: list[list[dict[str, Any]]], images: list[list[Image.Image]]) -> dict[str, Any]:
        kwargs = {"padding": True, "padding_side": "right"}
        if self.native_mask or not self.assistant_only:
            out = self.processor.apply_chat_template(
                chats, tokenize=True, return_dict=True, return_tensors="pt",
                return_assistant_tokens_mask=self.assistant_only, processor_kwargs=kwargs,
            )
            return dict(out)
        rendered = [assistant_char_spans(self.processor, chat) for chat in chats]
        out = self.processor(
            text=[text for text, _ in rendered],
            images=images if any(images) else None,
            return_offsets_mapping=True,
            return_text_replacement_offsets=True,
            add_special_tokens=not any(
                self.processor.tokenizer.bos_token and text.startswith(self.processor.tokenizer.bos_token) for text, _ in rendered
            ),
            return_tensors="pt",
            **kwargs,
        )
        offsets = out.pop("offset_mapping").tolist()
        replacements = out.pop("text_replacement_offsets", None) or [[] for _ in chats]
        out = dict(out)
        out["assistant_masks"] = torch.tensor([_mask_from_offsets(o, spans, r) for o, (_, spans), r in zip(offsets, rendered, replacements)])
        return out

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        converted = [row_to_chat(row) for row in rows]
        out = self._encode([c for c, _ in converted], [i for _, i in converted])
        if self.max_length is not None:
            lengths = out["attention_mask"].sum(dim=1).tolist()
            keep = [i for i, n in enumerate(lengths) if n <= self.max_length]
            if len(keep) < len(rows):
                self.dropped += len(rows) - len(keep)
                log.warning("dropped %d row(s) longer than --max-length %d tokens", len(rows) - len(keep), self.max_length)
                if not keep:
                    return {}
                converted = [converted[i] for i in keep]
                out = self._encode([c for c, _ in converted], [i for _, i in converted])
        labels = out["input_ids"].clone()
        labels[out["attention_mask"] == 0] = IGNORE
        mask = out.pop("assistant_masks", None)
        if self.assistant_only:
            labels[torch.as_tensor(mask) == 0] = IGNORE
        out["labels"] = labels
        return out
