"""What VILA's and LLaVA-NeXT's data loaders do with one LLaVA-style record, written out from
their source so the export can be checked against them without installing either trainer.

- `vila_pinned`: `LazySupervisedDataset.__getitem__` of NVlabs/VILA at commit
  355fda9114c966cf46af3057e9b977064af08751 (the `thirdparty/VILA` submodule that
  Project-MONAI/VLM-Radiology-Agent-Framework, VILA-M3's code, pins): `llava/data/dataset.py`
  (`__getitem__`, `preprocess_multimodal`), `llava/mm_utils.py` (`process_image`,
  `tokenizer_image_token`), `llava/utils/tokenizer.py` (`tokenize_conversation_legacy`: the first
  message must be human's, roles alternate, `assert role == conv.roles[turn % 2]`).
  `image` may be a string or a list, `images` a list of paths (or of `{"path": …}`).
- `vila_next`: `LLaVANextDataset.process` of NVlabs/VILA at b760c34b9487fd736b4075f5111fbef3d80a37e9
  (`llava/data/dataset_impl/llava.py`): iterates `image`, puts each image where its `<image>`
  stands, asserts every image was used; `images` is not read.
- `vila_llava_dataset`: `LLaVADataset.process` of the same file and commit: every image of the
  record moves to the front of the first human turn.
- `llava_next`: `LazySupervisedDataset._get_item` of LLaVA-VL/LLaVA-NeXT at
  df179663ae8b83207df100a1f7af24caec633ff9 (`llava/train/train.py`): `image` a string or a list,
  `images` not read; `preprocess_multimodal` moves a turn's single `<image>` to the front of
  that turn.

Each returns a `Loaded`: the conversation as the model sees it (turns of text and image
indices, in order) and the images in the order the model consumes them (one per `<image>`
token, as `LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal` does). A mismatch between
tokens and images, a broken alternation or an unreadable image raises, as the trainer would.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

from PIL import Image

IMAGE = "<image>"
IMAGE_TOKEN_INDEX = -200  # llava/constants.py
BOS = 1


class LoaderError(Exception):
    pass


@dataclass
class Loaded:
    turns: list[tuple[str, list[Any]]]  # (role, [text | image index, …]) in order
    images: list[bytes]  # PNG bytes of each image, in the order the model takes them
    input_ids: list[int]


def _open(folder: str, path: str) -> bytes:
    """`process_image`: `Image.open(os.path.join(image_folder, image_file)).convert("RGB")`."""
    full = os.path.join(folder, path)
    Image.open(full).convert("RGB")  # raises as the trainer would on a missing or broken file
    with open(full, "rb") as f:
        return f.read()


def tokenize(text: str) -> list[int]:
    """A stand-in tokenizer (`tokenizer(chunk).input_ids`): BOS, then one id per byte."""
    return [BOS, *(b + 10 for b in text.encode())]


def tokenizer_image_token(prompt: str) -> list[int]:
    """`llava/mm_utils.py` at 355fda9: chunks between `<image>` tokenized, IMAGE_TOKEN_INDEX between."""
    chunks = [tokenize(c) for c in prompt.split(IMAGE)]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == BOS:
        offset = 1
        ids.append(chunks[0][0])
    sep = [IMAGE_TOKEN_INDEX] * (offset + 1)
    inter = [e for sub in zip(chunks, [sep] * len(chunks)) for e in sub][:-1]
    for x in inter:
        ids.extend(x[offset:])
    return ids


def preprocess_multimodal(source: list[dict[str, str]]) -> list[dict[str, str]]:
    """`preprocess_multimodal` of `llava/data/dataset.py` at 355fda9 (no mm_use_im_start_end)."""
    concat = "".join(s["value"] for s in source)
    for sid, sentence in enumerate(source):
        if sid == 0 and IMAGE not in concat:
            sentence["value"] = f"{IMAGE}\n" + sentence["value"]
        if IMAGE in sentence["value"]:
            chunks = [c.strip() for c in sentence["value"].split(IMAGE)]
            chunks = [c + " " if not c.endswith("\n") else c for c in chunks[:-1]] + [chunks[-1]]
            sentence["value"] = f"{IMAGE}\n".join(chunks).strip()
        if IMAGE in sentence["value"]:
            sentence["value"] = sentence["value"].replace(IMAGE, f"{IMAGE}\n").replace(f"{IMAGE}\n\n", f"{IMAGE}\n")
    return source


def _legacy_prompt(messages: list[dict[str, str]]) -> tuple[str, list[dict[str, str]]]:
    """`tokenize_conversation_legacy` at 355fda9 with a vicuna_v1-style template: a first message
    not from the human is dropped, then roles must alternate human, gpt, human, …"""
    if messages and messages[0]["from"] != "human":
        messages = messages[1:]
    roles = {"human": "USER", "gpt": "ASSISTANT"}
    prompt = "A chat between a curious user and an artificial intelligence assistant. "
    for turn, m in enumerate(messages):
        if m["from"] not in roles:
            raise LoaderError(f"KeyError: role {m['from']!r}")
        if roles[m["from"]] != ("USER", "ASSISTANT")[turn % 2]:
            raise LoaderError(f"AssertionError: turn {turn} is {m['from']}: roles do not alternate")
        prompt += f"{roles[m['from']]}: {m['value']}" + (" " if m["from"] == "human" else "</s>")
    return prompt, messages


def _turns(messages: list[dict[str, Any]]) -> tuple[list[tuple[str, list[Any]]], int]:
    """Text turns with `<image>` replaced by the running image index."""
    turns, k = [], 0
    for m in messages:
        parts: list[Any] = []
        for n, chunk in enumerate(m["value"].split(IMAGE)):
            if n:
                parts.append(k)
                k += 1
            if chunk:
                parts.append(chunk)
        turns.append((m["from"], parts))
    return turns, k


def _tokenized(conversation: list[dict[str, str]], images: list[bytes]) -> Loaded:
    """The prompt tokenized as the trainers do; one image token per image, or an error."""
    prompt, kept = _legacy_prompt(conversation)
    ids = tokenizer_image_token(prompt)
    if ids.count(IMAGE_TOKEN_INDEX) != len(images):
        raise LoaderError(f"{ids.count(IMAGE_TOKEN_INDEX)} image tokens for {len(images)} images")
    turns, _ = _turns(kept)
    return Loaded(turns=turns, images=images, input_ids=ids)


def vila_pinned(record: dict[str, Any], folder: str) -> Loaded:
    if "image" in record:
        files = record["image"] if isinstance(record["image"], list) else [record["image"]]
    elif "images" in record:
        files = [f["path"] if isinstance(f, dict) else f for f in record["images"]]
    else:
        files = []
    images = [_open(folder, f) for f in files]
    conversation = copy.deepcopy(record["conversations"])
    if images:
        conversation = preprocess_multimodal(conversation)
    return _tokenized(conversation, images)


def vila_next(record: dict[str, Any], folder: str) -> Loaded:
    messages = copy.deepcopy(record["conversations"])
    files = list(record["image"]) if "image" in record else []  # `for img_path in instance["image"]`
    images = [_open(folder, f) for f in files]
    pending = list(range(len(images)))
    turns = []
    for m in messages:
        parts: list[Any] = []
        value = m["value"]
        while value.find(IMAGE) >= 0:
            idx = value.find(IMAGE)
            if idx > 0:
                parts.append(value[:idx])
            if not pending:
                raise LoaderError("IndexError: pop from empty list (more <image> than images)")
            parts.append(pending.pop(0))
            value = value[idx + len(IMAGE):]
        parts.append(value)
        turns.append((m["from"], parts))
    if pending:
        raise LoaderError("AssertionError: #Num of <images> does not match the number of images in the instance")
    return Loaded(turns=turns, images=images, input_ids=[])


def vila_llava_dataset(record: dict[str, Any], folder: str) -> Loaded:
    messages = copy.deepcopy(record["conversations"])
    files: list[str] = []
    for key in ("image", "images"):
        if key in record:
            files += record[key] if isinstance(record[key], list) else [record[key]]
    images = [_open(folder, f) for f in files]
    turns = [(m["from"], [m["value"].replace(IMAGE, "").strip()]) for m in messages]
    if turns[0][0] != "human":
        raise LoaderError("ValueError: First message is not from human")
    turns[0] = (turns[0][0], [*range(len(images)), *turns[0][1]])
    return Loaded(turns=turns, images=images, input_ids=[])


def llava_next(record: dict[str, Any], folder: str) -> Loaded:
    files = []
    if "image" in record:
        files = record["image"] if isinstance(record["image"], list) else [record["image"]]
    images = [_open(folder, f) for f in files]
    conversation = copy.deepcopy(record["conversations"])
    if images:
        for sentence in conversation:
            if sentence["value"].count(IMAGE) == 1 and not sentence["value"].startswith(IMAGE):
                sentence["value"] = (IMAGE + "\n" + sentence["value"].replace(IMAGE, "").strip()).strip()
    return _tokenized(conversation, images)


LOADERS = {"vila_pinned": vila_pinned, "vila_next": vila_next, "llava_next": llava_next}
# Which loaders each export layout is for.
LAYOUT_LOADERS = {"vila": ("vila_pinned",), "llava-next": ("vila_pinned", "vila_next", "llava_next")}
