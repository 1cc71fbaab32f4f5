"""`m3-curate finetune` and `eval` on the VLM families people fine-tune — LLaVA, Qwen2-VL,
Qwen2.5-VL, Idefics3 (SmolVLM's architecture), Gemma 3 — as tiny models built offline from
their real classes (`vlm_families.py`), with chat templates shaped like the published ones:
labels, LoRA parts, templates that hide assistant turns, rows too long, images refused, and
training, reloading and generating end to end."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shards_factory import write_shards
from vlm_families import FAMILIES, build_family, labelled_runs, one_thread  # noqa: F401 (a fixture)

from curation.cli import main
from curation.errors import CurationError
from curation.finetune.chat import ChatCollator, check_template
from curation.store.layout import iter_rows
from curation.finetune.lora import lora_config, model_parts
from curation.finetune.processors import has_torchvision, load_processor, save_processor
from curation.finetune.train import TrainConfig, prepare, train
from curation.store.layout import shard_files

NAMES = list(FAMILIES)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("build"), conversations=40, seed=1, rows_per_shard=20, row_group_size=8)


@pytest.fixture(scope="module")
def models(shards, tmp_path_factory):
    """`models(name)`: the family's tiny model folder, built once per module."""
    root, built = tmp_path_factory.mktemp("families"), {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_family(name, shards, root / name)
        return built[name]

    return get


def _rows(shards) -> list[dict]:
    return list(iter_rows(shard_files(shards, "train").files))


def _multi_turn_multi_image(shards) -> dict:
    return next(r for r in _rows(shards) if len(r["images"]) >= 2 and sum(m["role"] == "assistant" for m in r["messages"]) >= 2)


def _image_ids(processor) -> set[int]:
    return {i for i in (getattr(processor, "image_token_id", None), processor.tokenizer.image_token_id) if i is not None}


# --- labels --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", NAMES)
def test_labels_are_exactly_the_assistant_turns_and_their_end_marker(shards, models, family):
    processor = load_processor(models(family))
    expected = FAMILIES[family]
    row, single = _multi_turn_multi_image(shards), next(r for r in _rows(shards) if len(r["messages"]) == 2)
    collator = ChatCollator(processor, name=family)
    assert collator.native_mask == expected.markers  # the published templates have no {% generation %}
    batch = collator([row, single])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    labelled = labels != -100
    assert torch.equal(labels[labelled], ids[labelled])
    turns = [p["text"] for m in row["messages"] if m["role"] == "assistant" for p in m["content"]]
    runs = labelled_runs(labelled.tolist())
    decoded = [processor.tokenizer.decode(ids[a:b]) for a, b in runs]
    assert decoded == [expected.lead + text + expected.end for text in turns]
    image_tokens = torch.isin(ids, torch.tensor(sorted(_image_ids(processor))))
    assert image_tokens.sum() >= len(row["images"]) and not labelled[image_tokens].any()
    assert not batch["labels"][1][batch["attention_mask"][1] == 0].ne(-100).any()  # padding
    check_template(processor, [row, single], name=family)


# --- LoRA ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", NAMES)
def test_lora_adapts_every_language_model_linear_and_trains_the_projector(models, family):
    from peft import get_peft_model
    from transformers import AutoModelForImageTextToText

    expected = FAMILIES[family]
    model = AutoModelForImageTextToText.from_pretrained(models(family))
    parts = model_parts(model, name=family)
    assert (parts.language_model, parts.projector) == (expected.language_model, expected.projector)
    linears = [n for n, m in model.get_submodule(expected.language_model).named_modules() if isinstance(m, torch.nn.Linear)]
    projector_params = sum(p.numel() for name in expected.projector for p in model.get_submodule(name).parameters())

    peft = get_peft_model(model, lora_config(model, rank=4, alpha=None, dropout=0.0, targets=None, name=family))
    trainable = {n: p for n, p in peft.named_parameters() if p.requires_grad}
    adapters = {n for n in trainable if ".lora_" in n}
    assert adapters and all(f".{expected.language_model}." in n for n in adapters)
    assert len({n.split(".lora_")[0] for n in adapters}) == len(linears)  # each linear layer, once
    rest = set(trainable) - adapters
    assert rest and all(any(f".{p}.modules_to_save." in n for p in expected.projector) for n in rest)
    assert sum(trainable[n].numel() for n in rest) == projector_params  # the whole projector, nothing else


def test_a_model_without_a_findable_projector_is_refused(models):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(models("qwen2_vl"))
    del model.model.visual.merger  # nothing after the encoder's layers, nothing beside it
    with pytest.raises(CurationError, match="no vision-to-text projector found"):
        model_parts(model, name="qwen2_vl")


# --- templates that hide the assistant's turns ----------------------------------------------

# Qwen2-VL's template, changed the way reasoning templates change it: an earlier assistant turn
# is rendered without its text once later turns follow
_DROPS_EARLIER = "{% if message['role'] == 'assistant' and not loop.last %}<|im_start|>assistant\n<|im_end|>\n{% else %}"
# the assistant's text never rendered where its turn is
_NO_TEXT = "{% if message['role'] == 'assistant' %}<|im_start|>assistant\nOK<|im_end|>\n{% else %}"


def _with_template(src: Path, dst: Path, change) -> Path:
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").write_text(change((src / "chat_template.jinja").read_text()))
    return dst


@pytest.mark.parametrize(("change", "why"), [
    (lambda t: t.replace("<|im_start|>{{ message['role'] }}", _DROPS_EARLIER + "<|im_start|>{{ message['role'] }}").replace(
        "{% endif %}{% endfor %}{% if add_generation_prompt %}", "{% endif %}{% endif %}{% endfor %}{% if add_generation_prompt %}"),
     "renders this turn differently once later turns follow"),
    (lambda t: t.replace("<|im_start|>{{ message['role'] }}", _NO_TEXT + "<|im_start|>{{ message['role'] }}").replace(
        "{% endif %}{% endfor %}{% if add_generation_prompt %}", "{% endif %}{% endif %}{% endfor %}{% if add_generation_prompt %}"),
     "its text is not inside what the template adds for it"),
], ids=["drops earlier turns", "no assistant text"])
def test_a_template_that_hides_assistant_turns_is_refused_naming_the_model(shards, models, tmp_path, capsys, change, why):
    model = _with_template(models("qwen2_vl"), tmp_path / "model", change)
    with pytest.raises(CurationError, match=rf"{model}: its chat template hides where assistant turns are .*{why}"):
        prepare(TrainConfig(data=str(shards), model=str(model), out=str(tmp_path / "out")))
    assert main(["-q", "finetune", "--data", str(shards), "--model", str(model), "--out", str(tmp_path / "out")]) == 2
    assert str(model) in capsys.readouterr().err
    assert not (tmp_path / "out" / "config.json").exists()


# ChatML with {% generation %} around the user's turns instead of the assistant's
_WRONG_MARKERS = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'user' %}{% generation %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{{ '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{{ '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_generation_markers_around_the_wrong_turn_are_refused(shards, models, tmp_path):
    model = _with_template(models("llava"), tmp_path / "model", lambda _: _WRONG_MARKERS)
    with pytest.raises(CurationError, match=rf"{model}: the tokens its chat template marks as the assistant's do not hold"):
        prepare(TrainConfig(data=str(shards), model=str(model), out=str(tmp_path / "out")))


# --- rows too long, images refused ---------------------------------------------------------


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_images_the_processor_refuses_set_the_row_aside_and_large_ones_are_resized(shards, models):
    processor = load_processor(models("qwen2_vl"))
    single = [r for r in _rows(shards) if len(r["images"]) == 1][:4]
    large, thin, corrupt = ({**r, "images": [{**r["images"][0], "bytes": b}]} for r, b in zip(
        single[1:], [_png(1600, 1200), _png(300, 1), b"\x89PNG not really"]))
    collator = ChatCollator(processor, name="qwen2_vl")
    batch = collator([single[0], large, thin, corrupt])
    assert batch["input_ids"].shape[0] == 2  # the plain row and the large one
    assert collator.skipped == {"images refused": 2}  # aspect ratio 300 (Qwen-VL's limit: 200), undecodable
    image_token = processor.image_token_id
    assert (batch["input_ids"][1] == image_token).sum() <= 112 * 112 // 28**2  # resized to the processor's max_pixels


def test_rows_longer_than_the_context_are_set_aside_not_cut(shards, models, tmp_path):
    model = Path(shutil.copytree(models("llava"), tmp_path / "model"))
    lengths = ChatCollator(load_processor(model))(_rows(shards)[:16])["attention_mask"].sum(1).tolist()
    config = json.loads((model / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = context = sorted(lengths)[len(lengths) // 2]
    (model / "config.json").write_text(json.dumps(config))
    summary = train(TrainConfig(data=str(shards), model=str(model), out=str(tmp_path / "out"), max_steps=4, batch_size=4, cpu_threads=1))
    assert summary["steps"] == 4 and summary["skipped_rows"]["too long"] > 0
    assert summary["skipped_rows"].keys() == {"too long"} and context < max(lengths)


# --- processors without torchvision ---------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_video_families_load_their_processor_without_torchvision(models, family, tmp_path):
    if has_torchvision():
        pytest.skip("torchvision is installed: AutoProcessor loads the full processor")
    from transformers import AutoProcessor

    with pytest.raises(Exception):  # what transformers does by itself here
        AutoProcessor.from_pretrained(models(family))
    processor = load_processor(models(family))
    name = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}[family]
    assert type(processor).__name__ == name and not hasattr(processor, "video_processor")
    # saved beside a model, it takes the base's video config along, for machines with torchvision
    base = Path(shutil.copytree(models(family), tmp_path / "base"))
    (base / "video_preprocessor_config.json").write_text(json.dumps({"video_processor_type": "Qwen2VLVideoProcessor"}))
    save_processor(processor, tmp_path / "out", base=base)
    assert json.loads((tmp_path / "out" / "video_preprocessor_config.json").read_text())["video_processor_type"]
    assert type(load_processor(tmp_path / "out")).__name__ == name


# --- end to end through the command line ----------------------------------------------------


def _finetune(shards, model: Path, out: Path, *extra: str) -> dict:
    argv = ["-q", "finetune", "--data", str(shards), "--model", str(model), "--out", str(out), "--batch-size", "4",
            "--cpu-threads", "1", "--log-steps", "4", *extra]
    assert main(argv) == 0
    return json.loads((out / "train_summary.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("family", NAMES)
def test_finetune_reload_and_eval_through_the_cli(shards, models, family, tmp_path):
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "run"
    summary = _finetune(shards, models(family), out, "--max-steps", "8", "--lr", "3e-3")
    losses = [v for _, v in summary["losses"]]
    assert sum(losses[-2:]) / 2 < losses[0] - 0.5  # the loss falls
    for folder in (out, sorted(out.glob("checkpoint-*"))[-1]):  # the final model and a checkpoint reload
        assert type(AutoModelForImageTextToText.from_pretrained(folder)).__name__ == type(
            AutoModelForImageTextToText.from_pretrained(models(family))).__name__
        assert type(load_processor(folder)).__name__ == type(load_processor(models(family))).__name__
    report = tmp_path / "eval.json"
    argv = ["-q", "eval", "--model", str(out), "--data", str(shards), "--limit", "3", "--max-new-tokens", "6",
            "--cpu-threads", "1", "--out", str(report)]
    assert main(argv) == 0
    result = json.loads(report.read_text())
    assert result["rows"] == 3 and result["expert_selection"]["turns"] > 0
    assert all(isinstance(m["predicted"], str) for m in result["mismatches"])


@pytest.mark.slow
@pytest.mark.parametrize("family", NAMES)
def test_lora_through_the_cli_trains_adapters_and_the_projector(shards, models, family, tmp_path):
    from transformers import AutoModelForImageTextToText

    expected = FAMILIES[family]
    out = tmp_path / "lora"
    summary = _finetune(shards, models(family), out, "--lora", "--lora-rank", "4", "--max-steps", "3", "--lr", "1e-2")
    assert summary["steps"] == 3 and (out / "adapter" / "adapter_config.json").exists()
    before = AutoModelForImageTextToText.from_pretrained(models(family)).state_dict()
    after = AutoModelForImageTextToText.from_pretrained(out).state_dict()  # LoRA merged
    changed = {n for n, v in after.items() if not torch.equal(v, before[n])}
    projector = {n for n in before if n.startswith(expected.projector)}
    assert projector and projector & changed  # the projector trained
    assert any(n.startswith(expected.language_model) and n.endswith("q_proj.weight") for n in changed)  # adapters merged
    adapted = {n for n in before if n.startswith(expected.language_model) and n.endswith("_proj.weight")}
    frozen = set(before) - projector - adapted
    assert not frozen & changed  # vision encoder, embeddings, norms and head as they were
