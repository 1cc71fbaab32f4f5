"""The shard row: one conversation, as trainers read it (DESIGN.md "Shard row").

`Conversation` is what a template renders; the pipeline adds the row's keys, split, findings
and provenance and writes `ROW_SCHEMA` Parquet. Messages follow the multimodal chat format of
transformers/TRL: `{"role": "user", "content": [{"type": "image", "text": None},
{"type": "text", "text": "…"}]}`, one `image` part per entry of `images`, in order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 1

PART = pa.struct([("type", pa.string()), ("text", pa.string())])
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.list_(PART))])
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
PROVENANCE = pa.struct(
    [
        ("expert_fingerprint", pa.string()),
        ("template_hash", pa.string()),
        ("manifest_hash", pa.string()),
        ("code_version", pa.string()),
    ]
)

ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("dataset", pa.string()),
        ("source", pa.string()),
        ("task", pa.string()),
        ("split", pa.string()),
        ("item_id", pa.string()),
        ("patient_key", pa.string()),
        ("modality", pa.string()),
        ("expert", pa.string()),
        ("images", pa.list_(IMAGE)),
        ("messages", pa.list_(MESSAGE)),
        ("findings", pa.string()),
        ("provenance", PROVENANCE),
    ]
)


@dataclass(slots=True)
class Conversation:
    """What one template made for one (item, task, variant)."""

    messages: list[dict[str, Any]]
    images: list[bytes]
    template: str
    template_hash: str
    variant: int = 0
    expert: str | None = None  # the expert this conversation calls, if any
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. the question kind, for evaluation

    def image_parts(self) -> int:
        return sum(1 for m in self.messages for p in m["content"] if p["type"] == "image")


def row_id(item_id: str, task: str, variant: int) -> str:
    """Stable: the same item, task and variant give the same id on every build."""
    return hashlib.sha256(f"{item_id}\x1f{task}\x1f{variant}".encode()).hexdigest()[:20]
