"""The dataset card people read: `OUT/dataset/README.md`, a Hugging Face dataset card.

Its YAML front matter is what the Hub and `datasets.load_dataset(OUT/dataset)` read: `configs`
(one split per folder of shards), `dataset_info.features` (from the row schema, `images` as a
list of `Image`) and the split sizes; the licence is the manifest's `license` (the build cannot
know an archive's terms). The text below it says what the rows are, how many of each, which
experts made them (with fingerprints), how the splits were drawn and what was set aside.

It is made from the JSON card alone (`dataset_card.json`), whose manifest and reasons are
already the public forms (`curation.store.public`), so the README can name nothing the card
does not. It holds no timing and no cache counts, so the same manifest, inputs and code give the
same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml

from curation.rows import ROW_SCHEMA
from curation.store.hf import hf_yaml_features
from curation.atomic import write_text
from curation.store.layout import SHARD_GLOB, Layout

SIZES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
         (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]
SET_ASIDE_SHOWN = 10


def size_category(rows: int) -> str:
    """The Hub's `size_categories` value for a row count.

    >>> size_category(436), size_category(12_000)
    ('n<1K', '10K<n<100K')
    """
    return next((name for bound, name in SIZES if rows < bound), "n>1B")


def front_matter(card: dict[str, Any], schema: pa.Schema = ROW_SCHEMA) -> dict[str, Any]:
    """The card's YAML metadata: licence, configs with the split files, features, splits."""
    splits = sorted({Path(f).parent.name for f in card["counts"]["shards"]["files"]})
    by_split = card["counts"]["rows"]["by_split"]
    sizes = card["counts"]["shards"].get("bytes_by_split", {})
    manifest = card.get("manifest", {})
    meta: dict[str, Any] = {
        "pretty_name": card["name"],
        "license": manifest.get("license", "other"),
        "language": ["en"],
        "task_categories": ["image-text-to-text", "visual-question-answering"],
        "tags": ["medical", "radiology", "tool-use", "vila-m3", "m3-curate"],
        "size_categories": [size_category(card["counts"]["rows"]["total"])],
    }
    if splits:  # a build that wrote no row has no data files to configure
        meta["configs"] = [{"config_name": "default",
                            "data_files": [{"split": s, "path": f"data/{s}/{SHARD_GLOB}"} for s in splits]}]
    meta["dataset_info"] = {"features": hf_yaml_features(schema),
                            "splits": [{"name": s, "num_bytes": sizes.get(s, 0), "num_examples": by_split.get(s, 0)} for s in splits]}
    return meta


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _split_rule(split: dict[str, Any]) -> str:
    val, test = split.get("val", 0), split.get("test", 0)
    return (f"Rows are split by patient: a keyed hash of each patient's pseudonymous key puts the patient's "
            f"every item in one split (about {val:.0%} validation, {test:.0%} test, the rest train), so no "
            "patient is in two splits.")


def body(card: dict[str, Any]) -> str:
    """The readable part: what, how many, made how, set aside why, how to load."""
    c, m = card["counts"], card.get("manifest", {})
    rows_by_task = c["rows"]["by_task"]
    tasks = [[f"`{t['template']}`", t["source"], t.get("expert") or "none", ", ".join(a for a in t.get("args", []) if a) or "–",
              t.get("weight", 1), rows_by_task.get(t["template"], 0)] for t in m.get("tasks", [])]
    experts = [[name, e["runner"], f"`{e['fingerprint']}`"] for name, e in card["experts"].items()]
    splits = [[s, n, c["items"]["by_split"].get(s, 0), c["patients"]["by_split"].get(s, 0)] for s, n in c["rows"]["by_split"].items()]
    f = c["files"]
    set_aside = list(c["set_aside"].items())
    aside = "\n".join(f"- {n} × {reason}" for reason, n in set_aside[:SET_ASIDE_SHOWN]) or "- none"
    if len(set_aside) > SET_ASIDE_SHOWN:
        aside += f"\n- … {len(set_aside) - SET_ASIDE_SHOWN} more reasons in `dataset_card.json`"
    prov = card["provenance"]
    parts = [
        f"# {card['name']}",
        m.get("description") or ("Instruction-tuning conversations for a medical vision-language model that calls expert "
                                 "models (VILA-M3 stage 4), made by m3-curate from an imaging archive."),
        "## Contents",
        f"{c['rows']['total']} conversations (rows) from {c['items']['used']} imaging items. Each row is one conversation in "
        "the multimodal chat format of transformers/TRL (`messages`), its pictures as PNG (`images`, in the order of the "
        "image parts), the expert's findings the conversation was made from (`findings`, JSON) and its provenance.",
        _table(["split", "rows", "items", "patients"], splits),
        _table(["template", "source", "expert", "arguments", "weight", "rows"], tasks),
        "Rows by modality: " + ", ".join(f"{k} {v}" for k, v in c["rows"]["by_modality"].items()) + ".",
        "## Experts",
        "The conversations teach a model to call these experts and answer from what they return. A fingerprint identifies "
        "the weights, configuration and code of an expert.",
        _table(["expert", "runner", "fingerprint"], experts),
        "## Splits",
        _split_rule(m.get("split", {})),
        "## How it was made",
        f"m3-curate {prov['code_version']} from a manifest with hash `{prov['manifest_hash']}`: the archive was indexed, "
        "the experts ran on every item, Jinja templates turned each item's findings into conversations, and every "
        "conversation was written to Parquet. `dataset_card.json` beside this file holds the full accounts, the "
        "template hashes and the manifest (without paths or secrets).",
        f"Files discovered: {f['discovered']} = {f['used']} used + {f['skipped']} skipped + {f['quarantined']} quarantined. "
        "Conversations set aside, by reason:",
        aside,
        "## Privacy",
        "Items and patients appear only as keyed pseudonymous hashes (`item_id`, `patient_key`); no header value, file "
        "name or folder name of the archive is in this folder. The pictures are rendered from the voxels, not copied "
        "from source files.",
        "## Loading",
        "```python\nimport datasets\nds = datasets.load_dataset(\"path/to/this/folder\", split=\"train\")  # images as PIL images\n"
        "ds[0][\"messages\"]  # → processor.apply_chat_template(...)\n```",
        "Every page of the Parquet files carries a CRC32 of its bytes. `datasets` does not check them; "
        "`pyarrow.parquet.ParquetFile(path, page_checksum_verification=True)` does, and so do `m3-curate finetune`, "
        "`eval`, `export` and `audit`: a file changed on disk stops the reader instead of giving other text or pixels.",
        "## Licence",
        f"`{m.get('license', 'other')}`, as the build's manifest declares it.",
    ]
    return "\n\n".join(parts) + "\n"


def dataset_readme(card: dict[str, Any], schema: pa.Schema = ROW_SCHEMA) -> str:
    """The whole README.md: YAML front matter, then the text."""
    meta = yaml.safe_dump(front_matter(card, schema), sort_keys=False, allow_unicode=True)
    return f"---\n{meta}---\n\n{body(card)}"


def write_dataset_card(card: dict[str, Any], layout: Layout) -> None:
    """README.md, then dataset_card.json: the JSON card is written last, as the mark of a
    finished build."""
    write_text(layout.readme, dataset_readme(card))
    write_text(layout.card, json.dumps(card, indent=1) + "\n")
