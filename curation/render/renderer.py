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
from curation.findings import Findings
from curation.items import ITEM_KIND, StudyItem
from curation.manifest import BuildSpec, TaskSpec
from curation.render.budget import BudgetExceeded
from curation.render.helpers import TemplateHelpers, findings_view, helpers, item_view, truth_view
from curation.render.prompt_data import expert_cards, load_cards, load_phrasings
from curation.render.rules import Ungrounded, finish
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
from curation.render.turns import Fault, Markers, RenderState, Shared, Skip, Subject
from curation.rows import Conversation

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


class GroundingError(TemplateError):
    """The conversation states something it neither shows nor gives, or an answer its source
    contradicts (`curation.render.grounding`): it is set aside, never written. `category` is
    the check's category (`grounding.CATEGORIES`)."""

    def __init__(self, template: str, line: int | None, item: str, reason: str, category: str):
        super().__init__(template, line, item, reason)
        self.category = category


@dataclass(slots=True, frozen=True)
class _Compiled:
    name: str
    template: Template
    declaration: TemplateDeclaration
    hash: str
    source: str
    parent: dict[str, Any]  # what every rendering of it sees alike: its globals, the model card, the helpers


@dataclass(slots=True, frozen=True)
class _Derived:
    """What the renderer derives from one item's findings, once: the views templates see and
    the findings as data (`Findings.to_dict`) for the grounding check and the row."""

    findings: Findings | None  # kept, so the memo's key (its id) is not reused while it lives
    view: Any
    truth: Any
    data: dict[str, Any] | None


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


def template_roots(spec: BuildSpec, prompt_dirs: Sequence[Path] = ()) -> list[Path]:
    """Template folders, searched in order: `prompt_dirs`, the manifest's `prompts:`, the
    built-in `prompts/`."""
    roots = [*prompt_dirs, *(Path(p) for p in spec.prompts)]
    if BUILTIN_PROMPTS.is_dir() and BUILTIN_PROMPTS not in roots:
        roots.append(BUILTIN_PROMPTS)
    return roots


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
        self.prompt_dirs = tuple(Path(p).resolve() for p in prompt_dirs)
        for folder in (*self.prompt_dirs, *spec.prompts):
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
        self._shared = Shared(Markers("0"), {})
        self._experts = {e.name: e for e in self.spec.experts}
        # what is derived from the current item and each of its findings (`_Derived`), made once
        # per item: its conversations are rendered one after another (a build renders an item's
        # every variant of every task in turn), whatever order their findings come in
        self._item: StudyItem | None = None
        self._item_data: dict[str, Any] = {}
        self._derived: dict[int, _Derived] = {}
        self._experts_seen: dict[tuple[str, str], dict[str, str]] = {}
        self._calls_any = tuple(f"<{e.name}(" for e in self.spec.experts)
        self._source_kinds = {s.name: s.kind for s in self.spec.sources}

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec, "experts": self.experts, "prompt_dirs": self.prompt_dirs}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.spec = state["spec"]
        self.experts = state["experts"]
        self.prompt_dirs = state["prompt_dirs"]
        self._reset()

    @property
    def roots(self) -> list[Path]:
        return template_roots(self.spec, self.prompt_dirs)

    @property
    def env(self) -> PromptSandbox:
        if self._env is None:
            roots = self.roots
            self._env = make_environment(roots, helpers=helpers(), trusted=(TemplateHelpers,))
            self._phrasings, self._phrasings_digest = load_phrasings(roots)
            self._shared = Shared(Markers(f"{secrets.randbelow(10**16):016d}"), self._phrasings)
            self._card = self._render_card()
            self._card_text = self._card.rstrip()
            self._env.globals["model_card"] = self._card
        return self._env

    @property
    def model_card(self) -> str:
        """The model card: the manifest's experts that have a card (empty when none has)."""
        _ = self.env
        return self._card

    def _render_card(self) -> str:
        families = {name: info.family for name, info in self.experts.items() if info.family}
        cards = expert_cards(list(self.spec.experts), load_cards(self.roots), called=self._called_experts(), families=families)
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

    def _called_experts(self) -> set[str] | None:
        """The experts some task's template calls (the model card lists only those); None for a
        manifest without tasks (a template tried alone: every expert with a card is listed). A
        template that cannot be read counts as calling its expert: `check()` reports it."""
        if not self.spec.tasks:
            return None
        env = self._env
        called = set()
        for task in self.spec.tasks:
            if task.expert is None:
                continue
            try:
                calls = read_declaration(env.loader.get_source(env, task.template)[0], task.template).calls_expert  # type: ignore[union-attr]
            except (CurationError, TemplateNotFound):
                calls = True
            if calls:
                called.add(task.expert)
        return called

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
        parent = dict(template.globals)  # the environment's: the helpers and the model card among them
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
        if d.args is not None:  # both in their canonical spelling (`curation.expert_args`)
            bad = [a for a in task.args if a not in d.args]
            if bad:
                raise CurationError(f"argument(s) {bad} not among those it is written for: {d.args}")

    # --- rendering ---------------------------------------------------------------------------

    def render(self, task: TaskSpec, item: StudyItem, findings: Findings | None, *, variant: int) -> Conversation:
        """One conversation. Deterministic given (manifest seed, item, template, variant);
        `findings` must have been computed with `task.args[variant % len(task.args)]`.
        Raises `TemplateError` (or `TemplateSkip`, or `GroundingError` for a conversation the
        grounding check refuses) naming the item, template and line."""
        c = self.compiled(task.template)
        derived = self._views(findings, item)
        subject = Subject(task=task, arg=task.args[variant % len(task.args)], item=item, findings=findings, view=derived.view,
                          truth=derived.truth)
        state = RenderState(self._shared, c.name, c.source, c.declaration.kind, subject, variant,
                            conversation_seed(self.spec.seed, item.item_id, task.template, variant))
        token = CURRENT_STATE.set(state)
        try:
            context = PromptContext(self._env, c.parent, c.name, c.template.blocks, self._context(state, task, item, variant))
            state.finish_output(c.template.root_render_func(context))
            finish(state, c.declaration, card=self._card_text, callable_prefixes=self._calls_any, findings=derived.data)
        except Skip as e:
            name, line, chain = self.locate(e.__traceback__, c.name)
            raise TemplateSkip(name, line, item.item_id, f"skipped{chain}: {e}") from None
        except Ungrounded as e:
            raise GroundingError(c.name, e.line, item.item_id, str(e), e.problem.category) from None
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

    def _context(self, state: RenderState, task: TaskSpec, item: StudyItem, variant: int) -> dict[str, Any]:
        """What the template sees beside the compiled template's `parent` (which holds the
        helpers: they find this rendering's state themselves): this rendering's data, as the
        context's `vars`, where `{% set %}` writes too."""
        sub = state.subject
        expert = None if task.expert is None else self._expert_view(task.expert, sub.arg, state.call)
        return {
            "item": self._item_view(item),
            "findings": sub.view,
            "truth": sub.truth,
            "expert": expert,
            "vocabulary": self.vocabulary(task.expert, sub.arg) if task.expert else [],
            "variant": variant,
        }

    def _expert_view(self, name: str, arg: str, call: str) -> dict[str, str]:
        key = (name, arg)
        view = self._experts_seen.get(key)
        if view is None:
            view = self._experts_seen[key] = {"name": name, "arg": arg, "call": call}
        return view

    def _item_view(self, item: StudyItem) -> dict[str, Any]:
        if item is not self._item:
            self._start_item(item)
        return self._item_data

    def _start_item(self, item: StudyItem) -> None:
        """Drop what was derived for the previous item: the memo holds one item's findings."""
        self._item, self._derived = item, {}
        self._item_data = item_view(item, self._source_kinds[item.source])

    def _views(self, findings: Findings | None, item: StudyItem) -> _Derived:
        """What is derived from (`item`, `findings`), made on first use and kept while the
        renderer stays on this item. Findings are told apart by identity: a caller hands the
        same object for every conversation that uses it (`curation.build.stages.render_item`,
        `curation.preview`); the entry holds them, so their id cannot be reused while it stays."""
        if item is not self._item:
            self._start_item(item)
        found = self._derived.get(id(findings))
        if found is None:
            found = self._derived[id(findings)] = _Derived(
                findings=findings, view=None if findings is None else findings_view(findings), truth=truth_view(findings, item),
                data=None if findings is None else findings.to_dict())
        return found

    def findings_data(self, findings: Findings, item: StudyItem) -> dict[str, Any]:
        """`findings.to_dict()`, the same data the grounding check reads when `item` is rendered
        with `findings`, made once per item and findings (the build writes it into each row;
        preview shows it). Shared: read it, never change it."""
        return self._views(findings, item).data  # type: ignore[return-value]  (findings given: their data is made)

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



def _source_modalities(source: Any) -> set[str] | None:
    if source.kind == "dicom":
        return set(source.select.modalities) if source.select.modalities else None
    return {source.modality}


def _describe(e: BaseException) -> str:
    if isinstance(e, (Fault, UndefinedError, SecurityError, BudgetExceeded)):
        return str(e)
    if isinstance(e, TemplateNotFound):
        return f"template {e.name!r} not found (templates can only use files in the template folders)"
    if isinstance(e, TemplateSyntaxError):
        return f"syntax error: {e.message}"
    return f"{type(e).__name__}: {e}"
