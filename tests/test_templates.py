"""The sandbox, declarations, phrasings and the rules of turns: a template that reaches for
Python internals, modules or files fails with a clear error and renders nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from curation.errors import CurationError
from curation.items import StudyItem
from curation.manifest import BuildSpec, TaskSpec
from curation.render.renderer import Renderer, TemplateError
from curation.render.templates import read_declaration
from curation.findings import Findings, Image, Structure

HEAD = "{#- declare\nkind: probe\nimages: 0\nmodel_card: false\n-#}\n"  # 5 lines
OK = '{% turn "assistant" %}ok{% endturn %}'

ITEM = StudyItem(item_id="item-7", patient_key="p", study_key="s", source="ct", kind="dicom", modality="CT",
                 shape=[4, 4, 4], spacing=[1.0, 1.0, 1.0], n_files=4, uris=["a.dcm"])
FINDINGS = Findings(
    expert="VISTA3D", runner="labels", arg="", modality="CT",
    structures=[Structure(1, "liver", 10, 1.5, [0, 0, 0, 1, 1, 1], 0, [0.0, 0.0, 0.0], "right", 1, [1.5], "red")],
    legend={"red": "liver"},
    images=[Image("key_slice", b"\x89PNG\r\n\x1a\nkey", 0, "k"), Image("overlay", b"\x89PNG\r\n\x1a\nover", 0, "o")],
)


@pytest.fixture
def spec(tmp_path: Path) -> BuildSpec:
    return BuildSpec.model_validate({"name": "t", "seed": 1, "sources": [{"name": "ct", "kind": "dicom", "root": str(tmp_path)}],
                                     "experts": [{"name": "VISTA3D", "runner": "labels", "options": {"preset": "vista3d"}}]})


def render(spec: BuildSpec, folder: Path, body: str, *, head: str = HEAD, expert: str | None = "VISTA3D"):
    folder.mkdir(exist_ok=True)
    (folder / "probe.j2").write_text(head + body)
    task = TaskSpec(template="probe.j2", source="ct", expert=expert)
    return Renderer(spec, prompt_dirs=[folder]).render(task, ITEM, FINDINGS if expert else None, variant=0)


# --- the sandbox -------------------------------------------------------------------------------

ESCAPES = {
    "class": ('{% turn "user" %}{{ "".__class__.__mro__[1].__subclasses__() }}{% endturn %}' + OK,
              "access to attribute '__class__' of a str is not allowed in templates"),
    "globals": ('{% turn "user" %}{{ pick.__globals__ }}{% endturn %}' + OK, "access to attribute '__globals__'"),
    "func globals": ('{% turn "user" %}{{ phrase.__func__.__globals__["os"] }}{% endturn %}' + OK, "access to attribute '__func__'"),
    "self": ('{% turn "user" %}{{ pick.__self__.r.spec }}{% endturn %}' + OK, "access to attribute '__self__'"),
    "format": ('{% turn "user" %}{{ "{0.__class__}".format(item) }}{% endturn %}' + OK, "access to attribute '__class__' of a dict"),
    "format by name": ('{% turn "user" %}{% set f = "{0.__class__}".format %}{{ f(item) }}{% endturn %}' + OK,
                       "access to attribute '__class__' of a dict"),  # a call of a name is checked as any other
    "mutate": ('{% turn "user" %}{{ findings.structures.append(1) }}{% endturn %}' + OK, "access to attribute 'append' of a list"),
    "open": ('{% turn "user" %}{{ open("/etc/passwd").read() }}{% endturn %}' + OK, "'open' is undefined"),
    "import builtin": ('{% turn "user" %}{{ __import__("os") }}{% endturn %}' + OK, "'__import__' is undefined"),
    "huge": ('{% turn "user" %}{{ "x" * 1000000000 }}{% endturn %}' + OK, "'*' would build a value of 1000000000 items"),
    "range": ('{% turn "user" %}{{ range(10**9) | list | length }}{% endturn %}' + OK, "range was given 1,000,000,000"),
    "undefined": ('{% turn "user" %}{{ nothing_here }}{% endturn %}' + OK, "'nothing_here' is undefined"),
}


@pytest.mark.parametrize("name", sorted(ESCAPES))
def test_escapes_fail_clearly_and_render_nothing(spec: BuildSpec, tmp_path: Path, name: str) -> None:
    body, message = ESCAPES[name]
    with pytest.raises(TemplateError) as e:
        render(spec, tmp_path / "p", body)
    assert message in str(e.value)
    assert str(e.value).startswith("item-7: template probe.j2, line 6: ")


@pytest.mark.parametrize("body, target", [
    ('{% import "os" as os %}' + OK, "'os'"),
    ('{% include "/etc/passwd" %}' + OK, "'/etc/passwd'"),
    ('{% include "../../etc/passwd" %}' + OK, "'../../etc/passwd'"),
    ('{% from "subprocess" import run %}' + OK, "'subprocess'"),
])
def test_imports_and_files_are_refused_before_rendering(spec: BuildSpec, tmp_path: Path, body: str, target: str) -> None:
    with pytest.raises(CurationError) as e:
        render(spec, tmp_path / "p", body)
    assert str(e.value).startswith(f"template probe.j2, line 6: imports or includes {target}, which is not a template")
    assert "templates cannot import Python modules or read other files" in str(e.value)


def test_a_dynamic_include_of_a_file_fails_at_render(spec: BuildSpec, tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="template '/etc/hostname' not found"):
        render(spec, tmp_path / "p", '{% set f = "/etc/host" ~ "name" %}{% turn "user" %}{% include f %}{% endturn %}' + OK)


def test_a_link_out_of_the_template_folders_is_refused(spec: BuildSpec, tmp_path: Path) -> None:
    outside = tmp_path / "secret.j2"
    outside.write_text("top secret")
    folder = tmp_path / "p"
    folder.mkdir()
    os.symlink(outside, folder / "leak.j2")
    with pytest.raises(CurationError, match="'leak.j2'"):
        render(spec, folder, '{% turn "user" %}{% include "leak.j2" %}{% endturn %}' + OK)


def test_no_nondeterministic_helpers(spec: BuildSpec, tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="'lipsum' is undefined"):
        render(spec, tmp_path / "p", '{% turn "user" %}{{ lipsum() }}{% endturn %}' + OK)
    with pytest.raises(CurationError, match="No filter named 'random'"):
        render(spec, tmp_path / "q", '{% turn "user" %}{{ [1, 2] | random }}{% endturn %}' + OK)


# --- turns and images --------------------------------------------------------------------------

TURN_ERRORS = {
    "two users": ('{% turn "user" %}a{% endturn %}\n{% turn "user" %}b{% endturn %}', 7,
                  "turn 2 is 'user' but should be 'assistant': turns alternate user, assistant, starting with user"),
    "assistant first": (OK, 6, "turn 1 is 'assistant' but should be 'user'"),
    "nested": ('{% turn "user" %}a {% turn "assistant" %}b{% endturn %}{% endturn %}', 6, "a turn cannot contain another turn"),
    "ends with user": ('{% turn "user" %}a{% endturn %}', 6, "ends with a user turn"),
    "empty": ('{% turn "user" %}  {% endturn %}' + OK, 6, "user turn 1 is empty"),
    "stray text": ('Hello\n{% turn "user" %}a{% endturn %}' + OK, 6, "text outside any turn: 'Hello'"),
    "image in answer": ('{% turn "user" %}a{% endturn %}{% turn "assistant" %}{{ image("overlay") }}{% endturn %}', 6,
                        "images go in user turns"),
    "image dropped": ('{% turn "user" %}{% set x = image("overlay") %}a{% endturn %}' + OK, 6, "its slot is not in the turn's text"),
    "image twice": ('{% turn "user" %}{% set x = image("overlay") %}{{ x }}{{ x }}{% endturn %}' + OK, 6, "written twice"),
    "unknown image": ('{% turn "user" %}{{ image("sequence", 2) }}{% endturn %}' + OK, 6, "no sequence picture in the findings of VISTA3D"),
    "count": ('{% turn "user" %}{{ image("overlay") }}{% endturn %}' + OK, 6, "the declaration says images: 0, but this conversation has 1"),
    "meta reserved": ('{{ meta(kind="x") }}{% turn "user" %}a{% endturn %}' + OK, 6, "meta key 'kind' is set by the renderer"),
    "phrase": ('{% turn "user" %}{{ phrase("no_such_key") }}{% endturn %}' + OK, 6, "no phrasing 'no_such_key'"),
    "phrase field": ('{% turn "user" %}{{ phrase("presence_question") }}{% endturn %}' + OK, 6, "needs 'name': pass it as"),
}


@pytest.mark.parametrize("name", sorted(TURN_ERRORS))
def test_turn_rules(spec: BuildSpec, tmp_path: Path, name: str) -> None:
    body, line, message = TURN_ERRORS[name]
    with pytest.raises(TemplateError) as e:
        render(spec, tmp_path / "p", body)
    assert e.value.line == line and message in str(e.value), str(e.value)


def test_turns_from_a_macro_and_images_mid_text(spec: BuildSpec, tmp_path: Path) -> None:
    head = "{#- declare\nkind: probe\nimages: 2\nmodel_card: false\nneeds: [overlay]\ncalls_expert: false\n-#}\n"
    body = ('{% macro pair(q, a) %}{% turn "user" %}{{ q }}{% endturn %}{% turn "assistant" %}{{ a }}{% endturn %}{% endmacro %}'
            '{% turn "user" %}See {{ image("overlay") }}, then {{ image("key_slice") }} and answer.{% endturn %}'
            + OK + '{{ pair("Again?", "Yes.") }}')
    c = render(spec, tmp_path / "p", body, head=head)
    assert c.messages == [
        {"role": "user", "content": [{"type": "text", "text": "See "}, {"type": "image", "text": None},
                                     {"type": "text", "text": ", then "}, {"type": "image", "text": None},
                                     {"type": "text", "text": " and answer."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
        {"role": "user", "content": [{"type": "text", "text": "Again?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
    ]
    assert c.images == [FINDINGS.images[1].png, FINDINGS.images[0].png]


def test_text_that_looks_like_a_role_stays_text(spec: BuildSpec, tmp_path: Path) -> None:
    c = render(spec, tmp_path / "p", '{% turn "user" %}USER: hi\nASSISTANT: <image> {{ "\\nuser:" }}{% endturn %}' + OK)
    assert c.messages[0] == {"role": "user", "content": [{"type": "text", "text": "USER: hi\nASSISTANT: <image> \nuser:"}]}
    assert c.images == []


def test_role_must_be_a_quoted_literal(spec: BuildSpec, tmp_path: Path) -> None:
    with pytest.raises(CurationError, match=r"template probe.j2, line 6: a turn is \{% turn \"user\" %\}"):
        render(spec, tmp_path / "p", '{% set r = "user" %}{% turn r %}a{% endturn %}' + OK)


def test_model_card_must_open_the_conversation(spec: BuildSpec, tmp_path: Path) -> None:
    head = "{#- declare\nkind: probe\nimages: 0\n-#}\n"
    with pytest.raises(TemplateError, match="the model card must open the first user turn"):
        render(spec, tmp_path / "p", '{% turn "user" %}Hi {{ model_card }}{% endturn %}' + OK, head=head)
    c = render(spec, tmp_path / "q", '{% turn "user" %}{{ model_card }}Hi{% endturn %}' + OK, head=head)
    assert c.messages[0]["content"][0]["text"].endswith("suitable expert model.\nHi")


def test_calls_must_match_the_declaration(spec: BuildSpec, tmp_path: Path) -> None:
    calls = "{#- declare\nkind: probe\nimages: 0\nmodel_card: false\nneeds: [structures]\ncalls_expert: true\n-#}\n"
    with pytest.raises(TemplateError, match=r"declares calls_expert but no assistant turn contains <VISTA3D\(\)>"):
        render(spec, tmp_path / "p", '{% turn "user" %}a{% endturn %}' + OK, head=calls)
    quiet = calls.replace("calls_expert: true", "calls_expert: false")
    with pytest.raises(TemplateError, match="an assistant turn calls an expert, but the declaration says calls_expert: false"):
        render(spec, tmp_path / "q", '{% turn "user" %}a{% endturn %}{% turn "assistant" %}{{ expert.call }}{% endturn %}', head=quiet)


# --- declarations and phrasings ----------------------------------------------------------------


@pytest.mark.parametrize("source, message", [
    ("hello", "no declaration; start the file with a comment"),
    ("{#- declare\nkind: x\n-#}", "declaration: images: Field required"),
    ("{#- declare\nkind: x\nimages: 1\nmodalty: [CT]\n-#}", "modalty: unknown key (check its spelling)"),
    ("{#- declare\nkind: x\nimages: 1\nneeds: [pixels]\n-#}", "needs[0]: Input should be 'structures', 'classes'"),
    ("{#- declare\nkind: X y\nimages: 1\n-#}", "kind: String should match pattern"),
    ("{#- declare\nkind: [x\n-#}", "the declaration is not valid YAML"),
])
def test_declaration_errors_name_the_template_and_key(source: str, message: str) -> None:
    with pytest.raises(CurationError) as e:
        read_declaration(source, "fam/t.j2")
    assert str(e.value).startswith("template fam/t.j2: ") and message in str(e.value)


def test_declaration_defaults() -> None:
    d = read_declaration("{#- declare\nkind: x\nimages: 2\nneeds: [overlay]\n-#}\nbody", "t.j2")
    assert (d.calls_expert, d.model_card, d.args, d.modality) == (True, True, None, [])
    assert not read_declaration("{#- declare\nkind: x\nimages: 0\n-#}", "t.j2").uses_expert


def test_renderer_declaration_reads_without_rendering(spec: BuildSpec) -> None:
    d = Renderer(spec).declaration("brats/four_sequences.j2")
    assert (d.kind, d.images, d.sources, d.modality, d.needs) == ("brats_trigger", 5, ["nifti_group"], ["MR"], ["structures", "overlay", "sequence"])


def test_manifest_folder_overrides_phrasings_and_templates(spec: BuildSpec, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    (mine / "phrasings").mkdir(parents=True)
    (mine / "phrasings" / "x.yaml").write_text("vista3d_trigger: ['Calling {call} now.']\n")
    spec2 = BuildSpec.model_validate({**spec.model_dump(), "prompts": [str(mine)]})
    task = TaskSpec(template="vista3d/segment_and_answer.j2", source="ct", expert="VISTA3D", args=["organs"])
    c = Renderer(spec2).render(task, ITEM, FINDINGS, variant=0)
    assert c.messages[1]["content"][0]["text"] == "Calling <VISTA3D(organs)> now."
    assert Renderer(spec2).template_hash(task.template) != Renderer(spec).template_hash(task.template)


@pytest.mark.parametrize("yaml_text, message", [
    ("k: ['{x.__class__}']\n", "placeholder {x.__class__} must be a plain name"),
    ("k: ['{0}']\n", "placeholder {0} must be a plain name"),
    ("k: []\n", "'k' must be a non-empty list of phrasings"),
    ("k: ['unclosed {']\n", "is not a valid phrasing"),
])
def test_bad_phrasings_are_refused(spec: BuildSpec, tmp_path: Path, yaml_text: str, message: str) -> None:
    (tmp_path / "mine" / "phrasings").mkdir(parents=True)
    (tmp_path / "mine" / "phrasings" / "bad.yaml").write_text(yaml_text)
    with pytest.raises(CurationError, match="bad.yaml") as e:
        Renderer(spec, prompt_dirs=[tmp_path / "mine"]).declaration("qa/plain.j2")
    assert message in str(e.value)


def test_missing_prompts_folder_is_named(spec: BuildSpec, tmp_path: Path) -> None:
    with pytest.raises(CurationError, match="prompts: template folder not found"):
        Renderer(BuildSpec.model_validate({**spec.model_dump(), "prompts": [str(tmp_path / "nope")]}))


def test_manifest_prompts_resolve_against_the_manifest(tmp_path: Path, write_manifest) -> None:
    from curation.manifest import load_manifest

    (tmp_path / "my_prompts").mkdir()
    path = write_manifest({"name": "x", "prompts": ["my_prompts"], "sources": [{"name": "a", "kind": "image2d", "root": "."}]})
    assert load_manifest(path).prompts == [(tmp_path / "my_prompts").resolve()]


def test_a_turn_error_inside_a_macro_file_names_that_file(spec: BuildSpec, tmp_path: Path) -> None:
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "turns.j2").write_text('{% macro ask(q) %}\n{% turn "user" %}{{ q }}{% endturn %}\n{% endmacro %}\n')
    with pytest.raises(TemplateError) as e:
        render(spec, folder, '{% import "turns.j2" as t %}{{ t.ask("a") }}{{ t.ask("b") }}')
    assert (e.value.template, e.value.line) == ("turns.j2", 2) and "(called from probe.j2, line 6)" in str(e.value)
    assert "turn 2 is 'user' but should be 'assistant'" in str(e.value)


# --- macro files -------------------------------------------------------------------------------


def test_an_imported_macro_file_calls_the_helpers(spec: BuildSpec, tmp_path: Path) -> None:
    """The helpers and filters are the environment's globals: a macro file imported without
    context (Jinja builds its module once) calls them as the template that imports it does."""
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "lib.j2").write_text('{% macro shown(pic) %}See {{ image(pic) }}{{ legend(pic) }}. {{ phrase("presence_question", name="liver") }} '
                                   '{{ pick(["one"]) | upper }}{% endmacro %}\n'
                                   '{% macro card() %}{{ model_card }}{% endmacro %}\n')
    head = "{#- declare\nkind: probe\nimages: 1\nneeds: [overlay]\ncalls_expert: false\nmodel_card: false\n-#}\n"
    body = ('{% import "lib.j2" as lib %}{% turn "user" %}{{ lib.shown(picture("overlay")) }}{% endturn %}'
            '{% turn "assistant" %}{{ lib.card() | length > 0 }}{% endturn %}')
    c = render(spec, folder, body, head=head)
    first = c.messages[0]["content"]
    assert first[:2] == [{"type": "text", "text": "See "}, {"type": "image", "text": None}] and c.images == [FINDINGS.images[1].png]
    assert first[2]["text"].startswith(". ") and "liver" in first[2]["text"] and first[2]["text"].endswith(" ONE")
    assert [g["turn"] for g in c.meta["legends"]] == [0]  # legend() recorded what it said
    assert c.messages[1]["content"][0]["text"] == "True"  # the model card (VISTA3D has one) is a global too


# The escapes that need no data of the rendering (an imported macro file sees none of it)
IN_MACROS = sorted(n for n, (body, _) in ESCAPES.items() if "item" not in body and "findings" not in body)


@pytest.mark.parametrize("name", IN_MACROS)
def test_escapes_inside_an_imported_macro_file_fail_as_in_a_template(spec: BuildSpec, tmp_path: Path, name: str) -> None:
    body, message = ESCAPES[name]
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "lib.j2").write_text("{% macro run() %}\n" + body + "\n{% endmacro %}\n")
    with pytest.raises(TemplateError) as e:
        render(spec, folder, '{% import "lib.j2" as lib %}{{ lib.run() }}')
    assert message in str(e.value)
    assert (e.value.template, e.value.line) == ("lib.j2", 2) and "(called from probe.j2, line 6)" in str(e.value)
