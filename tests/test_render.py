"""Every template renders demo findings into valid `messages` whose `meta` follows the contract,
every fact an answer states is recomputed here from the Findings and the truth, and every
conversation passes the grounding check as `m3-curate audit` runs it (from the row's own data);
same seed → same rows; enough variety across seeds."""

from __future__ import annotations

import json
import pickle
import re
from collections import defaultdict
from pathlib import Path

import pytest
from render_factory import TASKS, Demo

from curation.errors import CurationError
from curation.expert_info import ExpertInfo
from curation.findings import png_digest
from curation.manifest import BuildSpec, TaskSpec
from curation.render import grounding
from curation.render.helpers import findings_view
from curation.render.renderer import Renderer, TemplateError, TemplateSkip
from curation.render.filters import label_text, ml_text
from curation.render.templates import BUILTIN_PROMPTS
from curation.rows import ANSWER_FROM, META_KEYS, QUESTION_KINDS, Conversation

VARIANTS = 6


@pytest.fixture(scope="module")
def demo(render_demo: Demo) -> Demo:
    return render_demo


@pytest.fixture(scope="module")
def renderer(demo: Demo) -> Renderer:
    return Renderer(demo.spec, experts=demo.experts)


def render_all(renderer: Renderer, demo: Demo, task: TaskSpec, variants: int = VARIANTS):
    """(item, variant, findings, conversation or TemplateSkip) for every item and variant."""
    out = []
    for item in demo.items_of(task.source):
        for v in range(variants):
            f = demo.get(task, item, v)
            try:
                out.append((item, v, f, renderer.render(task, item, f, variant=v)))
            except TemplateSkip as e:
                out.append((item, v, f, e))
    return out


def texts(c: Conversation, role: str) -> list[str]:
    return ["".join(p["text"] for p in m["content"] if p["type"] == "text") for m in c.messages if m["role"] == role]


def test_every_template_is_exercised(demo: Demo) -> None:
    on_disk = {p.relative_to(BUILTIN_PROMPTS).as_posix() for p in BUILTIN_PROMPTS.glob("*/*.j2")}
    assert on_disk == {t.template for t in demo.spec.tasks}


def test_every_demo_task_fits_its_template(renderer: Renderer) -> None:
    """`check()` passes, and what it passed on is what the declarations say: a task names an
    expert exactly when its template uses one, and that expert gives what the template needs."""
    assert any(renderer.experts.get(t.expert or "") for t in renderer.spec.tasks)
    renderer.check()
    for task in renderer.spec.tasks:
        declared = renderer.declaration(task.template)
        assert (task.expert is not None) == declared.uses_expert, task.template
        info = renderer.experts.get(task.expert) if task.expert else None  # the render demo describes every expert but BRATS
        if info is not None:
            assert info.gives(declared.needs) is not False, task.template


def test_model_card_lists_the_called_experts_in_vila_m3_order(renderer: Renderer) -> None:
    card = renderer.model_card
    assert card.startswith("Here is a list of available expert models:\n<BRATS(args)> Modality: MRI")
    order = [card.index(f"<{name}(args)>") for name in ("BRATS", "VISTA3D", "CXR", "CT_TISSUE")]
    assert order == sorted(order)  # VILA-M3's order (BRATS, VISTA3D, CXR), then ours (CT_TISSUE, by its runner's card)
    assert "PICTURE" not in card  # no card, and no task calls it
    assert card.endswith("Give the model <NAME(args)> when selecting a suitable expert model.\n")


def check_meta(c: Conversation, d, task: TaskSpec, v: int, where: str) -> None:
    """The meta contract (see curation.rows)."""
    meta = c.meta
    assert set(META_KEYS) <= set(meta), (where, set(META_KEYS) - set(meta))
    json.dumps(meta)
    assert meta["kind"] == d.kind and meta["template"] == task.template and meta["variant"] == v
    assert meta["question_kind"] in QUESTION_KINDS and meta["answer_from"] in (*ANSWER_FROM, None), where
    assistant = [t for t, m in enumerate(c.messages) if m["role"] == "assistant"]
    assert len(meta["calls"]) == len(assistant), where
    if meta["answer"] is not None:
        assert meta["answer_turn"] in assistant and meta["answer_from"] is not None, where
    assert [p["digest"] for p in meta["images"]] == [png_digest(png) for png in c.images], where
    for fact in meta["facts"]:
        assert fact["turn"] in assistant and (fact["shown"] or fact["given"]), (where, fact)
    assert meta["prompt"]["card"] == d.model_card, where


@pytest.mark.parametrize("index", range(len(TASKS)), ids=[f"{t['template']}@{t['source']}:{t.get('expert')}" for t in TASKS])
def test_renders_valid_messages_and_true_facts(renderer: Renderer, demo: Demo, index: int) -> None:
    task = demo.spec.tasks[index]
    d = renderer.declaration(task.template)
    results = render_all(renderer, demo, task)
    made = [r for r in results if isinstance(r[3], Conversation)]
    assert len(made) >= len(results) // 2, f"{task.template}: most renders skipped: {[str(r[3]) for r in results if not isinstance(r[3], Conversation)][:3]}"
    for item, v, f, c in made:
        where = f"{task.template} on {item.item_id} variant {v}"
        roles = [m["role"] for m in c.messages]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles, where
        assert c.image_parts() == len(c.images) == d.images, where
        assert all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in c.images), where
        assert all(p["type"] in ("text", "image") and (p["text"] is None) == (p["type"] == "image") for m in c.messages for p in m["content"])
        assert all(p["text"].strip() for m in c.messages for p in m["content"] if p["type"] == "text"), where
        assert not any(p["type"] == "image" for m in c.messages if m["role"] == "assistant" for p in m["content"]), where
        first = c.messages[0]["content"][0]
        assert (first["type"] == "text" and first["text"].startswith(renderer.model_card.rstrip())) == d.model_card, where
        check_meta(c, d, task, v, where)
        assert c.template_hash == renderer.template_hash(task.template)
        call = f"<{task.expert}({task.args[v % len(task.args)]})>" if task.expert else None
        if d.calls_expert:
            assert c.expert == task.expert and c.meta["call"] == call and call in c.meta["calls"], where
        else:
            assert c.expert is None and c.meta["calls"] == [None] * len(c.meta["calls"]), where
            assert not any(re.search(r"<[A-Z_0-9]+\(", t) for t in texts(c, "assistant")), where
        FACTS[d.kind](c, f, item, where)
        assert "\x00" not in json.dumps(c.messages)
        # the same check `m3-curate audit` runs on a written row: its own bytes, meta and findings JSON
        found = grounding.problems(c.messages, [png_digest(png) for png in c.images], json.loads(json.dumps(c.meta)),
                                   json.loads(json.dumps(f.to_dict())) if f is not None else None)
        assert found == [], (where, found)


# --- the facts each kind states, recomputed from Findings and the truth ----------------------


def last_answer(c: Conversation) -> str:
    return texts(c, "assistant")[-1]


def picture_of(c: Conversation, f, slot: int):
    """The findings picture that row image `slot` is (checked by its bytes)."""
    img = f.images[c.meta["images"][slot]["index"]]
    assert img.png == c.images[slot]
    return img


def legend_stated(c: Conversation, f, where: str) -> list[str]:
    """The result turn names exactly the colours drawn on its overlay, in drawing order; the
    names drawn."""
    result = texts(c, "user")[1]
    overlay = picture_of(c, f, len(c.images) - 1)
    colours = {s.name: s.colour for s in f.structures}
    drawn = [n for n in overlay.labels if colours.get(n)]
    for name in drawn:
        assert f"{colours[name]}: " in result and name in result, where
    named = grounding.LEGEND.findall(result)
    assert set(named) == {colours[n] for n in drawn}, (where, named, drawn)
    return drawn


def truth_names(f) -> set[str]:
    return {s.name for s in f.truth.structures}


def fact_expert_trigger(c, f, item, where):
    drawn = legend_stated(c, f, where)
    answer = last_answer(c)
    colours = {s.name: s.colour for s in f.structures}
    for name in drawn:
        assert f"the {name} ({colours[name]})" in answer, where
    if f.structures:
        biggest = max(f.structures, key=lambda s: s.volume_ml)
        assert c.meta["largest"] == biggest.name and biggest.name in answer and ml_text(biggest.volume_ml) in answer, where
        assert f"{biggest.name} {ml_text(biggest.volume_ml)}" in texts(c, "user")[1], where  # given by the result turn
    else:
        assert "none of" in answer.lower(), where


def fact_direct_request(c, f, item, where):
    assert c.meta["question_kind"] == "expert_selection" and c.meta["answer"] is None
    assert c.meta["call"] in last_answer(c) and "segmented" in last_answer(c), where


def fact_tumor_count(c, f, item, where):
    tumour = "hepatic tumor"  # hepatic tumor and hepatoma both name VISTA3D label 26
    truly = tumour in truth_names(f)
    found = f.structure(tumour)
    assert c.meta["answer"] == ("yes" if truly else "no") and c.meta["answer_from"] == "truth", where
    legend_stated(c, f, where)
    scan = picture_of(c, f, 0)
    if truly:  # the question's picture is the slice through the tumour
        assert scan.slice == next(s for s in f.truth.structures if s.name == tumour).key_slice and tumour in scan.truth, where
    answers = texts(c, "assistant")
    assert answers[1].lower().startswith(c.meta["answer"]), where
    if truly and found:
        assert len(c.messages) == 6 and c.meta["count"] == found.components, where
        assert re.search(rf"\b{found.components}\b", answers[2]), where
        assert f"({found.components} lesion" in texts(c, "user")[1], where  # the count is given first
        assert texts(c, "user")[2] == c.meta["follow_up"], where
    else:
        assert len(c.messages) == 4, where


def fact_brats(c, f, item, where):
    whole = f.structure("whole tumor")
    answer = last_answer(c)
    drawn = legend_stated(c, f, where)
    if len(drawn) == 3:
        assert "yellow and red: tumor core, only yellow: enhancing tumor, all colors: whole tumor" in texts(c, "user")[1], where
    if c.meta["question_kind"] == "size":
        assert whole is not None and c.meta["answer"] == ml_text(whole.volume_ml) and ml_text(whole.volume_ml) in answer, where
        assert c.meta["answer_from"] == "findings", where
    else:
        truly = "whole tumor" in truth_names(f)
        assert c.meta["answer"] == ("yes" if truly else "no") and answer.lower().startswith(c.meta["answer"]), where
        assert c.meta["answer_from"] == "truth", where
        if truly:
            assert "whole tumor" in picture_of(c, f, 3).truth, where  # the FLAIR slice shows it


def fact_modality(c, f, item, where):
    assert item.modality == "MR" and "brain MRI" in last_answer(c), where


def item_labels(item) -> dict[str, bool]:
    return {label_text(k): bool(int(v)) for k, v in item.attrs["labels"].items()}


def predictions_stated(c, f, where, turn):
    lines = "\n".join(f"{label_text(k.name)}: {'yes' if k.present else 'no'}" for k in f.classes)
    assert lines in texts(c, "user")[turn], where


def fact_yes_no(c, f, item, where):
    truth = item_labels(item)[label_text(c.meta["label"])]
    assert c.meta["answer"] == ("yes" if truth else "no") and c.meta["answer_from"] == "truth", where
    assert last_answer(c).lower().startswith(c.meta["answer"]), where
    hint = next(k for k in f.classes if label_text(k.name) == label_text(c.meta["label"]))
    assert c.meta["hint_agrees"] == (hint.present == truth), where


def fact_cxr_trigger(c, f, item, where):
    predictions_stated(c, f, where, 1)
    if c.meta["question_kind"] == "yes_no":
        fact_yes_no(c, f, item, where)
    else:
        present = [k for k, v in item_labels(item).items() if v]
        assert sorted(c.meta["answer"]) == sorted(present), where
        for label in present:
            assert label in last_answer(c), where
        if not present:
            assert "no abnormal" in last_answer(c).lower(), where


def fact_cxr_hint_yes_no(c, f, item, where):
    predictions_stated(c, f, where, 0)
    fact_yes_no(c, f, item, where)


def fact_cxr_choice(c, f, item, where):
    predictions_stated(c, f, where, 0)
    present = {k for k, v in item_labels(item).items() if v}
    options, letter = c.meta["options"], c.meta["answer"]
    truth = options["ABCD".index(letter)]
    assert truth == c.meta["label"] and (truth in present or (truth == "no finding" and not present)), where
    assert all(o not in present for o in options if o != truth), where
    for n, option in enumerate(options):
        assert f"{'ABCD'[n]}) {option}" in texts(c, "user")[0], where
    assert f"{letter}) {truth}" in last_answer(c), where


def fact_presence(c, f, item, where):
    name = c.meta["structure"]
    present = name in truth_names(f)
    assert c.meta["answer"] == ("yes" if present else "no") and c.meta["answer_from"] == "truth", where
    assert last_answer(c).lower().startswith(c.meta["answer"]), where
    scan = picture_of(c, f, 0)
    assert (name in scan.truth) == present, where  # asked over the slice through it, when it is there


def fact_larger(c, f, item, where):
    a, b = (f.structure(n) for n in c.meta["structures"])
    bigger, smaller = (a, b) if a.volume_ml > b.volume_ml else (b, a)
    assert c.meta["answer"] == bigger.name and c.meta["answer_from"] == "findings", where
    answer, result = last_answer(c), texts(c, "user")[1]
    for s in (bigger, smaller):
        assert ml_text(s.volume_ml) in answer and f"{s.name} {ml_text(s.volume_ml)}" in result, where


def fact_volume(c, f, item, where):
    s = f.structure(c.meta["structure"])
    assert c.meta["answer"] == ml_text(s.volume_ml) and ml_text(s.volume_ml) in last_answer(c), where
    assert f"{s.name} {ml_text(s.volume_ml)}" in texts(c, "user")[1], where  # the result turn gives it


def fact_side(c, f, item, where):
    s = next(t for t in f.truth.structures if t.name == c.meta["structure"])
    assert s.side in ("left", "right") and c.meta["answer"] == s.side and s.side in last_answer(c), where
    assert "left" not in s.name.split() and "right" not in s.name.split(), where
    assert s.name in picture_of(c, f, 0).truth, where


def fact_qa(c, f, item, where):
    qa = item.attrs["qa"]
    assert c.meta["answer"] == qa[0]["answer"] and c.meta["question"] == qa[0]["question"], where
    assert c.meta["answer_from"] == "truth", where
    answers = texts(c, "assistant")
    assert answers[-len(qa):] == [q["answer"] for q in qa], where
    assert qa[0]["question"] in texts(c, "user")[0], where
    if c.meta["kind"] != "qa_plain":
        predictions_stated(c, f, where, 1 if c.meta["kind"] == "qa_expert_trigger" else 0)


FACTS = {
    "expert_trigger": fact_expert_trigger,
    "direct_request": fact_direct_request,
    "tumor_count": fact_tumor_count,
    "brats_trigger": fact_brats,
    "modality_question": fact_modality,
    "cxr_trigger": fact_cxr_trigger,
    "cxr_hint_yes_no": fact_cxr_hint_yes_no,
    "cxr_hint_choice": fact_cxr_choice,
    "grounded_presence": fact_presence,
    "grounded_larger": fact_larger,
    "grounded_volume": fact_volume,
    "grounded_side": fact_side,
    "qa_expert_trigger": fact_qa,
    "qa_expert_hint": fact_qa,
    "qa_plain": fact_qa,
}


def test_vila_m3_phrasings_appear(renderer: Renderer, demo: Demo) -> None:
    """The exact VILA-M3 wording of the result and hint turns."""
    ct = TaskSpec(template="vista3d/segment_and_answer.j2", source="ct", expert="VISTA3D", args=["organs"])
    item = demo.items_of("ct")[0]
    c = renderer.render(ct, item, demo.get(ct, item, 0), variant=0)
    assert c.messages[0]["content"][2]["text"].startswith("This is a CT image.\n")
    assert c.messages[2]["content"][0]["text"] == "The results are "
    assert c.messages[2]["content"][2]["text"].startswith(". The colors in this image describe ")
    assert "Measured volumes: liver " in c.messages[2]["content"][2]["text"]
    assert "Use this result to respond to this prompt:\n" in c.messages[2]["content"][2]["text"]
    hint = TaskSpec(template="cxr/expert_hint_vqa.j2", source="cxr", expert="CXR")
    item = demo.items_of("cxr")[0]
    c = renderer.render(hint, item, demo.get(hint, item, 0), variant=0)
    assert ("When answering the question, please analyze the image and incorporate the additional results generated by "
            "an expert classification model:\natelectasis: ") in c.messages[0]["content"][2]["text"]
    brats = TaskSpec(template="brats/four_sequences.j2", source="brain", expert="BRATS")
    item = demo.items_of("brain")[0]
    c = renderer.render(brats, item, demo.get(brats, item, 0), variant=0)
    content = c.messages[0]["content"]
    assert [p["type"] for p in content] == ["text", "image", "text", "image", "text", "image", "text", "image", "text"]
    assert content[0]["text"].endswith("T1(contrast enhanced): ") and content[2]["text"] == ", T1: "
    assert content[8]["text"].startswith(" These are different MRI modalities.\n")


# VILA-M3's fixed sentences (a piece of each), written once in prompts/macros.j2; the text a
# test's copy of the macros writes instead, to see which conversations take it from there.
VILA_M3_SENTENCES = {
    "The results are ": "RESULTS-ARE ",
    "The colors in this image describe ": "COLOURS-DESCRIBE ",
    "Use this result to respond to this prompt:": "USE-THIS-RESULT:",
    "The resulting predictions are:": "PREDICTIONS-ARE:",
    "Analyze the image and take these predictions into account": "TAKE-PREDICTIONS",
    "When answering the question, please analyze the image and incorporate": "INCORPORATE-HINTS",
    "T1(contrast enhanced): ": "T1C-IS ",
    "These are different MRI modalities.": "MRI-MODALITIES.",
}


def _code(path: Path) -> str:
    """A template's text less its comments (which may quote what it writes)."""
    return re.sub(r"\{#.*?#\}", "", path.read_text(), flags=re.DOTALL)


def test_vila_m3_sentences_are_written_once_in_the_macros() -> None:
    macros = _code(BUILTIN_PROMPTS / "macros.j2")
    for sentence in VILA_M3_SENTENCES:
        assert macros.count(sentence) == 1, sentence
        writers = [p.relative_to(BUILTIN_PROMPTS).as_posix() for p in BUILTIN_PROMPTS.rglob("*.j2")
                   if p.name != "macros.j2" and sentence in _code(p)]
        assert not writers, f"{sentence!r} is written in {writers}: call its macro from prompts/macros.j2"


def test_a_sentence_changed_in_the_macros_changes_every_conversation_that_says_it(demo: Demo, tmp_path: Path) -> None:
    """A copy of macros.j2 with other words, in a folder searched first: every conversation of
    every template that said a VILA-M3 sentence now says the copy's words instead, and nothing
    else changes."""
    text = (BUILTIN_PROMPTS / "macros.j2").read_text()
    for sentence, other in VILA_M3_SENTENCES.items():
        text = text.replace(sentence, other)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "macros.j2").write_text(text)
    builtin = Renderer(demo.spec, experts=demo.experts)
    changed = Renderer(demo.spec, experts=demo.experts, prompt_dirs=[tmp_path / "mine"])
    said = set()
    for task in demo.spec.tasks:
        for item in demo.items_of(task.source)[:2]:
            for v in range(len(task.args)):
                f = demo.get(task, item, v)
                try:
                    before = json.dumps(builtin.render(task, item, f, variant=v).messages)
                except TemplateSkip:
                    continue
                after = json.dumps(changed.render(task, item, f, variant=v).messages)
                expected = before
                for sentence, other in VILA_M3_SENTENCES.items():
                    if sentence in before:
                        said.add((task.template, sentence))
                    expected = expected.replace(json.dumps(sentence)[1:-1], json.dumps(other)[1:-1])
                assert after == expected, f"{task.template} on {item.item_id}, variant {v}"
    templates = {t for t, _ in said}
    assert {s for _, s in said} == set(VILA_M3_SENTENCES)
    assert {"vista3d/segment_and_answer.j2", "vista3d/tumor_presence.j2", "findings/larger.j2", "findings/volume.j2",
            "brats/four_sequences.j2", "cxr/trigger_and_answer.j2", "qa/expert_trigger.j2", "cxr/expert_hint_vqa.j2",
            "cxr/expert_hint_choice.j2", "qa/expert_hint.j2", "brats/segment_request.j2", "brats/what_is_this.j2"} <= templates


def test_images_follow_the_slots(renderer: Renderer, demo: Demo) -> None:
    task = TaskSpec(template="brats/four_sequences.j2", source="brain", expert="BRATS")
    item = demo.items_of("brain")[1]
    f = demo.get(task, item, 0)
    c = renderer.render(task, item, f, variant=0)
    sequences = {i.caption: i.png for i in f.images if i.kind == "sequence"}
    overlay = next(i.png for i in f.images if i.kind == "overlay")
    assert c.images == [sequences["T1c"], sequences["T1"], sequences["T2"], sequences["FLAIR"], overlay]


@pytest.mark.slow
def test_same_seed_same_rows_other_seed_other_text(demo: Demo) -> None:
    a, b = Renderer(demo.spec, experts=demo.experts), Renderer(demo.spec, experts=demo.experts)
    other = Renderer(BuildSpec.model_validate({**demo.spec.model_dump(), "seed": demo.spec.seed + 1}), experts=demo.experts)
    differ = 0
    for task in demo.spec.tasks:
        for item in demo.items_of(task.source)[:2]:
            for v in range(3):
                f = demo.get(task, item, v)
                try:
                    x, y = a.render(task, item, f, variant=v), b.render(task, item, f, variant=v)
                except TemplateSkip:
                    continue
                assert (x.messages, x.images, x.meta, x.expert, x.template_hash) == (y.messages, y.images, y.meta, y.expert, y.template_hash)
                try:
                    differ += other.render(task, item, f, variant=v).messages != x.messages
                except TemplateSkip:
                    differ += 1
    assert differ > 20


def normalised_question(c: Conversation) -> str:
    """The question with its subject (a structure or label name) blanked: what is left is the
    phrasing."""
    q = c.meta.get("question", "")
    subjects = [c.meta.get("structure"), c.meta.get("label")] + list(c.meta.get("structures") or [])
    for s in sorted((s for s in subjects if s), key=len, reverse=True):
        q = q.replace(s, "X").replace(s.lower().replace("_", " "), "X")
    return q


@pytest.mark.slow
def test_at_least_five_question_phrasings_per_kind(demo: Demo) -> None:
    seen: dict[tuple[str, str], set[str]] = defaultdict(set)
    for seed in range(4):
        r = Renderer(BuildSpec.model_validate({**demo.spec.model_dump(), "seed": seed}), experts=demo.experts)
        for task in demo.spec.tasks:
            if task.source == "vqa":  # the questions of a qa source are the dataset's own
                continue
            for _, _, _, c in render_all(r, demo, task, variants=8):
                if isinstance(c, Conversation):
                    seen[(c.meta["kind"], c.meta["question_kind"])].add(normalised_question(c))
                    if c.meta.get("follow_up"):
                        seen[(c.meta["kind"], "follow_up")].add(c.meta["follow_up"])
    few = {k: sorted(v) for k, v in seen.items() if len(v) < 5}
    assert not few, few
    kinds = {k for k, _ in seen}
    assert kinds == set(FACTS) - {"qa_expert_trigger", "qa_expert_hint", "qa_plain"}


def test_renderer_pickles_for_ray_workers(renderer: Renderer, demo: Demo) -> None:
    task = demo.spec.tasks[0]
    item = demo.items_of("ct")[0]
    copy = pickle.loads(pickle.dumps(renderer))
    x = renderer.render(task, item, demo.get(task, item, 1), variant=1)
    y = copy.render(task, item, demo.get(task, item, 1), variant=1)
    assert (x.messages, x.images, x.meta) == (y.messages, y.images, y.meta)


def test_findings_view_is_plain_data_without_timing(demo: Demo) -> None:
    f = next(iter(demo.findings.values()))
    view = findings_view(f)
    json.dumps({k: v for k, v in view.items() if k != "by_name"})
    assert "timing" not in view and all("png" not in i for i in view["images"])


def test_item_view_hides_identifiers(renderer: Renderer, demo: Demo, tmp_path: Path) -> None:
    (tmp_path / "peek").mkdir()
    (tmp_path / "peek" / "peek.j2").write_text(
        "{#- declare\nkind: peek\nimages: 0\nmodel_card: false\n-#}\n"
        '{% turn "user" %}{{ item | tojson }}{% endturn %}{% turn "assistant" %}ok{% endturn %}'
    )
    r = Renderer(demo.spec, prompt_dirs=[tmp_path / "peek"])
    item = demo.items_of("ct")[0]
    text = r.render(TaskSpec(template="peek.j2", source="ct"), item, None, variant=0).messages[0]["content"][0]["text"]
    shown = json.loads(text)
    assert set(shown) == {"modality", "kind", "source_kind", "shape", "spacing", "channels", "n_files", "qa"}
    for secret in (item.item_id, item.patient_key, item.study_key, *item.uris):
        assert secret not in text


def test_skip_is_a_template_skip_naming_the_line(renderer: Renderer, demo: Demo) -> None:
    task = TaskSpec(template="findings/side.j2", source="brain", expert="BRATS")
    item = next(i for i in demo.items_of("brain") if not demo.findings[(i.item_id, "BRATS", "")].structures)
    with pytest.raises(TemplateSkip) as e:
        renderer.render(task, item, demo.findings[(item.item_id, "BRATS", "")], variant=0)
    assert e.value.item == item.item_id and e.value.template == "findings/side.j2" and e.value.line
    assert f"{item.item_id}: template findings/side.j2, line {e.value.line}: skipped: no structure lies on one side" == str(e.value)


def test_template_error_names_template_line_and_item(demo: Demo, tmp_path: Path) -> None:
    folder = tmp_path / "mine" / "vista3d"
    folder.mkdir(parents=True)
    (folder / "typo.j2").write_text(
        "{#- declare\nkind: typo\nneeds: [structures]\nimages: 0\nmodel_card: false\n-#}\n"
        '{% turn "user" %}Hello{% endturn %}\n'
        '{% turn "assistant" %}\n'
        "{{ findings.structurs | length }}\n"
        "{% endturn %}\n"
    )
    r = Renderer(demo.spec, prompt_dirs=[tmp_path / "mine"])
    task = TaskSpec(template="vista3d/typo.j2", source="ct", expert="VISTA3D", args=["everything"])
    item = demo.items_of("ct")[0]
    with pytest.raises(TemplateError) as e:
        r.render(task, item, demo.get(task, item, 0), variant=0)
    assert (e.value.template, e.value.line, e.value.item) == ("vista3d/typo.j2", 9, item.item_id)
    assert str(e.value) == f"{item.item_id}: template vista3d/typo.j2, line 9: 'dict object' has no attribute 'structurs'"
    assert e.value.reason.startswith("template vista3d/typo.j2, line 9")


def test_error_inside_an_imported_macro_names_both(demo: Demo, tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "helpers.j2").write_text("{% macro broken(x) %}\n{{ x.missing }}\n{% endmacro %}\n")
    (tmp_path / "m" / "uses.j2").write_text(
        "{#- declare\nkind: uses\nimages: 0\nmodel_card: false\n-#}\n"
        '{% import "helpers.j2" as h %}\n{% turn "user" %}{{ h.broken({}) }}{% endturn %}\n'
    )
    r = Renderer(demo.spec, prompt_dirs=[tmp_path / "m"])
    with pytest.raises(TemplateError) as e:
        r.render(TaskSpec(template="uses.j2", source="ct"), demo.items_of("ct")[0], None, variant=0)
    assert (e.value.template, e.value.line) == ("helpers.j2", 2)
    assert "(called from uses.j2, line 7)" in str(e.value)


@pytest.mark.parametrize(
    "task, message",
    [
        ({"template": "brats/four_sequences.j2", "source": "ct", "expert": "VISTA3D"}, "written for nifti_group sources; source 'ct' is dicom"),
        ({"template": "cxr/expert_hint_vqa.j2", "source": "cxr"}, "needs an expert (classes, key_slice); add `expert:` to the task"),
        ({"template": "qa/plain.j2", "source": "vqa"}, "needs an expert (key_slice); add `expert:` to the task"),
        ({"template": "vista3d/tumor_presence.j2", "source": "ct", "expert": "VISTA3D", "args": ["organs"]},
         "argument(s) ['organs'] not among those it is written for"),
        ({"template": "findings/volume.j2", "source": "ct", "expert": "XR"},
         "needs overlay, structures from its expert; expert 'XR' (runner cxr_ensemble) gives classes, key_slice"),
        ({"template": "vista3d/nope.j2", "source": "ct", "expert": "VISTA3D"}, "template vista3d/nope.j2 not found"),
    ],
)
def test_check_names_task_and_template(demo: Demo, task: dict, message: str) -> None:
    data = demo.spec.model_dump()
    spec = BuildSpec.model_validate({**data, "experts": data["experts"] + [{"name": "XR", "runner": "cxr_ensemble"}], "tasks": [task]})
    xr = ExpertInfo(name="XR", runner="cxr_ensemble", fingerprint="f", spec={}, modalities=("CR", "DX"), kinds=("image2d",),
                    provides=("classes", "key_slice"))
    with pytest.raises(CurationError) as e:
        Renderer(spec, experts={**demo.experts, "XR": xr}).check()
    assert str(e.value).startswith(f"tasks[0] (template {task['template']}): ")
    assert message in str(e.value)


def test_check_with_runners_knows_what_they_give(demo: Demo) -> None:
    from expert_runners.base import make_runner

    spec = BuildSpec.model_validate({**demo.spec.model_dump(), "tasks": [
        {"template": "brats/what_is_this.j2", "source": "brain", "expert": "CT_TISSUE"}]})
    infos = {"CT_TISSUE": make_runner(spec.experts[1]).describe()}
    with pytest.raises(CurationError, match="needs sequence from its expert; expert 'CT_TISSUE' \\(runner ct_tissue\\) gives"):
        Renderer(spec, experts=infos).check()
    spec = BuildSpec.model_validate({**demo.spec.model_dump(), "tasks": [
        {"template": "findings/presence.j2", "source": "brain", "expert": "CT_TISSUE"}]})
    with pytest.raises(CurationError, match="expert 'CT_TISSUE' takes dicom/nifti items; source 'brain' gives nifti_group items"):
        Renderer(spec, experts={"CT_TISSUE": make_runner(spec.experts[1]).describe()}).check()


def test_experts_without_a_card_stay_off_it_and_cannot_be_called(demo: Demo) -> None:
    data = demo.spec.model_dump()
    experts = data["experts"] + [{"name": "CTLabels", "runner": "labels", "options": {"preset": "vista3d"}}]
    ok = BuildSpec.model_validate({**data, "experts": experts, "tasks": [
        {"template": "findings/presence.j2", "source": "ct", "expert": "CTLabels", "args": ["everything"]},
        {"template": "vista3d/segment_request.j2", "source": "ct", "expert": "VISTA3D", "args": ["everything"]}]})
    r = Renderer(ok)
    r.check()
    assert "CTLabels" not in r.model_card and "<VISTA3D(args)>" in r.model_card
    assert "<BRATS(args)>" not in r.model_card and "<CXR(args)>" not in r.model_card  # carded, but no task calls them
    bad = BuildSpec.model_validate({**data, "experts": experts, "tasks": [
        {"template": "vista3d/segment_and_answer.j2", "source": "ct", "expert": "CTLabels", "args": ["everything"]}]})
    with pytest.raises(CurationError, match="calls expert 'CTLabels', which is not on the model card"):
        Renderer(bad).check()


def test_the_question_decides_the_call(renderer: Renderer, demo: Demo) -> None:
    """The first user turn's text alone (image aside) decides whether the assistant calls an
    expert and which call: a template whose question reads the same for a call and no call, or
    for `VISTA3D(everything)` and `VISTA3D(hepatic tumor)`, teaches a fine-tuned model to guess.
    Calls compare as `m3-curate eval` scores them (hepatoma is hepatic tumor)."""
    calls: dict[str, set[tuple[str, ...]]] = defaultdict(set)
    for task in demo.spec.tasks:
        for _, _, _, c in render_all(renderer, demo, task):
            if isinstance(c, Conversation):
                made = tuple(call.replace("(hepatoma)", "(hepatic tumor)") for call in c.meta["calls"] if call)
                calls[texts(c, "user")[0]].add(made)
    clashes = {question: sorted(seen) for question, seen in calls.items() if len(seen) > 1}
    assert not clashes, clashes


def test_a_labels_table_gives_the_same_rows_in_any_key_order(renderer: Renderer, demo: Demo) -> None:
    """An item's labels come in the table's column order from the index and in name order back
    from the plan's JSON: the rows must not depend on it (a build and `m3-curate render` agree)."""
    from dataclasses import replace

    task = TaskSpec(template="cxr/trigger_and_answer.j2", source="cxr", expert="CXR")
    for item in demo.items_of("cxr")[:4]:
        reordered = replace(item, attrs={**item.attrs, "labels": dict(reversed(list(item.attrs["labels"].items())))})
        for v in range(3):
            predicted = replace(demo.get(task, item, v), truth=None)  # as cxr_ensemble's: the truth is the item's table
            a = renderer.render(task, item, predicted, variant=v)
            b = renderer.render(task, reordered, predicted, variant=v)
            assert a.meta["answer_from"] == "truth" and a.meta["truth"]["classes"] == {k: int(v) for k, v in item.attrs["labels"].items()}
            assert (a.messages, a.meta) == (b.messages, b.meta)


def test_every_phrasing_follows_the_agent_protocol(renderer: Renderer) -> None:
    """VILA-M3's agent takes an answer carrying a call as final only when it says "segmented":
    every alternative of a final answer with a call says it, and no trigger (which waits for
    the result) does."""
    banks = renderer._shared.phrasings if renderer.model_card else {}
    finals = [k for k in banks if k.endswith("_segment_answer")]
    triggers = [k for k in banks if k.endswith("_trigger") or k.startswith("measure_trigger.")]
    assert finals and len(triggers) >= 4
    for key in finals:
        assert all("segmented" in text and "{call}" in text for text in banks[key]), key
    for key in triggers:
        assert all("segmented" not in text and "{call}" in text for text in banks[key]), key
