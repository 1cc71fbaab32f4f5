"""`m3-curate preview`: a static HTML page of rendered samples, for tuning templates in seconds.

    m3-curate preview MANIFEST [--task T | --template FILE] [-n N] --html FILE [--out DIR]

For each task (all of the manifest's, the one named by `--task`, or a template file that no task
names yet, `--template`), the first N items of its source are rendered: per sample the images
(overlays included) beside the turns, the meta, the findings, and the template's source once
per task. Findings come from the build's cache (`Layout.cache`: `<out>/internal/cache` or the
manifest's `output.cache`, as `m3-curate build` left it) when it has them; otherwise the
experts run here, in this process, on those items only, and the results are kept in
`<out>/internal/preview_cache` for the next preview (never in the build's cache: a build
computes its own). Template errors are shown on the page, at the sample they hit.

The page is one self-contained file (images inline as data: URIs); a line at the top counts the
images the browser loaded.
"""

from __future__ import annotations

import argparse
import base64
import functools
import html
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curation.store.cache import DamagedEntry, FindingsCache, content_hash
from curation.atomic import write_text
from curation.errors import CurationError, ItemError
from curation.ingest.index import scan_source
from curation.ingest import SourceReader, readers_for
from curation.items import StudyItem
from curation.manifest import BuildSpec, TaskSpec, load_manifest
from curation.build.plan import spec_json
from curation.expert_args import canonical_arg
from curation.expert_info import ExpertInfo
from curation.render.renderer import Renderer, TemplateError, TemplateSkip, template_roots
from curation.rows import Conversation
from curation.findings import Findings, without_timing
from curation.store.layout import Layout

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Sample:
    item: StudyItem
    variant: int
    args: str
    conversation: Conversation | None = None
    findings: Findings | None = None
    findings_from: str = ""  # "build cache", "preview cache", "expert run", ""
    findings_text: str = ""  # the findings as the page shows them (JSON, run timings left out)
    error: str = ""
    skipped: str = ""  # the template set this item aside on purpose (`skip()`), as a build counts it: not a failure
    render_ms: float = 0.0


@dataclass(slots=True)
class Section:
    task: TaskSpec
    source_text: str
    description: str
    samples: list[Sample] = field(default_factory=list)
    note: str = ""


@dataclass(slots=True)
class Page:
    """One rendering of the preview: the HTML and what it counts."""

    html: str
    conversations: int
    tasks: int
    failed: int  # samples that failed, plus tasks with no sample at all
    skipped: int = 0  # samples their template set aside on purpose

    def summary(self, path: Path, seconds: float) -> str:
        skipped = f", {self.skipped} skipped by their template" if self.skipped else ""
        return f"{path}: {self.conversations} conversation(s) from {self.tasks} task(s), {self.failed} error(s){skipped}, in {seconds:.1f} s"


def make_page(args: argparse.Namespace, *, live: bool = False, version: int = 0) -> Page:
    """Load the manifest and render the page the command's arguments ask for (`live`: for the
    `--watch` server, at `version`)."""
    spec = load_manifest(args.manifest)
    out = Path(args.out) if args.out else spec.output.dir
    sections, card = preview(spec, out=out, task=args.task, template=args.template, n=args.n)
    made = sum(1 for s in sections for x in s.samples if x.conversation is not None)
    failed = sum(1 for s in sections for x in s.samples if x.error) + sum(1 for s in sections if s.note)
    skipped = sum(1 for s in sections for x in s.samples if x.skipped)
    html = render_page(spec, sections, card, live=live, version=version)
    return Page(html=html, conversations=made, tasks=len(sections), failed=failed, skipped=skipped)


def preview_command(args: argparse.Namespace) -> int:
    """Write the page once (exit status 1 when any sample failed), or serve it live (`--watch`)."""
    if getattr(args, "watch", False):
        from curation.preview_watch import watch

        return watch(args)
    started = time.perf_counter()
    page = make_page(args)
    path = Path(args.html)
    write_text(path, page.html)
    print(page.summary(path, time.perf_counter() - started))
    return 1 if page.failed else 0


def preview(spec: BuildSpec, *, out: Path, task: str | None = None, template: str | None = None, n: int = 8) -> tuple[list[Section], str]:
    """Render up to `n` samples for each chosen task, and the model card they open with; never
    raises for one sample's error. The samples are chosen task by task (the page's order) and
    rendered item by item."""
    if n < 1:
        raise CurationError(f"-n must be at least 1, got {n}")
    layout = Layout.of(spec, out)
    build_cache = FindingsCache(layout.cache)
    renderer, tasks, experts = _tasks(spec, task, template, build_cache)
    readers = readers_for(spec)
    items: dict[str, list[StudyItem]] = {}
    sections = []
    by_item: dict[str, list[tuple[TaskSpec, Sample]]] = {}  # item id → its samples, in page order
    for t in tasks:
        d = renderer.declaration(t.template)
        section = Section(task=t, source_text=renderer.compiled(t.template).source, description=d.description)
        sections.append(section)
        if t.source not in items:
            items[t.source] = scan_source(readers[t.source])[0]
        expert = experts[t.expert] if t.expert else None
        chosen = [i for i in items[t.source] if expert is None or expert.accepts(i) is None][:n]
        if not chosen:
            section.note = f"source {t.source!r} has no item that expert {t.expert} accepts"
        variants = max(1, math.ceil(t.weight), len(t.args))
        for k, item in enumerate(chosen):
            sample = Sample(item=item, variant=k % variants, args=t.args[(k % variants) % len(t.args)])
            section.samples.append(sample)
            by_item.setdefault(item.item_id, []).append((t, sample))
    own_cache = FindingsCache(layout.preview_cache)
    for samples in by_item.values():
        item = samples[0][1].item
        _render_item(renderer, samples, _fetcher(item, readers[item.source], experts, build_cache, own_cache))
    return sections, renderer.model_card


def _render_item(renderer: Renderer, samples: list[tuple[TaskSpec, Sample]], fetch: Callable[[str, str], tuple[Findings, str]]) -> None:
    """The samples of one item, one after another (the renderer keeps what it derives from an
    item's findings while it stays on the item): each expert result they use is fetched
    (`fetch(expert, args)`), and serialised for the page, once for them all."""
    results: dict[tuple[str, str], tuple[Findings | None, str, str, str]] = {}  # (expert, args) → (findings, from, JSON, error)
    for t, sample in samples:
        item = sample.item
        if t.expert:
            key = (t.expert, sample.args)
            if key not in results:
                try:
                    findings, where = fetch(t.expert, sample.args)
                except (ItemError, CurationError) as e:
                    results[key] = (None, "", "", f"expert {t.expert}: {e}")
                else:
                    data = without_timing(renderer.findings_data(findings, item))
                    results[key] = (findings, where, json.dumps(data, indent=1), "")
            sample.findings, sample.findings_from, sample.findings_text, sample.error = results[key]
            if sample.error:
                continue
        began = time.perf_counter()
        try:
            sample.conversation = renderer.render(t, item, sample.findings, variant=sample.variant)
        except TemplateSkip as e:
            sample.skipped = str(e)
        except TemplateError as e:
            sample.error = str(e)
        sample.render_ms = (time.perf_counter() - began) * 1000


def _tasks(spec: BuildSpec, task: str | None, template: str | None, build_cache: FindingsCache) -> tuple[Renderer, list[TaskSpec], dict[str, _Expert]]:
    """The tasks to show, their experts, and a renderer that knows those experts as a build's
    does (their `ExpertInfo`: what they give, the built-in runner they derive from), so the
    page's model card and checks are the build's."""
    extra: list[Path] = []

    @functools.cache
    def expert(name: str) -> _Expert:  # one per name: the runner a template's search makes is the one that runs
        return _Expert(spec, name, build_cache)

    if template is None:
        tasks = list(spec.tasks)
        if task is not None:
            tasks = [t for t in tasks if t.template == task]
            if not tasks:
                raise CurationError(f"--task {task!r}: no task of manifest {spec.name!r} uses it (tasks: {[t.template for t in spec.tasks]})")
        if not tasks:
            raise CurationError(f"manifest {spec.name!r} has no tasks: name a template with --template FILE")
    else:
        path = Path(template).resolve()
        if not path.is_file():
            raise CurationError(f"--template: file not found: {template}")
        name = next((path.relative_to(r.resolve()).as_posix() for r in template_roots(spec) if path.is_relative_to(r.resolve())), None)
        extra = [] if name is not None else [path.parent]
        tasks = [_task_for(spec, Renderer(spec, prompt_dirs=extra), name or path.name, expert)]
    experts = {t.expert: expert(t.expert) for t in tasks if t.expert}
    infos = {name: e.describe(next(t.args for t in tasks if t.expert == name)) for name, e in experts.items()}
    renderer = Renderer(spec, experts=infos, prompt_dirs=extra)
    if template is None:
        renderer.check()
    return renderer, tasks, experts


def _task_for(spec: BuildSpec, renderer: Renderer, name: str, expert_of: Callable[[str], _Expert]) -> TaskSpec:
    """A task for a template no task names: the first source and expert its declaration fits,
    with the arguments the manifest's tasks give that expert on that source (else the declared
    ones, else none). Each expert is judged by its description (`expert_of(name).describe`)."""
    d = renderer.declaration(name)
    for source in spec.sources:
        if d.sources and source.kind not in d.sources:
            continue
        modality = getattr(source, "modality", None)
        if d.modality and modality is not None and source.kind != "dicom" and modality not in d.modality:
            continue
        if not d.uses_expert:
            return TaskSpec(template=name, source=source.name, weight=1.0)
        used = [t.expert for t in spec.tasks if t.source == source.name and t.expert]
        for expert in sorted(spec.experts, key=lambda e: (e.name not in used, used.index(e.name) if e.name in used else 0)):
            args = next((t.args for t in spec.tasks if t.source == source.name and t.expert == expert.name
                         and (d.args is None or all(a in d.args for a in t.args))), None)
            args = args or d.args or [""]
            info = expert_of(expert.name).describe(args)
            if info.gives(d.needs) is False:  # what its options give, not its class
                continue
            task = TaskSpec(template=name, source=source.name, expert=expert.name, args=args, weight=len(args))
            try:
                check = BuildSpec.model_validate({**spec.model_dump(), "tasks": [task.model_dump()]})
                Renderer(check, experts={expert.name: info}, prompt_dirs=renderer.prompt_dirs).check()
            except CurationError:
                continue
            return task
    raise CurationError(f"template {name}: no source and expert of manifest {spec.name!r} fit its declaration ({d.model_dump(exclude_defaults=True)})")


class _Expert:
    """An expert as preview sees it. When a build has run this configuration with the build
    cache, what it recorded (fingerprint, the items it takes) is used, as `m3-curate render`
    does: no runner is constructed, so no model code is imported (MONAI alone takes seconds).
    The runner is made only when a sample's findings are in neither cache."""

    def __init__(self, spec: BuildSpec, name: str, build_cache: FindingsCache):
        self.spec = next(e for e in spec.experts if e.name == name)
        self.image_max_side = spec.output.image_max_side
        recorded = [r for r in build_cache.experts() if r["spec"] == spec_json(self.spec)]
        self.info = ExpertInfo.from_json(recorded[-1]["info"]) if recorded else None
        self._runner: Any = None
        self.ready = False

    @property
    def runner(self) -> Any:
        if self._runner is None:
            from expert_runners.base import make_runner

            self._runner = make_runner(self.spec, image_max_side=self.image_max_side)
        return self._runner

    def fingerprint(self) -> str:
        return self.info.fingerprint if self.info is not None else str(self.runner.fingerprint())

    def accepts(self, item: StudyItem) -> str | None:
        return (self.info or self.runner).accepts(item)  # type: ignore[no-any-return]

    def describe(self, args: list[str]) -> ExpertInfo:
        """What the renderer needs to know of it: the build's record when it gives the
        vocabulary of every argument in `args` (a task may name one the build's tasks did not)
        or gives none (a runner that reports no names, as CXR and the picture runner: nothing
        is missing), else the runner's."""
        info = self.info
        if info is not None and (not info.vocabularies or all(canonical_arg(a) in info.vocabularies for a in args)):
            return info
        return self.runner.describe(args)  # type: ignore[no-any-return]


def _fetcher(item: StudyItem, reader: SourceReader, experts: dict[str, _Expert], build_cache: FindingsCache,
             own_cache: FindingsCache) -> Callable[[str, str], tuple[Findings, str]]:
    """`fetch(expert, args)`: an expert result of `item` (`_findings`); the item's files are
    hashed once for all its results, when the first is fetched."""
    content = functools.cache(lambda: content_hash(item, reader.root))
    return lambda name, args: _findings(reader, experts[name], item, content(), args, build_cache, own_cache)


def _findings(reader: SourceReader, expert: _Expert, item: StudyItem, content: str, args: str, build_cache: FindingsCache,
              own_cache: FindingsCache) -> tuple[Findings, str]:
    """The findings from the build's cache, preview's own, or the expert run here (and kept in
    preview's cache), and which it was."""
    fingerprint = expert.fingerprint()
    for cache, label in ((build_cache, "build cache"), (own_cache, "preview cache")):
        try:
            found = cache.get(content, fingerprint, args)
        except DamagedEntry:  # moved aside, and said: run the expert here
            found = None
        if found is not None:
            return found, label
    from expert_runners.base import ExpertInput, pick_device

    runner = expert.runner
    if not expert.ready:
        runner.setup(pick_device())
        expert.ready = True

    findings = runner.run(ExpertInput(item=item, volume=reader.load(item), labels=reader.load_labels(item)), args)
    own_cache.put(content, fingerprint, findings, args)
    return findings, "expert run"


# --- the page ----------------------------------------------------------------------------------

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 24px 48px; color: #222; background: #fafafa; }
h1 { font-size: 20px; } h2 { font-size: 17px; margin-top: 36px; border-bottom: 1px solid #bbb; }
#status { font-weight: 600; } #failed { font-weight: 600; color: #a00; }
.sample { display: grid; grid-template-columns: minmax(330px, 46%) 1fr; gap: 16px; background: #fff; border: 1px solid #ccc;
          border-radius: 6px; padding: 12px; margin: 12px 0; }
.sample.failed { border: 2px solid #a00; }
.pictures { display: flex; flex-wrap: wrap; gap: 8px; align-content: flex-start; }
.pictures .small { flex-basis: 100%; }
.pictures figure { margin: 0; width: 160px; } .pictures figure.only { width: 320px; }
.pictures img { width: 100%; image-rendering: pixelated; border: 1px solid #999; display: block; }
figcaption, .small { font-size: 12px; color: #555; }
.turn { margin: 6px 0; padding: 6px 10px; border-radius: 6px; white-space: pre-wrap; word-break: break-word; }
.user { background: #eee; } .assistant { background: #f7f7f7; border: 1px solid #ddd; }
.role { font-weight: 700; font-size: 12px; text-transform: uppercase; color: #444; }
.slot { display: inline-block; padding: 0 4px; border: 1px solid #777; border-radius: 3px; font-size: 12px; }
.error { border: 2px solid #a00; padding: 8px; font-weight: 600; white-space: pre-wrap; }
.skip { border: 1px dashed #888; padding: 8px; color: #555; white-space: pre-wrap; }
pre { background: #f0f0f0; padding: 8px; overflow-x: auto; font-size: 12px; }
details { margin: 6px 0; } summary { cursor: pointer; color: #333; }
"""

SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images-loaded", String(loaded));
  document.getElementById("status").textContent = loaded + " of " + images.length + " images loaded";
});
"""

# --watch: the page asks the server for the page's version and reloads when it changes.
LIVE_SCRIPT = """
(function () {
  var mine = document.documentElement.getAttribute("data-version");
  function poll() {
    fetch("/version", {cache: "no-store"}).then(function (r) { return r.text(); }).then(function (v) {
      if (v !== mine) { location.reload(); } else { setTimeout(poll, 400); }
    }).catch(function () { setTimeout(poll, 1000); });
  }
  setTimeout(poll, 400);
})();
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _numbered(source: str) -> str:
    return "\n".join(f"{n:4d}  {line}" for n, line in enumerate(source.splitlines(), start=1))


def caption(kind: str, name: str, slice_: int | None) -> str:
    """What a picture is, for the page: the sequence's name or the picture's kind, and its slice.

    >>> caption("overlay", "VISTA3D result on axial slice 45", 45), caption("sequence", "T1c", 43)
    ('overlay, slice 45', 'T1c, slice 43')
    >>> caption("key_slice", "the chest X-ray", None)
    'the chest X-ray'
    """
    label = name if kind == "sequence" else kind.replace("_", " ")
    return f"{label}, slice {slice_}" if slice_ is not None else (name or label)


def captions(s: Sample) -> list[str]:
    """A caption per picture of the conversation, found by matching its bytes with the findings'
    pictures (so whatever the template chose, the caption says what it is)."""
    known = {i.png: caption(i.kind, i.caption, i.slice) for i in (s.findings.images if s.findings else [])}
    images = s.conversation.images if s.conversation else []
    return [known.get(png, "the item's picture" if len(images) == 1 else f"image {n + 1}") for n, png in enumerate(images)]


def _turns_html(s: Sample, labels: list[str], card: str) -> str:
    turns, slot = [], 0
    for m in s.conversation.messages:  # type: ignore[union-attr]
        body = []
        for part in m["content"]:
            if part["type"] == "image":
                body.append(f"<span class='slot'>{slot + 1}: {_e(labels[slot] if slot < len(labels) else 'image')}</span>")
                slot += 1
            elif card and slot == 0 and part["text"].startswith(card):
                rest = part["text"][len(card):].lstrip("\n")
                body.append(f"<details><summary>model card</summary>{_e(card)}</details>{_e(rest)}")
            else:
                body.append(_e(part["text"]))
        turns.append(f"<div class='turn {_e(m['role'])}'><div class='role'>{_e(m['role'])}</div>{''.join(body)}</div>")
    return "".join(turns)


def _sample_html(s: Sample, k: int, card: str) -> str:
    head = (f"<div class='small'>sample {k + 1} · item {_e(s.item.item_id)} ({_e(s.item.modality)}, {_e(s.item.kind)}) · "
            f"variant {s.variant} · args {_e(repr(s.args))}"
            + (f" · findings from {_e(s.findings_from)}" if s.findings_from else "")
            + (f" · rendered in {s.render_ms:.1f} ms" if s.conversation else "") + "</div>")
    findings = ""
    if s.findings is not None:
        findings = f"<details><summary>findings</summary><pre>{_e(s.findings_text)}</pre></details>"
    if s.conversation is None and s.skipped:
        return f"<div class='sample skipped'><div>{head}</div><div><div class='skip'>{_e(s.skipped)}</div>{findings}</div></div>"
    if s.conversation is None:
        return (f"<div class='sample failed'><div>{head}</div><div><div class='error'>failed: {_e(s.error)}</div>"
                f"{findings}</div></div>")
    labels = captions(s)
    only = " class='only'" if len(labels) == 1 else ""
    pictures = "".join(
        f"<figure{only}><img alt='{_e(label)}' src='{_data_uri(png)}'><figcaption>{n + 1}: {_e(label)}</figcaption></figure>"
        for n, (png, label) in enumerate(zip(s.conversation.images, labels))
    )
    meta = f"<details><summary>meta</summary><pre>{_e(json.dumps(s.conversation.meta, indent=1))}</pre></details>"
    return (f"<div class='sample'><div class='pictures'>{head}{pictures}</div>"
            f"<div>{_turns_html(s, labels, card)}{meta}{findings}</div></div>")


def render_page(spec: BuildSpec, sections: list[Section], card: str = "", *, live: bool = False, version: int = 0) -> str:
    """The whole page as one HTML string (self-contained); `card`, the model card, is folded
    away where a conversation starts with it. `live`: the page reloads itself when the
    `--watch` server has a newer version."""
    body = []
    for sec in sections:
        t = sec.task
        what = f"source {_e(t.source)}" + (f", expert {_e(t.expert)}, args {_e(t.args)}" if t.expert else ", no expert")
        body.append(f"<h2>{_e(t.template)}</h2><div class='small'>{_e(sec.description)} · {what}</div>")
        if sec.note:
            body.append(f"<div class='error'>{_e(sec.note)}</div>")
        body.append(f"<details><summary>template source</summary><pre>{_e(_numbered(sec.source_text))}</pre></details>")
        body.extend(_sample_html(s, k, card.rstrip()) for k, s in enumerate(sec.samples))
    total = sum(len(s.conversation.images) for sec in sections for s in sec.samples if s.conversation)
    failed = sum(1 for sec in sections for s in sec.samples if s.error) + sum(1 for sec in sections if sec.note)
    banner = f"<div id='failed'>{failed} sample(s) failed: see the red boxes</div>" if failed else ""
    return page_html(f"m3-curate preview · {_e(spec.name)}",
                     f"<div id='status'>{total} images (loading…)</div>{banner}{''.join(body)}",
                     attrs=f"data-images='{total}' data-failed='{failed}'", live=live, version=version)


def page_html(title: str, body: str, *, attrs: str = "", live: bool = False, version: int = 0) -> str:
    script = SCRIPT + (LIVE_SCRIPT if live else "")
    return (f"<!doctype html><html data-version='{version}'><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{STYLE}</style><script>{script}</script></head><body {attrs}><h1>{title}</h1>{body}</body></html>")
