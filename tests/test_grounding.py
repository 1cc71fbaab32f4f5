"""A template that states what its conversation neither shows nor gives is refused with the
right reason: by the renderer (a `GroundingError` naming the line), by the build's render stage
(set aside with the reason, never written, counted in the card), and by the check itself on
rows already written (`grounding.problems`, which `m3-curate audit` runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from render_factory import Demo

from curation.build.plan import ItemPlan, PlannedConversation
from curation.build.stages import BuildContext, render_item
from curation.findings import png_digest
from curation.manifest import BuildSpec, TaskSpec
from curation.render import grounding
from curation.render.renderer import GroundingError, Renderer
from curation.rows import grounding_category
from curation.store.cache import FindingsCache, content_hash
from curation.store.card import Tally, grounding_section
from curation.store.report import ItemReport

HEAD = "{#- declare\nkind: probe\nmodality: [CT]\nneeds: [structures, key_slice, overlay]\nimages: 2\n-#}\n"
TRIGGER = ('{% turn "user" %}{{ model_card }}{{ image(scan) }}This is a CT image.\nWhat is there?{% endturn %}'
           '{% turn "assistant" %}Let me trigger {{ expert.call }}.{% endturn %}')

# name → (template body, the grounding check's category)
UNGROUNDED = {
    # a volume with no turn giving it: the result turn shows the picture but measures nothing
    "volume not given": (
        '{% set scan, result = picture("key_slice"), picture("overlay") %}' + TRIGGER
        + '{% turn "user" %}The results are {{ image(result) }}.{% endturn %}'
        + '{% turn "assistant" %}The liver measures {{ findings.by_name.liver.volume_ml | ml }}.{% endturn %}',
        "number not given"),
    # the whole volume's legend over one slice: colours the picture does not have
    "legend of the volume": (
        '{% set scan, result = picture("key_slice"), picture("overlay", of="vertebrae T11") %}' + TRIGGER
        + '{% turn "user" %}The results are {{ image(result) }}. The colors in this image describe '
        + '{% for colour, name in findings.legend.items() %}{{ colour }}: {{ name }}, {% endfor %}{% endturn %}'
        + '{% turn "assistant" %}Done.{% endturn %}',
        "legend not on picture"),
    # a fact said to be shown on a picture that does not show it
    "fact not on the picture": (
        '{% set scan, result = picture("key_slice", of="vertebrae T11"), picture("overlay") %}' + TRIGGER
        + '{% turn "user" %}The results are {{ image(result) }}.{% endturn %}'
        + '{% turn "assistant" %}{{ answer("Yes, L3 is there.", shown=scan, label="vertebrae L3") }}{% endturn %}',
        "fact not shown"),
    # an answer that contradicts the reference
    "answer against the truth": (
        '{% set ref = reference() %}{% set scan, result = picture("key_slice"), picture("overlay") %}'
        + '{{ meta(question_kind="presence", question="Is there a liver?", structure="liver", answer="no") }}' + TRIGGER
        + '{% turn "user" %}The results are {{ image(result) }}.{% endturn %}'
        + '{% turn "assistant" %}{{ answer("No.") }}{% endturn %}',
        "answer contradicts its source"),
    # a final answer with a call that does not say "segmented"
    "call without segmented": (
        '{% set scan, result = picture("key_slice"), picture("overlay") %}'
        + '{% turn "user" %}{{ model_card }}{{ image(scan) }}{{ image(result) }}Segment the organs.{% endturn %}'
        + '{% turn "assistant" %}I will use {{ expert.call }}.{% endturn %}',
        "agent protocol"),
}


@pytest.fixture(scope="module")
def demo(render_demo: Demo) -> Demo:
    return render_demo


def probe(demo: Demo, folder: Path, body: str) -> tuple[Renderer, TaskSpec]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "probe.j2").write_text(HEAD + body)
    task = TaskSpec(template="probe.j2", source="ct", expert="VISTA3D", args=["everything"])
    spec = BuildSpec.model_validate({**demo.spec.model_dump(), "tasks": [task.model_dump()]})
    return Renderer(spec, experts=demo.experts, prompt_dirs=[folder]), task


@pytest.mark.parametrize("name", sorted(UNGROUNDED))
def test_an_ungrounded_template_is_refused_with_its_reason(demo: Demo, tmp_path: Path, name: str) -> None:
    body, category = UNGROUNDED[name]
    renderer, task = probe(demo, tmp_path / "p", body)
    item = demo.items_of("ct")[0]
    with pytest.raises(GroundingError) as e:
        renderer.render(task, item, demo.get(task, item, 0), variant=0)
    assert e.value.category == category, str(e.value)
    assert e.value.reason.startswith("template probe.j2, line ") and f"ungrounded ({category}): " in e.value.reason
    assert grounding_category(e.value.reason) == category


def test_the_same_template_grounded_passes(demo: Demo, tmp_path: Path) -> None:
    """The volume template, with the result turn giving the volume, is written."""
    body = ('{% set scan, result = picture("key_slice"), picture("overlay") %}' + TRIGGER
            + '{% turn "user" %}The results are {{ image(result) }}. {{ report(["liver"]) }}{% endturn %}'
            + '{% turn "assistant" %}{{ fact("The liver measures " ~ (findings.by_name.liver.volume_ml | ml) ~ ".", '
            + 'given=findings.by_name.liver.volume_ml | ml) }}{% endturn %}')
    renderer, task = probe(demo, tmp_path / "p", body)
    item = demo.items_of("ct")[0]
    c = renderer.render(task, item, demo.get(task, item, 0), variant=0)
    assert c.meta["facts"] == [{"turn": 3, "text": c.messages[3]["content"][0]["text"], "shown": None,
                                "given": {"turn": 2, "text": c.meta["facts"][0]["given"]["text"]}}]


def test_the_build_sets_ungrounded_conversations_aside_and_counts_them(demo: Demo, tmp_path: Path) -> None:
    """The build's render stage: the ungrounded conversation is a ledger reason, not a row, and
    the card counts it by category; its grounded sibling is written."""
    body, category = UNGROUNDED["legend of the volume"]
    renderer, bad = probe(demo, tmp_path / "p", body)
    good = TaskSpec(template="vista3d/segment_and_answer.j2", source="ct", expert="VISTA3D", args=["everything"])
    spec = BuildSpec.model_validate({**demo.spec.model_dump(), "tasks": [bad.model_dump(), good.model_dump()],
                                     "prompts": [str(tmp_path / "p")]})
    item = demo.items_of("ct")[0]
    reader_root = Path(spec.source("ct").root)
    content = content_hash(item, reader_root)
    cache = FindingsCache(tmp_path / "cache")
    cache.put(content, "fp", demo.get(good, item, 0), "everything")
    ctx = BuildContext(spec=spec, cache_root=str(cache.root), fingerprints={e.name: "fp" for e in spec.experts}, manifest_hash="m",
                       code_version="c", experts=demo.experts)
    plan = ItemPlan(item=item, split="train", lane=0,
                    conversations=[PlannedConversation(task=0, variant=0, arg="everything", shard=0, pos=0),
                                   PlannedConversation(task=1, variant=0, arg="everything", shard=0, pos=1)])
    report = ItemReport()
    rows = render_item(plan, content, ctx, report)
    assert rows.num_rows == 1 and rows["task"].to_pylist() == ["vista3d/segment_and_answer.j2"]
    meta = json.loads(rows["meta"][0].as_py())
    assert meta["answer_from"] is None and meta["calls"][0] == "<VISTA3D(everything)>"
    aside, = report.set_aside()
    assert (aside.task, aside.status) == (0, "quarantined") and grounding_category(aside.reason) == category
    tally = Tally()
    tally.set_aside[f"{aside.status}: {aside.reason}"] += 1
    assert grounding_section(tally)["set_aside"] == {category: 1}


def test_the_check_on_a_written_row_sees_tampering(demo: Demo) -> None:
    """What audit checks from a row's own data: swapped pictures, an edited answer."""
    task = TaskSpec(template="cxr/expert_hint_vqa.j2", source="cxr", expert="CXR")
    renderer = Renderer(demo.spec, experts=demo.experts)
    item = demo.items_of("cxr")[0]
    f = demo.get(task, item, 0)
    c = renderer.render(task, item, f, variant=0)
    findings = json.loads(json.dumps(f.to_dict()))
    digests = [png_digest(png) for png in c.images]
    assert grounding.problems(c.messages, digests, c.meta, findings) == []
    assert [p.category for p in grounding.problems(c.messages, ["0" * 16], c.meta, findings)] == ["images do not match their slots"]
    flipped = json.loads(json.dumps(c.messages))
    answer = flipped[1]["content"][0]
    answer["text"] = ("No." if c.meta["answer"] == "yes" else "Yes.")
    assert "answer not stated" in [p.category for p in grounding.problems(flipped, digests, c.meta, findings)]
    lying = {**c.meta, "answer": "no" if c.meta["answer"] == "yes" else "yes"}
    lying_messages = json.loads(json.dumps(flipped))
    assert "answer contradicts its source" in [p.category for p in grounding.problems(lying_messages, digests, lying, findings)]


def test_answers_from_the_expert_only_where_the_task_says_so(demo: Demo) -> None:
    """An item without ground truth: skipped by default; answered from the expert's prediction
    (and so recorded) when the task says `answer_from: expert`."""
    from dataclasses import replace

    from curation.render.renderer import TemplateSkip

    item = demo.items_of("cxr")[0]
    unlabelled = replace(item, attrs={k: v for k, v in item.attrs.items() if k != "labels"})
    task = TaskSpec(template="cxr/expert_hint_vqa.j2", source="cxr", expert="CXR")
    predicted = replace(demo.get(task, item, 0), truth=None)  # as cxr_ensemble's findings
    renderer = Renderer(demo.spec, experts=demo.experts)
    with pytest.raises(TemplateSkip, match="no ground truth for this item"):
        renderer.render(task, unlabelled, predicted, variant=0)
    allowed = task.model_copy(update={"answer_from": "expert"})
    c = renderer.render(allowed, unlabelled, predicted, variant=0)
    assert c.meta["answer_from"] == "expert" and "truth" not in c.meta
    hinted = {k.name: k.present for k in predicted.classes}
    assert c.meta["answer"] == ("yes" if hinted[c.meta["label"]] else "no")
    assert grounding.problems(c.messages, [png_digest(p) for p in c.images], c.meta, json.loads(json.dumps(predicted.to_dict()))) == []
