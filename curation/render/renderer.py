"""Findings → conversations through sandboxed Jinja templates.

A template writes each turn with `{% turn "user" %}…{% endturn %}` and places images with
`{{ image("overlay") }}`. The tag calls the render state when the turn opens and closes, so
the `messages` structure is built as the template runs, never recovered by splitting text on
role markers (see `curation.render.turns`). Before anything runs, `check()` compares each task with
its template's declaration (`curation.render.templates`).

Randomness (phrasings, subjects, option order) comes from one `random.Random` per conversation,
seeded by (manifest seed, item, template, variant): the same inputs give the same text.

>>> from curation.manifest import BuildSpec
>>> spec = BuildSpec(name="x", sources=[{"name": "c", "kind": "image2d", "root": "."}])
>>> Renderer(spec).declaration("cxr/expert_hint_vqa.j2").images
1
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import Template, TemplateNotFound, TemplateSyntaxError
from jinja2.exceptions import SecurityError, UndefinedError

from curation.errors import CurationError, ItemError
from curation.expert_info import ExpertInfo
from curation.items import ITEM_KIND, StudyItem
from curation.manifest import BuildSpec, TaskSpec
from curation.render.prompt_data import expert_cards, load_cards, load_phrasings
from curation.rows import Conversation
from curation.render.templates import (
    BUILTIN_PROMPTS,
    CURRENT_STATE,
    PromptContext,
    PromptSandbox,
    TemplateDeclaration,
    make_environment,
    read_declaration,
    referenced_templates,
)
from curation.render.turns import Fault, Markers, RenderState, Skip
from curation.findings import Findings

log = logging.getLogger(__name__)


class TemplateError(ItemError):
    """A template failed on one item. The message names the item, the template and the line;
    in a build it becomes a ledger row for the item and the other items go on."""

    def __init__(self, template: str, line: int | None, item: str, reason: str):
        self.template = template
        self.line = line
        self.item = item
        at = f"template {template}" + (f", line {line}" if line else "")
        super().__init__(item, f"{at}: {reason}")


class TemplateSkip(TemplateError):
    """The template decided this item has nothing to ask (`skip("reason")`), e.g. no structure
    on one side for a left-or-right question. A ledger reason, not a failure of the template."""


@dataclass(slots=True, frozen=True)
class _Compiled:
    name: str
    template: Template
    declaration: TemplateDeclaration
    hash: str
    source: str
    parent: dict[str, Any]  # what every rendering of it sees alike: its globals, the model card, the static helpers


def conversation_seed(seed: int, item_id: str, template: str, variant: int) -> int:
    """The RNG seed of one conversation.

    >>> conversation_seed(7, "abc", "t.j2", 0) == conversation_seed(7, "abc", "t.j2", 0)
    True
    """
    digest = hashlib.sha256(f"{seed}\x1f{item_id}\x1f{template}\x1f{variant}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def expert_call(name: str, args: str) -> str:
    """VILA-M3's call syntax.

    >>> expert_call("VISTA3D", "organs"), expert_call("CXR", "")
    ('<VISTA3D(organs)>', '<CXR()>')
    """
    return f"<{name}({args})>"


def findings_view(f: Findings) -> dict[str, Any]:
    """Findings as the plain dicts templates see, with a few ready-made selections. No PNG
    bytes and no timing (timing differs between runs and must never reach text)."""
    structures = [
        {"label": s.label, "name": s.name, "voxels": s.voxels, "volume_ml": s.volume_ml, "bbox": list(s.bbox),
         "key_slice": s.key_slice, "centroid_ras": list(s.centroid_ras), "side": s.side, "components": s.components,
         "component_volumes_ml": list(s.component_volumes_ml), "colour": s.colour}
        for s in f.structures
    ]
    classes = [{"name": c.name, "probability": c.probability, "present": c.present, "threshold": c.threshold} for c in f.classes]
    return {
        "expert": f.expert,
        "runner": f.runner,
        "args": f.args,
        "modality": f.modality,
        "structures": structures,
        "names": [s["name"] for s in structures],
        "by_name": {s["name"]: s for s in structures},
        "by_volume": sorted(structures, key=lambda s: -s["volume_ml"]),
        "coloured": [s for s in structures if s["colour"]],
        "classes": classes,
        "present": [c for c in classes if c["present"]],
        "absent": [c for c in classes if not c["present"]],
        "legend": dict(f.legend),
        "images": [{"kind": i.kind, "slice": i.slice, "caption": i.caption} for i in f.images],
    }


def images_by_kind(f: Findings) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for img in f.images:
        out.setdefault(img.kind, []).append(img)
    return out


def item_view(item: StudyItem, source_kind: str) -> dict[str, Any]:
    """The item's public facts: never its ids, uris or header values."""
    return {
        "modality": item.modality,
        "kind": item.kind,
        "source_kind": source_kind,
        "shape": list(item.shape),
        "spacing": list(item.spacing),
        "channels": list(item.channels),
        "n_files": item.n_files,
        "qa": [dict(q) for q in item.attrs.get("qa", [])],
    }


class Renderer:
    """Templates of a manifest, rendered into `Conversation`s.

    Construct on the driver (cheap: nothing is read until first use), `check()` before a build,
    then `render()` anywhere: a Renderer pickles without its Jinja environment and rebuilds it
    lazily, so it can be shipped to Ray workers. `experts` describes the manifest's experts
    (the build's `ExpertInfo`s: what their findings hold, which names they report); an expert
    without one is rendered alike, but what it gives cannot be checked and it has no
    vocabulary.
    """

    def __init__(self, spec: BuildSpec, *, experts: dict[str, ExpertInfo] | None = None, prompt_dirs: Sequence[Path] = ()):
        self.spec = spec
        self.experts: dict[str, ExpertInfo] = dict(experts or {})
        self._extra = tuple(Path(p).resolve() for p in prompt_dirs)
        for folder in (*self._extra, *spec.prompts):
            if not Path(folder).is_dir():
                raise CurationError(f"prompts: template folder not found: {folder}")
        self._reset()

    def _reset(self) -> None:
        self._env: PromptSandbox | None = None
        self._compiled: dict[str, _Compiled] = {}
        self._phrasings: dict[str, tuple[str, ...]] = {}
        self._phrasings_digest = ""
        self._card = ""
        self._card_text = ""
        self._carded: set[str] = set()
        self._markers = Markers("0")
        self._experts = {e.name: e for e in self.spec.experts}
        # one-entry memos (variants of an item share its findings), each swapped as one tuple
        self._last_view: tuple[Findings | None, dict[str, Any], dict[str, list[Any]]] = (None, {}, {})
        self._last_item: tuple[StudyItem | None, dict[str, Any] | None] = (None, None)
        self._experts_seen: dict[tuple[str, str], dict[str, str]] = {}
        self._calls_any = tuple(f"<{e.name}(" for e in self.spec.experts)
        self._source_kinds = {s.name: s.kind for s in self.spec.sources}

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec, "experts": self.experts, "_extra": self._extra}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.spec = state["spec"]
        self.experts = state["experts"]
        self._extra = state["_extra"]
        self._reset()

    @property
    def roots(self) -> list[Path]:
        """Template folders, searched in order: `prompt_dirs`, the manifest's `prompts:`, the
        built-in `prompts/`."""
        roots = [*self._extra, *(Path(p) for p in self.spec.prompts)]
        if BUILTIN_PROMPTS.is_dir() and BUILTIN_PROMPTS not in roots:
            roots.append(BUILTIN_PROMPTS)
        return roots

    @property
    def env(self) -> PromptSandbox:
        if self._env is None:
            roots = self.roots
            self._markers = Markers(f"{secrets.randbelow(10**16):016d}")
            self._env = make_environment(roots)
            self._env.trusted_owners = (RenderState, Renderer)
            self._phrasings, self._phrasings_digest = load_phrasings(roots)
            self._card = self._render_card()
            self._card_text = self._card.rstrip()
        return self._env

    @property
    def model_card(self) -> str:
        """The model card: the manifest's experts that have a card (empty when none has)."""
        _ = self.env
        return self._card

    def _render_card(self) -> str:
        cards = expert_cards(list(self.spec.experts), load_cards(self.roots))
        self._carded = {c["name"] for c in cards}
        if not cards:
            return ""
        try:
            text = self.env.get_template("model_card.j2").render(experts=cards)
        except TemplateNotFound as e:
            raise CurationError(f"model_card.j2 not found in the template folders {[str(r) for r in self.roots]}") from e
        except Exception as e:
            raise CurationError(f"model_card.j2: {type(e).__name__}: {e}") from e
        return text.strip() + "\n"

    # --- templates ---------------------------------------------------------------------------

    def _template_name(self, filename: str) -> str:
        for root in self.roots:
            try:
                return Path(filename).resolve().relative_to(root.resolve()).as_posix()
            except ValueError:
                continue
        return filename

    def compiled(self, name: str) -> _Compiled:
        found = self._compiled.get(name)
        if found is not None:
            return found
        env = self.env
        try:
            template = env.get_template(name)
            source = env.loader.get_source(env, name)[0]  # type: ignore[union-attr]
            deps = referenced_templates(env, name)
        except TemplateNotFound as e:
            if e.name == name:
                raise CurationError(f"template {name} not found in the template folders {[str(r) for r in self.roots]}") from None
            where, line = self._reference_site(name, str(e.name))
            why = f" ({e.message})" if e.message and e.message != e.name else ""
            raise CurationError(
                f"template {where}{f', line {line}' if line else ''}: imports or includes {e.name!r}, which is not a template in "
                f"the template folders {[str(r) for r in self.roots]}{why} (templates cannot import Python modules or read other files)"
            ) from None
        except TemplateSyntaxError as e:
            where = self._template_name(e.filename) if e.filename else name
            raise CurationError(f"template {where}, line {e.lineno}: {e.message}") from None
        if "\x00" in source:
            raise CurationError(f"template {name}: the file holds a NUL character (is it a text file?)")
        declaration = read_declaration(source, name)
        h = hashlib.sha256()
        for dep in deps:
            h.update(dep.encode() + b"\0" + env.loader.get_source(env, dep)[0].encode() + b"\0")  # type: ignore[union-attr]
        h.update(self._phrasings_digest.encode() + self._card.encode())
        parent = {**template.globals, "model_card": self._card, "has_phrase": self._has_phrase, "skip": _skip}
        found = _Compiled(name=name, template=template, declaration=declaration, hash=h.hexdigest()[:16], source=source,
                          parent=parent)
        self._compiled[name] = found
        return found

    def _reference_site(self, name: str, missing: str) -> tuple[str, int | None]:
        """The template (among `name` and what it uses) and line that refers to `missing`."""
        from jinja2 import nodes

        env = self.env
        todo, seen = [name], set()
        while todo:
            current = todo.pop()
            if current in seen:
                continue
            seen.add(current)
            try:
                tree = env.parse(env.loader.get_source(env, current)[0])  # type: ignore[union-attr]
            except (TemplateNotFound, TemplateSyntaxError):
                continue
            for node in tree.find_all((nodes.Import, nodes.FromImport, nodes.Include, nodes.Extends)):
                target = getattr(getattr(node, "template", None), "value", None)
                if target == missing:
                    return current, node.lineno
                if isinstance(target, str):
                    todo.append(target)
        return name, None

    def declaration(self, template: str) -> TemplateDeclaration:
        """What the template needs, read from its declaration without rendering."""
        return self.compiled(template).declaration

    def template_hash(self, template: str) -> str:
        """Hash of the template, the templates it uses, the phrasings and the model card."""
        return self.compiled(template).hash

    def check(self) -> None:
        """Every task's template exists, compiles and fits the task: its source kind and
        modality, its expert (present when needed, able to give what the template needs,
        accepting the source's items, as far as its `ExpertInfo` says) and its arguments.
        Raises one `CurationError` naming the task and the template."""
        problems = []
        for i, task in enumerate(self.spec.tasks):
            try:
                self._check_task(task)
            except CurationError as e:
                problems.append(f"tasks[{i}] (template {task.template}): {e}")
        if problems:
            raise CurationError("; ".join(problems))

    def _check_task(self, task: TaskSpec) -> None:
        d = self.compiled(task.template).declaration
        source = self.spec.source(task.source)
        if d.sources and source.kind not in d.sources:
            raise CurationError(f"written for {'/'.join(d.sources)} sources; source {source.name!r} is {source.kind}")
        modalities = _source_modalities(source)
        if d.modality and modalities is not None and not modalities & set(d.modality):
            raise CurationError(f"written for {'/'.join(d.modality)} items; source {source.name!r} gives {'/'.join(sorted(modalities))}")
        if task.expert is None:
            if d.uses_expert:
                what = ", ".join(d.needs) if d.needs else "its call"
                raise CurationError(f"needs an expert ({what}); add `expert:` to the task")
            return
        if not d.uses_expert:
            raise CurationError(f"uses no expert, but the task names {task.expert!r}; remove `expert:` from the task")
        _ = self.env
        if d.calls_expert and task.expert not in self._carded:
            raise CurationError(
                f"calls expert {task.expert!r}, which is not on the model card (no card for it by name or runner): add one under "
                "`experts:` in prompts/model_cards.yaml, or use a template that answers from its findings without calling it"
            )
        spec = self._experts[task.expert]
        info = self.experts.get(task.expert)
        if info is not None and info.gives(d.needs) is False:
            missing = sorted(set(d.needs) - set(info.provides or ()))
            raise CurationError(f"needs {', '.join(missing)} from its expert; expert {task.expert!r} (runner {spec.runner}) gives {', '.join(info.provides or ())}")
        if info is not None:
            item_kind = ITEM_KIND[source.kind]
            kinds = info.kinds
            if kinds and item_kind not in kinds:
                raise CurationError(f"expert {task.expert!r} takes {'/'.join(kinds)} items; source {source.name!r} gives {item_kind} items")
            accepted = set(info.modalities)
            if accepted and modalities is not None and not accepted & modalities:
                raise CurationError(f"expert {task.expert!r} takes {'/'.join(sorted(accepted))}; source {source.name!r} gives {'/'.join(sorted(modalities))}")
        if d.args is not None:
            allowed = {a.strip().lower() for a in d.args}
            bad = [a for a in task.args if a.strip().lower() not in allowed]
            if bad:
                raise CurationError(f"argument(s) {bad} not among those it is written for: {d.args}")

    # --- rendering ---------------------------------------------------------------------------

    def render(self, task: TaskSpec, item: StudyItem, findings: Findings | None, *, variant: int) -> Conversation:
        """One conversation. Deterministic given (manifest seed, item, template, variant);
        `findings` must have been computed with `task.args[variant % len(task.args)]`.
        Raises `TemplateError` (or `TemplateSkip`) naming the item, template and line."""
        c = self.compiled(task.template)
        state = RenderState(self, c, task, item, findings, variant, conversation_seed(self.spec.seed, item.item_id, task.template, variant))
        token = CURRENT_STATE.set(state)
        try:
            context = PromptContext(self._env, c.parent, c.name, c.template.blocks, self._context(state, task, item, findings, variant))
            state.finish_output(c.template.root_render_func(context))
            self._finish(state, task)
        except Skip as e:
            name, line, chain = self.locate(e.__traceback__, c.name)
            raise TemplateSkip(name, line, item.item_id, f"skipped{chain}: {e}") from None
        except TemplateError:
            raise
        except Exception as e:
            name, line, chain = self.locate(e.__traceback__, c.name)
            if isinstance(e, Fault) and line is None:  # found after the template ran: the line it knows
                name, line, chain = c.name, e.line, ""
            raise TemplateError(name, line, item.item_id, f"{_describe(e)}{chain}") from e
        finally:
            CURRENT_STATE.reset(token)
        d = c.declaration
        return Conversation(
            messages=state.messages,
            images=state.images,
            template=task.template,
            template_hash=c.hash,
            variant=variant,
            expert=task.expert if d.calls_expert else None,
            meta=state.meta,
        )

    def _context(self, state: RenderState, task: TaskSpec, item: StudyItem, findings: Findings | None, variant: int) -> dict[str, Any]:
        """What the template sees beside the compiled template's `parent`: the data and the
        helpers bound to this rendering (the context's `vars`, where `{% set %}` writes too)."""
        expert = None if task.expert is None else self._expert_view(task.expert, state.arg, state.call)
        return {
            "item": self._item_view(item),
            "findings": self._view(findings),
            "expert": expert,
            "vocabulary": self.vocabulary(task.expert, state.arg) if task.expert else [],
            "variant": variant,
            "image": state.image,
            "meta": state.set_meta,
            "pick": state.pick,
            "shuffled": state.shuffled,
            "sample": state.sample,
            "chance": state.chance,
            "phrase": state.phrase,
            "structure": state.structure,
        }

    def _finish(self, state: RenderState, task: TaskSpec) -> None:
        """Whole-conversation rules, checked after the template ran."""
        d = state.compiled.declaration
        last = state.lines[-1] if state.lines else None
        if not state.messages:
            raise Fault("the template wrote no turns")
        if state.messages[-1]["role"] != "assistant":
            raise Fault("the conversation ends with a user turn; it must end with the assistant's answer", last)
        if len(state.images) != d.images:
            raise Fault(f"the declaration says images: {d.images}, but this conversation has {len(state.images)} image slot(s)", last)
        if d.model_card and self._card:
            first = state.messages[0]["content"][0]
            if first["type"] != "text" or not first["text"].startswith(self._card_text):
                raise Fault("the model card must open the first user turn ({{ model_card }} first), or declare model_card: false", state.lines[0])
        answers = "\x00".join([m["content"][0]["text"] for m in state.messages[1::2]])  # assistant turns hold one text part
        if d.calls_expert and task.expert is not None:
            call = state.call
            if call not in answers:
                raise Fault(f"declares calls_expert but no assistant turn contains {call} (write {{{{ expert.call }}}})", last)
            state.meta["call"] = call
        elif "<" in answers and any(call in answers for call in self._calls_any):
            raise Fault("an assistant turn calls an expert, but the declaration says calls_expert: false", last)

    def _expert_view(self, name: str, args: str, call: str) -> dict[str, str]:
        key = (name, args)
        view = self._experts_seen.get(key)
        if view is None:
            view = self._experts_seen[key] = {"name": name, "args": args, "call": call}
        return view

    def _has_phrase(self, key: str) -> bool:
        return key in self._phrasings

    def _item_view(self, item: StudyItem) -> dict[str, Any]:
        last, view = self._last_item
        if last is not item:  # one-entry memo, as for findings
            view = item_view(item, self._source_kinds[item.source])
            self._last_item = (item, view)
        return view  # type: ignore[return-value]

    def _view(self, findings: Findings | None) -> dict[str, Any] | None:
        return None if findings is None else self._memo(findings)[0]

    def _memo(self, findings: Findings) -> tuple[dict[str, Any], dict[str, list[Any]]]:
        """(template view, images by kind) of the findings, remembered for the last findings."""
        last, view, images = self._last_view
        if last is not findings:
            view, images = findings_view(findings), images_by_kind(findings)
            self._last_view = (findings, view, images)
        return view, images

    def vocabulary(self, expert: str, arg: str) -> list[str]:
        """Names the expert reports for `arg` when present (its `ExpertInfo`; empty: unknown)."""
        info = self.experts.get(expert)
        return [] if info is None else info.vocabulary(arg)

    def locate(self, tb: Any, default: str) -> tuple[str, int | None, str]:
        """(template, line, chain) of the innermost template frame of a traceback."""
        frames = []
        while tb is not None:
            template = tb.tb_frame.f_globals.get("__jinja_template__")
            if template is not None:
                frames.append((template.name or default, int(template.get_corresponding_lineno(tb.tb_lineno))))
            tb = tb.tb_next
        if not frames:
            return default, None, ""
        name, line = frames[-1]
        chain = ""
        if name != default:
            outer = next(((n, ln) for n, ln in frames if n == default), None)
            chain = f" (called from {default}, line {outer[1]})" if outer else ""
        return name, line, chain

    @staticmethod
    def source_line(source: str, text: str) -> int | None:
        """The first line of a template's source that holds `text` (for stray text)."""
        probe = text.splitlines()[0][:40] if text else ""
        for n, line in enumerate(source.splitlines(), start=1):
            if probe and probe in line:
                return n
        return None


def _skip(reason: str) -> str:
    """`skip("reason")`: make no conversation for this item (a ledger reason)."""
    raise Skip(str(reason))


def _source_modalities(source: Any) -> set[str] | None:
    if source.kind == "dicom":
        return set(source.select.modalities) if source.select.modalities else None
    return {source.modality}


def _describe(e: BaseException) -> str:
    if isinstance(e, (Fault, UndefinedError, SecurityError)):
        return str(e)
    if isinstance(e, TemplateNotFound):
        return f"template {e.name!r} not found (templates can only use files in the template folders)"
    if isinstance(e, TemplateSyntaxError):
        return f"syntax error: {e.message}"
    return f"{type(e).__name__}: {e}"
