"""Rows → model batches with the model's own processor; labels on assistant turns only.

Labels are what the model must learn to write: each assistant turn through the token that
closes it in the family's template (`<|im_end|>`, `<end_of_utterance>`, `<end_of_turn>`), and
nothing else (-100 on system and user turns, image tokens and padding).

Where assistant turns are:
- a chat template that wraps them in `{% generation %}` gets transformers' assistant mask;
- the published templates of Qwen2-VL, Idefics3/SmolVLM, Gemma 3 (and most others) have no
  such markers. Then turn i is what rendering `messages[:i+1]` adds to `messages[:i]` rendered
  with the generation prompt: exactly the text the model writes when asked to answer. These
  character spans go to tokens through the tokenizer's offsets, moved past expanded image
  tokens. A span is trusted only if the prefix renderings are prefixes of the whole
  conversation and the span holds its turn's text; else the turn cannot be located.

`check_template` tries the model's template on the first rows of the split before training
and refuses it, naming the model and the reason, rather than train on the wrong tokens.

Rows set aside, never a crash mid-epoch (counted per reason in `ChatCollator.skipped`, with a
warning naming the row):
- **too long**: longer than `max_length` tokens after image expansion (the model's context
  unless `--max-length` says less). Dropped whole, not truncated: cutting would take the end of
  an answer (or its closing token) or part of an image's tokens, which the model rejects;
- **images refused**: images the processor refuses (Qwen-VL: aspect ratio over 200) or that
  cannot be decoded. Large images are not refused: each processor resizes to its own limit;
- **turn not found**: a row on which the template hides where an assistant turn is.
"""

from __future__ import annotations

import bisect
import logging
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from curation.errors import CurationError
from curation.finetune.data import row_to_chat

log = logging.getLogger(__name__)

IGNORE = -100
TOO_LONG, IMAGES, NOT_FOUND = "too long", "images refused", "turn not found"
_GENERATION = re.compile(r"{%-?\s*generation\s*-?%}")


class RowSkipped(Exception):
    """A row that cannot become a training example, and why."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind, self.detail = kind, detail


def _row_error_types() -> tuple[type[BaseException], ...]:
    from jinja2 import TemplateError

    return (ValueError, OSError, Image.DecompressionBombError, TemplateError, CurationError)


def has_generation_markers(processor: Any) -> bool:
    template = processor.chat_template
    if isinstance(template, dict):
        template = template.get("default", "")
    return bool(template and _GENERATION.search(template))


def _texts(message: dict[str, Any]) -> list[str]:
    return [p["text"].strip() for p in message["content"] if p["type"] == "text" and (p.get("text") or "").strip()]


def assistant_char_spans(processor: Any, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn (see the module
    docstring); `RowSkipped` when a turn cannot be located."""
    render = processor.apply_chat_template
    full = render(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = render(messages[: i + 1], tokenize=False)
        if not upto.startswith(before):
            raise RowSkipped(NOT_FOUND, f"turn {i}: the conversation up to the answer renders differently from its prompt with the generation prompt")
        if not full.startswith(upto):
            raise RowSkipped(NOT_FOUND, f"turn {i}: the template renders this turn differently once later turns follow it")
        lo, hi = len(before), len(upto.rstrip())  # not the template's whitespace after the turn
        position = lo
        for text in _texts(message):
            position = full.find(text, position, hi)
            if position < 0:
                raise RowSkipped(NOT_FOUND, f"turn {i}: its text is not inside what the template adds for it")
        spans.append((lo, hi))
    return full, spans


def _mask_from_offsets(offsets: Sequence[Sequence[int]], spans: list[tuple[int, int]], replacements: Sequence[dict]) -> list[int]:
    """Tokens overlapping an assistant span (character spans moved past expanded image tokens,
    as transformers does for `{% generation %}` masks)."""
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
    """Rows → `input_ids`, `attention_mask`, the processor's image inputs and `labels`.

    Rows that cannot be used are set aside as the module docstring says; a batch whose rows
    are all set aside is `{}`.
    """

    def __init__(self, processor: Any, *, max_length: int | None = None, assistant_only: bool = True, name: str = "the model"):
        self.processor, self.max_length, self.assistant_only, self.name = processor, max_length, assistant_only, name
        self.native_mask = has_generation_markers(processor)
        self.skipped: Counter[str] = Counter()

    @property
    def dropped(self) -> int:
        """Rows set aside so far, for every reason."""
        return sum(self.skipped.values())

    def _encode(self, chats: list[list[dict[str, Any]]], images: list[list[Image.Image]]) -> dict[str, Any]:
        kwargs = {"padding": True, "padding_side": "right"}
        if self.native_mask or not self.assistant_only:
            out = self.processor.apply_chat_template(
                chats, tokenize=True, return_dict=True, return_tensors="pt",
                return_assistant_tokens_mask=self.assistant_only, processor_kwargs=kwargs,
            )
            return dict(out)
        rendered = [assistant_char_spans(self.processor, chat) for chat in chats]
        bos = self.processor.tokenizer.bos_token
        out = self.processor(
            text=[text for text, _ in rendered], images=images if any(images) else None,
            return_offsets_mapping=True, return_text_replacement_offsets=True,
            add_special_tokens=not any(bos and text.startswith(bos) for text, _ in rendered), return_tensors="pt", **kwargs,
        )
        offsets = out.pop("offset_mapping").tolist()
        replacements = out.pop("text_replacement_offsets", None) or [[] for _ in chats]
        out = dict(out)
        masks = [_mask_from_offsets(o, spans, r) for o, (_, spans), r in zip(offsets, rendered, replacements)]
        out["assistant_masks"] = torch.tensor(masks)
        return out

    def _skip(self, row: dict[str, Any], kind: str, detail: str) -> None:
        self.skipped[kind] += 1
        log.warning("%s: row %s set aside (%s): %s", self.name, row.get("id"), kind, detail)

    def _convert(self, rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], list[dict[str, Any]], list[Image.Image]]]:
        converted = []
        for row in rows:
            try:
                converted.append((row, *row_to_chat(row)))
            except _row_error_types() as e:
                self._skip(row, IMAGES, f"{type(e).__name__}: {e}")
        return converted

    def _encode_rows(self, items: list[tuple[dict[str, Any], list, list]]) -> tuple[list, dict[str, Any]]:
        """Encode `items` together; if that fails, find and set aside the rows that fail alone."""
        try:
            return items, self._encode([c for _, c, _ in items], [i for _, _, i in items])
        except (RowSkipped, *_row_error_types()) as e:
            if len(items) == 1:
                kind, detail = (e.kind, e.detail) if isinstance(e, RowSkipped) else (IMAGES, f"{type(e).__name__}: {e}")
                self._skip(items[0][0], kind, detail)
                return [], {}
        kept = [item for item in items if self._encode_rows([item])[0]]
        return (kept, self._encode([c for _, c, _ in kept], [i for _, _, i in kept])) if kept else ([], {})

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        items, out = self._encode_rows(self._convert(rows))
        if self.max_length is not None and items:
            lengths = out["attention_mask"].sum(dim=1).tolist()
            for (row, _, _), n in zip(items, lengths):
                if n > self.max_length:
                    self._skip(row, TOO_LONG, f"{n} tokens, more than {self.max_length}")
            if any(n > self.max_length for n in lengths):
                items, out = self._encode_rows([item for item, n in zip(items, lengths) if n <= self.max_length])
        if not items:
            return {}
        labels = out["input_ids"].clone()
        labels[out["attention_mask"] == 0] = IGNORE
        mask = out.pop("assistant_masks", None)
        if self.assistant_only:
            labels[torch.as_tensor(mask) == 0] = IGNORE
        out["labels"] = labels
        return out


def _squash(text: str) -> str:
    return " ".join(text.split())


def check_template(processor: Any, rows: list[dict[str, Any]], *, name: str) -> None:
    """Refuse a chat template on which assistant turns cannot be located: on each of `rows`
    the template must render, and the labelled tokens must decode to the assistant turns' text,
    in order, with no image token among them."""
    from jinja2 import TemplateError

    collator = ChatCollator(processor, name=name)
    tokenizer = processor.tokenizer
    image_ids = {i for i in (getattr(processor, "image_token_id", None), getattr(tokenizer, "image_token_id", None)) if i is not None}
    for row in rows:
        try:
            messages, images = row_to_chat(row)
            batch = collator._encode([messages], [images])
        except RowSkipped as e:
            raise CurationError(f"{name}: its chat template hides where assistant turns are (row {row.get('id')}, {e.detail}); "
                                "give the model a chat template that renders a conversation's prefixes as prefixes, or wraps "
                                "assistant turns in {% generation %}") from e
        except TemplateError as e:
            raise CurationError(f"{name}: its chat template fails on row {row.get('id')} ({type(e).__name__}: {e})") from e
        except _row_error_types():
            continue  # the row's own fault (an image): set aside in training as well
        ids = batch["input_ids"][0]
        labelled = torch.as_tensor(batch["assistant_masks"][0]).bool() & batch["attention_mask"][0].bool()
        said = _squash(tokenizer.decode(ids[labelled]))
        position = 0
        for text in (t for m in messages if m["role"] == "assistant" for t in _texts(m)):
            position = said.find(_squash(text), position)
            if position < 0:
                raise CurationError(f"{name}: the tokens its chat template marks as the assistant's do not hold the assistant's "
                                    f"text (row {row.get('id')}); training on them would teach the wrong tokens")
        if image_ids & set(ids[labelled].tolist()):
            raise CurationError(f"{name}: its chat template marks image tokens as the assistant's (row {row.get('id')})")
