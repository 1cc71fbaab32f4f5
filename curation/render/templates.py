"""What a template is made of, apart from rendering: its declaration, the sandboxed environment
that loads it and the `{% turn %}` tag (the filters templates may use are in
`curation.render.filters`, phrasings and model cards in `curation.render.prompt_data`, what
each expert gives in `curation.expert_info`).

A template starts with a declaration in a Jinja comment, read without rendering:

    {#- declare
    kind: tumor_count            # the conversation kind, recorded in each row's meta
    description: yes/no on a tumour, then "how many"
    modality: [CT]               # item modalities it is written for (absent: any)
    sources: [dicom, nifti]      # source kinds (absent: any)
    needs: [structures, overlay] # what the task's expert must give (absent: no expert)
    calls_expert: true           # an assistant turn calls the expert (default: true when it needs one)
    args: [hepatic tumor, lung tumor]   # expert arguments it is written for (absent: any; compared canonically)
    images: 2                    # image slots every conversation has
    model_card: true             # the model card opens the first user turn (default true)
    -#}

"""

from __future__ import annotations

import functools
import io
import logging
import operator
import os
import re
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import yaml
from jinja2 import FileSystemLoader, StrictUndefined, TemplateNotFound, nodes, pass_context
from jinja2 import meta as jinja_meta
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
from jinja2.environment import TemplateModule
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension
from jinja2.nodes import EvalContext
from jinja2.runtime import Context, LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace, _PassArg
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from curation.errors import CurationError, validation_message
from curation.expert_args import canonical_arg
from curation.expert_info import NEEDS
from curation.items import SourceKind
from curation.render.budget import (
    MAX_ITEMS,
    MAX_TEXT,
    Budget,
    BudgetExceeded,
    OutputBuffer,
    check_arguments,
    check_format,
    check_join,
    check_replace,
    counted,
)
from curation.render.filters import FILTERS

log = logging.getLogger(__name__)

BUILTIN_PROMPTS = Path(__file__).resolve().parents[2] / "prompts"
MAX_SEQUENCE = MAX_ITEMS  # longest string or list a template may build with * (a sandbox limit)

Need = Literal[NEEDS]  # type: ignore[valid-type]  # the one list, in curation.expert_info


class TemplateDeclaration(BaseModel):
    """What a template needs, checked against each task before anything runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    description: str = ""
    modality: list[str] = []
    sources: list[SourceKind] = []
    needs: list[Need] = []
    calls_expert: bool = False
    args: list[str] | None = None
    images: int = Field(ge=0, le=32)
    model_card: bool = True

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and "calls_expert" not in data:
            data = {**data, "calls_expert": bool(data.get("needs"))}
        return data

    @field_validator("args")
    @classmethod
    def _canonical(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [canonical_arg(a) for a in value]

    @property
    def uses_expert(self) -> bool:
        return bool(self.needs) or self.calls_expert


DECLARATION = re.compile(r"\A\s*\{#-?\s*declare[ \t]*\n(?P<body>.*?)-?#\}", re.DOTALL)


def read_declaration(source: str, name: str) -> TemplateDeclaration:
    """The declaration at the top of a template's source (no rendering).

    >>> read_declaration("{#- declare\\nkind: demo\\nimages: 1\\n-#}\\nhello", "x.j2").images
    1
    """
    found = DECLARATION.match(source)
    if not found:
        raise CurationError(
            f"template {name}: no declaration; start the file with a comment '{{#- declare' … '-#}}' "
            "giving at least `kind:` and `images:` (see README, Writing templates)"
        )
    try:
        data = yaml.safe_load(found["body"]) or {}
    except yaml.YAMLError as e:
        raise CurationError(f"template {name}: the declaration is not valid YAML: {e}".replace("\n", " ")) from e
    if not isinstance(data, dict):
        raise CurationError(f"template {name}: the declaration must be `key: value` lines, got {type(data).__name__}")
    try:
        return TemplateDeclaration.model_validate(data)
    except ValidationError as e:
        raise CurationError(f"template {name}: declaration: {validation_message(e, empty='declaration', show_input=False)}") from None


class PromptLoader(FileSystemLoader):
    """Templates by name under the prompt folders, first folder first; a file reached through a
    link that leaves the folders is refused."""

    def __init__(self, roots: list[Path]):
        super().__init__([str(r) for r in roots], followlinks=False)
        self._real = [os.path.realpath(r) + os.sep for r in roots]

    def get_source(self, environment: Any, template: str) -> Any:
        source, filename, uptodate = super().get_source(environment, template)
        if not any(os.path.realpath(filename).startswith(root) for root in self._real):
            raise TemplateNotFound(template, f"{template} leads outside the template folders (it is a link)")
        return source, filename, uptodate


# Types whose every public attribute is safe to read (none changes data or exposes internals),
# and the methods of the built-in containers that change them.
READ_ONLY_TYPES = frozenset({str, int, float, bool, tuple, Namespace, LoopContext, TemplateModule})
MUTATORS: dict[type, frozenset[str]] = {
    list: frozenset({"append", "clear", "extend", "insert", "pop", "remove", "reverse", "sort"}),
    dict: frozenset({"clear", "pop", "popitem", "setdefault", "update"}),
    set: frozenset({"add", "clear", "difference_update", "discard", "intersection_update", "pop", "remove",
                    "symmetric_difference_update", "update"}),
}


# Methods of built-in values a template has no use for and that build values far larger than
# their inputs (a translation table of long strings, tabs expanded to a wide stop).
BLOCKED_METHODS = frozenset({"translate", "maketrans", "expandtabs"})
READ_ONLY_DICT_METHODS = frozenset({"get", "keys", "values", "items"})


def current_budget() -> Budget | None:
    """The budget of the conversation being rendered in this thread (None while compiling)."""
    state = CURRENT_STATE.get(None)
    return None if state is None else state.budget  # type: ignore[no-any-return]


class PromptSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, stricter: reaching an unsafe attribute fails at once (not
    when the value is used), and no call, operator, filter, loop or output may go past the
    rendering's budget (`curation.render.budget`).

    Two fast paths keep it quick without loosening it: `x.key` on a plain dict that has `key`
    returns the value directly (no attribute lookup: a mapping's key wins over a method of the
    same name), and attributes of types known to be read-only skip the generic checks.
    """

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    trusted_owners: tuple[type, ...] = ()  # helpers bound to these (the renderer's) are called directly

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        owner = getattr(obj, "__self__", None)
        kind = type(owner)
        if kind in self.trusted_owners:
            return obj(*args, **kwargs)
        budget = current_budget()
        if kind is dict and budget is not None and getattr(obj, "__name__", "") in READ_ONLY_DICT_METHODS:
            budget.step()  # a lookup: builds nothing
            return obj(*args, **kwargs)
        if budget is None:
            return super().call(context, obj, *args, **kwargs)
        budget.step()
        if getattr(obj, "checks_its_budget", False):  # `wrap_str_format`'s wrapper checks its own
            return super().call(context, obj, *args, **kwargs)
        name = str(getattr(obj, "__name__", "a call")).removeprefix("safe_")
        check_arguments(args, kwargs, name)
        if isinstance(owner, (str, bytes)):
            if name == "replace" and len(args) >= 2:
                check_replace(owner, *args[:3])
            elif name == "join" and args:
                args = (list(args[0]), *args[1:])
                check_join(args[0], owner, "join")
        return budget.value(super().call(context, obj, *args, **kwargs), name)

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        """Jinja's parse, with every loop's items passed through the `_steps` filter: one step
        of the budget each."""
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):
            if not (isinstance(loop.iter, nodes.Filter) and loop.iter.name == "_steps"):
                loop.iter = nodes.Filter(loop.iter, "_steps", [], [], None, None).set_lineno(loop.lineno)
        return tree

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """`"…".format(…)` and `format_map`: Jinja's sandboxed formatter, after a check that the
        pattern asks for no huge field and before a check of what it built."""
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        pattern, name = value.__self__, value.__name__

        def checked(*args: Any, **kwargs: Any) -> str:
            budget = current_budget()
            if budget is not None:
                check_format(pattern, name)
                check_arguments(args, kwargs, name)
            result = wrapped(*args, **kwargs)
            return result if budget is None else budget.value(result, name)  # type: ignore[no-any-return]

        checked.__name__ = name  # errors name the method the template called
        checked.checks_its_budget = True  # type: ignore[attr-defined]
        return checked

    def output_buffer(self) -> OutputBuffer:
        """The buffer of a turn, a macro or a `{% set %}` block: it counts what is written."""
        return OutputBuffer(current_budget())

    def joined(self, parts: tuple[Any, ...]) -> str:
        """`a ~ b ~ c`: checked against the cap before it is built."""
        texts = [str(p) for p in parts]
        budget = current_budget()
        if budget is not None:
            check_join(texts, "", "'~'")
            budget.step()
        return "".join(texts)

    def getattr(self, obj: Any, attribute: str) -> Any:
        if type(obj) is dict and attribute in obj:
            return obj[attribute]
        return super().getattr(obj, attribute)

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if attr.startswith("_") or attr in BLOCKED_METHODS:
            return False
        kind = type(obj)
        if kind in READ_ONLY_TYPES:
            return True
        mutators = MUTATORS.get(kind)
        if mutators is not None:
            return attr not in mutators
        return bool(super().is_safe_attribute(obj, attr, value))

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        raise SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__} is not allowed in templates "
            "(names starting with '_' and methods that change data are blocked)"
        )

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        budget = current_budget()
        if op == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, bytes, list, tuple)) and isinstance(times, int) and len(seq) * times > MAX_SEQUENCE:
                    raise SecurityError(f"'*' would build a value of {len(seq) * times} items; the limit is {MAX_SEQUENCE}")
            result = operator.mul(left, right)
        elif op == "**":
            if isinstance(right, (int, float)) and abs(right) > 100:
                raise SecurityError(f"exponent {right} is too large for a template (limit 100)")
            if isinstance(left, int) and left.bit_length() > 4096:
                raise SecurityError(f"a power of a {left.bit_length()}-bit number is too large for a template")
            result = operator.pow(left, right)
        elif op == "+":
            if isinstance(left, (str, bytes, list, tuple)) and isinstance(right, (str, bytes, list, tuple)):
                size = len(left) + len(right)
                limit = MAX_TEXT if isinstance(left, (str, bytes)) else MAX_ITEMS
                if size > limit:
                    raise BudgetExceeded(f"'+' would build a value of {size:,} items; the limit is {limit:,}")
            result = operator.add(left, right)
        elif op == "%" and isinstance(left, str):
            check_format(left, "'%' formatting")
            check_arguments([right], {}, "'%' formatting")
            result = super().call_binop(context, op, left, right)
        else:
            result = super().call_binop(context, op, left, right)
        return result if budget is None else budget.value(result, f"'{op}'")


class PromptCodeGenerator(CodeGenerator):
    """Jinja's code generator with the sandbox's trusted-call check written into the template.

    A sandboxed template calls everything through `environment.call(context, f, …)` and reads
    every attribute through `environment.getattr(obj, name)`; `PromptSandbox` has a fast path in
    each (the renderer's own helpers — bound methods of a trusted owner — are called directly;
    `x.key` of a plain dict holding `key` is `x["key"]`). The extra Python frames were a tenth of
    a VISTA3D conversation's cost, so the same checks are compiled inline:

        (t(args) if type(getattr((t := f), '__self__', None)) in environment.trusted_owners
         else environment.call(context, t, args))
        (t["key"] if type(t := x) is dict and "key" in t else environment.getattr(t, "key"))

    Exactly what the sandbox's fast paths pass straight through skips it; everything else goes
    through the sandbox as before.
    """

    def buffer(self, frame: Frame) -> None:
        """Output buffers count what is written to them (`PromptSandbox.output_buffer`)."""
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.output_buffer()")

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        """`a ~ b` through `PromptSandbox.joined`, which checks the size first."""
        self.write("environment.joined((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    @optimizeconst
    def visit_Getattr(self, node: nodes.Getattr, frame: Frame) -> None:
        if self.environment.is_async:
            super().visit_Getattr(node, frame)
            return
        obj, key = self.temporary_identifier(), repr(node.attr)
        self.write(f"({obj}[{key}] if type({obj} := ")
        self.visit(node.node, frame)
        self.write(f") is dict and {key} in {obj} else environment.getattr({obj}, {key}))")

    @optimizeconst
    def visit_Call(self, node: nodes.Call, frame: Frame, forward_caller: bool = False) -> None:
        if forward_caller or self.environment.is_async:
            super().visit_Call(node, frame, forward_caller=forward_caller)
            return
        saved, self.stream = self.stream, io.StringIO()  # the arguments' code, written twice below
        try:
            self.signature(node, frame)
            args = self.stream.getvalue()  # ", a, k=v"
        finally:
            self.stream = saved
        callee = self.temporary_identifier()
        self.write(f"({callee}({args[2:]}) if type(getattr(({callee} := ")
        self.visit(node.node, frame)
        self.write(f"), '__self__', None)) in environment.trusted_owners else environment.call(context, {callee}{args}))")


class TurnExtension(Extension):
    """`{% turn "user" %}…{% endturn %}`: one turn of the conversation.

    The tag compiles to two steps: `_turn_begin(role, line)`, then the body as
    `{% filter _turn_end(line) %}…{% endfilter %}` (a variable set inside a turn is local to
    it): `_turn_end(text, line)` adds the message to the render state (`CURRENT_STATE`).
    Both are filters of the environment, so they are called without the sandbox's per-call
    checks. The role comes from the tag, never from the text.
    """

    tags = {"turn"}  # noqa: RUF012 - the type Jinja declares

    def parse(self, parser: Any) -> list[nodes.Node]:
        lineno = next(parser.stream).lineno
        role = parser.parse_expression()
        if not isinstance(role, nodes.Const) or role.value not in ("user", "assistant"):
            parser.fail('a turn is {% turn "user" %} or {% turn "assistant" %} (a quoted role)', lineno)
        body = parser.parse_statements(("name:endturn",), drop_needle=True)
        line = nodes.Const(lineno)
        begin = nodes.ExprStmt(nodes.Filter(role, "_turn_begin", [line], [], None, None))
        turn = nodes.FilterBlock(body, nodes.Filter(None, "_turn_end", [line], [], None, None))
        return [begin.set_lineno(lineno), turn.set_lineno(lineno)]


# The render state of the conversation being rendered in this thread (set by the renderer):
# found this way, a turn works in any template, a macro file imported without context included.
CURRENT_STATE: ContextVar[Any] = ContextVar("m3_curate_render_state")


# `pass_context` (the context itself is not used) keeps Jinja from calling them while it compiles:
# it folds filters of constants into constants, and a turn must happen at render time.
@pass_context
def _turn_begin(context: Any, role: str, line: int) -> str:
    return CURRENT_STATE.get().turn_begin(role, line)  # type: ignore[no-any-return]


@pass_context
def _turn_end(context: Any, text: str, line: int) -> str:
    return CURRENT_STATE.get().turn_end(text, line)  # type: ignore[no-any-return]


@pass_context
def _steps(context: Any, values: Any) -> Any:
    """A loop's items, each one step of the budget (the code generator puts it on every loop)."""
    return counted(values, current_budget())


def _guarded(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
    """Filter `f`, made to respect the budget: its arguments checked before (no huge widths or
    counts; `replace`, `join`, `format`, `indent`, `wordwrap` sized in advance) and its result
    after. The guard takes the context, which also keeps Jinja from running the filter while it
    compiles a template (constant folding would run it with no budget at all)."""
    passes = _PassArg.from_obj(f)

    @pass_context
    @functools.wraps(f)
    def run(context: Context, *args: Any, **kwargs: Any) -> Any:
        budget = current_budget()
        if budget is not None:
            budget.step()
            check_arguments(args, kwargs, f"filter {name}")
            args = _sized(name, args, kwargs)
        first = {_PassArg.context: (context,), _PassArg.eval_context: (context.eval_ctx,),
                 _PassArg.environment: (context.environment,)}.get(passes, ())  # type: ignore[arg-type]
        result = f(*first, *args, **kwargs)
        return result if budget is None else budget.value(result, f"filter {name}")

    return run


def _sized(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """A filter's arguments after the checks that size its result in advance (a `join`'s
    iterable made a list, so it can be measured and then joined)."""
    if name == "replace" and len(args) >= 3:
        check_replace(*args[:4])
    elif name in ("join", "join_and") and args:
        parts = list(args[0])
        check_join([str(p) for p in parts], args[1] if len(args) > 1 else kwargs.get("d", ""), f"filter {name}")
        args = (parts, *args[1:])
    elif name == "format" and args:
        check_format(args[0], "filter format")
    elif name == "format_each":
        check_format(args[1] if len(args) > 1 else kwargs.get("pattern"), "filter format_each")
    elif name in ("indent", "wordwrap") and args and isinstance(args[0], str):
        text = args[0]
        extra = args[1] if len(args) > 1 else kwargs.get("width", 4)
        width = len(extra) if isinstance(extra, str) else (int(extra) if isinstance(extra, int) else 4)
        lines = text.count("\n") + 1 if name == "indent" else len(text) // max(width, 1) + 1
        wrap = len(str(kwargs.get("wrapstring") or (args[3] if len(args) > 3 else "\n")))
        size = len(text) + lines * (width if name == "indent" else wrap)
        if size > MAX_TEXT:
            raise BudgetExceeded(f"filter {name} would build a text of {size:,} characters; the limit is {MAX_TEXT:,}")
    return args


TURN_FILTERS = {"_turn_begin": _turn_begin, "_turn_end": _turn_end, "_steps": _steps}


class PromptContext(Context):
    """Jinja's template context, built without copying: `parent` is the compiled template's
    shared, never-changed dict (its globals, the model card, the helpers) and `vars` this
    rendering's own data (Jinja writes `{% set %}` there too)."""

    def __init__(self, environment: Any, parent: dict[str, Any], name: str | None, blocks: dict[str, Any], vars: dict[str, Any] | None = None,
                 globals: Any = None):
        self.parent = parent
        self.vars = {} if vars is None else vars
        self.environment = environment
        self.eval_ctx = EvalContext(environment, name)
        self.exported_vars = set()
        self.name = name
        self.globals_keys = set() if globals is None else set(globals)
        self.blocks = {k: [v] for k, v in blocks.items()} if blocks else {}


def make_environment(roots: list[Path], *, helpers: Mapping[str, Callable[..., Any]] | None = None,
                     trusted: tuple[type, ...] = ()) -> PromptSandbox:
    """The sandbox that loads and runs templates from `roots`. `helpers` (the renderer's
    functions templates call) become globals of the environment, not only of a rendering's
    context: a macro file imported without context (`{% import "macros.j2" as m %}`, whose
    module Jinja builds once and caches) sees them as the template that imports it does, as it
    sees the filters. `trusted`: the types whose bound methods the sandbox calls directly."""
    env = PromptSandbox(
        loader=PromptLoader(roots),
        undefined=StrictUndefined,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        auto_reload=False,
        cache_size=-1,
        extensions=[TurnExtension],
    )
    env.context_class = PromptContext
    env.code_generator_class = PromptCodeGenerator
    env.globals.pop("lipsum", None)  # random text from the global RNG: not reproducible
    env.filters.pop("random", None)  # same; templates use pick()
    env.filters.update(FILTERS)
    env.filters = {name: _guarded(name, f) for name, f in env.filters.items()}
    env.filters.update(TURN_FILTERS)
    env.globals.update(helpers or {})
    env.trusted_owners = trusted
    return env


def referenced_templates(env: PromptSandbox, name: str, seen: set[str] | None = None) -> list[str]:
    """The template and every template it imports, includes or extends (static names), in a
    stable order."""
    seen = set() if seen is None else seen
    if name in seen:
        return []
    seen.add(name)
    source = env.loader.get_source(env, name)[0]  # type: ignore[union-attr]
    out = [name]
    for ref in sorted(r for r in jinja_meta.find_referenced_templates(env.parse(source)) if r):
        out += referenced_templates(env, ref, seen)
    return out
