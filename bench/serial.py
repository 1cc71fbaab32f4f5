"""The serial baseline: the build's work done the way VILA-M3's data-preparation scripts do it.

    python bench/serial.py MANIFEST --out DIR [--json FILE]

One process, one item at a time: load its voxels, run each expert it needs, render each of its
conversations, write their pictures as PNG files and append the records to a JSON-lines file
(`DIR/conversations.jsonl`, LLaVA-style: `id`, `images`, `conversations`). No Ray, no cache, no
shards. Everything else is the build's own: the same manifest, index, plan (which
conversations each item makes), expert runners (set up once, on CPU or the GPU), templates and
renderer, so the items/s of `m3-curate build` over this script's on the same archive is what
the pipeline adds. A failure on an item sets it aside and the loop goes on, as a script with a
try/except around each item would.

Prints (and with `--json` writes) items, conversations, wall seconds of the whole process
(imports and index included, as for the build command) and items/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

STARTED = time.perf_counter()
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def _experts(spec: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Runners built and set up once (as a script loads its models once), and their infos."""
    import torch

    from curation.build.plan import ExpertInfo, runner_spec, spec_json
    from expert_runners.base import make_runner

    device = "cuda" if torch.cuda.is_available() else "cpu"
    runners, infos = {}, {}
    for e in spec.experts:
        runner = make_runner(runner_spec(e), image_max_side=spec.output.image_max_side)
        runner.setup(device)
        runners[e.name] = runner
        infos[e.name] = ExpertInfo(name=e.name, runner=e.runner, fingerprint=runner.fingerprint(), spec=spec_json(e),
                                   modalities=tuple(runner.modalities), kinds=tuple(runner.kinds), weights=bool(runner.weight_files()))
    return runners, infos


def _one_item(plan: Any, spec: Any, reader: Any, runners: dict[str, Any], renderer: Any, images: Path) -> list[dict[str, Any]]:
    """Load, run every expert the item needs, render its conversations: the records."""
    from curation.rows import row_id
    from expert_runners.base import ExpertInput

    item = plan.item
    volume = reader.load(item)
    labels = reader.load_labels(item) if item.label_uri else None
    inp = ExpertInput(item=item, volume=volume, labels=labels)
    findings = {(expert, arg): runners[expert].run(inp, arg) for expert, args in plan.needs(spec).items() for arg in args}
    records = []
    for c in plan.conversations:
        task = spec.tasks[c.task]
        try:
            conv = renderer.render(task, item, findings.get((task.expert, c.arg)), variant=c.variant)
        except Exception:  # noqa: BLE001  (a template that skips or fails this item: the script goes on)
            continue
        rid = row_id(item.item_id, task.template, c.variant)
        paths = []
        for k, png in enumerate(conv.images):
            (images / f"{rid}-{k}.png").write_bytes(png)
            paths.append(f"images/{rid}-{k}.png")
        turns = [{"from": "human" if m["role"] == "user" else "gpt",
                  "value": "".join("<image>" if p["type"] == "image" else p["text"] for p in m["content"])} for m in conv.messages]
        records.append({"id": rid, "images": paths, "conversations": turns})
    return records


def serial_build(manifest: Path, out: Path) -> dict[str, Any]:
    from curation.build.plan import make_plan
    from curation.ingest import readers_for
    from curation.ingest.index import build_index
    from curation.manifest import load_manifest
    from curation.render.renderer import Renderer

    spec = load_manifest(manifest)
    index = build_index(spec)
    runners, infos = _experts(spec)
    plan = make_plan(spec, index.items, infos)
    renderer, readers = Renderer(spec), readers_for(spec)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    items = rows = failed = 0
    with open(out / "conversations.jsonl", "w") as f:
        for p in plan.iter_working():
            items += 1
            try:
                records = _one_item(p, spec, readers[p.item.source], runners, renderer, images)
            except Exception:  # noqa: BLE001  (an unreadable item or a failed expert: set aside, go on)
                failed += 1
                continue
            for r in records:
                f.write(json.dumps(r) + "\n")
            rows += len(records)
    wall = time.perf_counter() - STARTED
    return {"items": items, "rows": rows, "items_failed": failed, "wall_s": wall, "items_per_s": items / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("manifest", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = ap.parse_args()
    result = serial_build(args.manifest, args.out)
    print(f"serial: {result['items']} items, {result['rows']} conversations, {result['items_failed']} items set aside, "
          f"{result['wall_s']:.1f} s, {result['items_per_s']:.2f} items/s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
