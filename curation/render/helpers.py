"""What a template sees: plain views of the findings and the truth, and the helper functions it
calls. A template author should see at a glance what is asked, which picture is shown and
where each fact of the answer comes from, so the helpers say it:

    {% set ref = reference() %}                          {# where answers come from: the truth #}
    {% set scan = picture("key_slice", of=tumor) %}      {# the slice through the tumour #}
    {% set result = picture("overlay", of=tumor) %}
    … {{ image(scan) }} …                                {# shown in a user turn #}
    The results are {{ image(result) }}. The colors in this image describe {{ legend(result) }}. {{ report() }}
    …
    {{ answer(phrase("tumor_yes"), shown=scan, label=tumor) }}   {# stated, and where it is seen #}
    {{ fact(phrase("tumor_count", count=n), given=n ~ " lesions") }}  {# stated, and which turn gave it #}

Every statement a helper makes is recorded (`meta.images`, `meta.legends`, `meta.facts`) for
the grounding check (`curation.render.grounding`), which sets aside what is not grounded.

`TemplateHelpers` is the only object whose methods the sandbox calls without its per-call
checks; it has nothing but the helpers, and finds the rendering they work on in
`CURRENT_STATE` (so one set of bound helpers serves every rendering, in any thread).
"""

from __future__ import annotations

from typing import Any

from curation.findings import Findings, Truth
from curation.items import StudyItem
from curation.render.grounding import drawn_entries
from curation.render.filters import join_and, label_text, ml_text
from curation.render.templates import CURRENT_STATE
from curation.render.turns import Fault, RenderState, Skip

PICTURE_KINDS = ("key_slice", "overlay", "sequence", "item")


# --- views -----------------------------------------------------------------------------------


def _structure_views(structures: list[Any]) -> list[dict[str, Any]]:
    return [
        {"label": s.label, "name": s.name, "voxels": s.voxels, "volume_ml": s.volume_ml, "bbox": list(s.bbox),
         "key_slice": s.key_slice, "centroid_ras": list(s.centroid_ras), "side": s.side, "components": s.components,
         "component_volumes_ml": list(s.component_volumes_ml), "colour": s.colour}
        for s in structures
    ]


def _class_views(classes: list[Any]) -> list[dict[str, Any]]:
    return [{"name": c.name, "label": label_text(c.name), "probability": c.probability, "present": c.present,
             "threshold": c.threshold} for c in classes]


def _selections(structures: list[dict[str, Any]], classes: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "structures": structures,
        "names": [s["name"] for s in structures],
        "by_name": {s["name"]: s for s in structures},
        "by_volume": sorted(structures, key=lambda s: -s["volume_ml"]),
        "classes": classes,
        "present": [c for c in classes if c["present"]],
        "absent": [c for c in classes if not c["present"]],
        "by_label": {c["label"]: c for c in classes},
    }


def findings_view(f: Findings) -> dict[str, Any]:
    """Findings as the plain dicts templates see, with a few ready-made selections. No PNG
    bytes and no timing (timing differs between runs and must never reach text)."""
    structures = _structure_views(f.structures)
    return {
        "expert": f.expert,
        "runner": f.runner,
        "arg": f.arg,
        "modality": f.modality,
        **_selections(structures, _class_views(f.classes)),
        "coloured": [s for s in structures if s["colour"]],
        "legend": dict(f.legend),
        "images": [{"kind": i.kind, "slice": i.slice, "caption": i.caption, "labels": list(i.labels)} for i in f.images],
        "source": "expert",
    }


def item_truth(item: StudyItem) -> dict[str, int] | None:
    """The item's own ground truth, when its source gives one per item (a 2D labels table), in
    name order: the same whether the item came from the index or back from the plan's JSON."""
    labels = item.attrs.get("labels")
    return {str(k): int(labels[k]) for k in sorted(labels)} if isinstance(labels, dict) and labels else None


def truth_view(f: Findings | None, item: StudyItem) -> dict[str, Any] | None:
    """The reference templates answer from: the findings' `truth` (a label map measured like the
    expert's output) and the item's labels table; None when there is neither."""
    truth = f.truth if f is not None else None
    table = item_truth(item)
    if truth is None and table is None:
        return None
    truth = truth or Truth()
    classes = _class_views(truth.classes)
    from_item = table is not None and not classes
    if from_item:
        classes = [{"name": k, "label": label_text(k), "probability": float(v), "present": bool(v), "threshold": 0.5}
                   for k, v in table.items()]
    # `table`: the item's own labels the classes came from (recorded in meta when answered from)
    return {**_selections(_structure_views(truth.structures), classes), "source": "truth", "table": table if from_item else None}


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


# --- the helpers -----------------------------------------------------------------------------


class TemplateHelpers:
    """The functions a template calls (see the module docstring)."""

    __slots__ = ()

    @property
    def _s(self) -> RenderState:
        return CURRENT_STATE.get()  # type: ignore[no-any-return]

    # pictures

    def picture(self, kind: str = "overlay", which: int | str = 0, of: str | None = None) -> dict[str, Any]:
        """A picture of the findings, not yet shown: `of` a structure (the slice through its
        largest cross-section, the reference's when it has the structure, else the expert's;
        the main slice when neither has it), else the main slice; `which`: a sequence by
        caption or position. A plain description: `kind`, `slice`, `of`, `labels` (on it in
        the expert's map; on an overlay, drawn), `truth` (on it in the reference, or null),
        `shows` (truth when known, else labels), `drawn` ([{name, colour}]), `colours`."""
        s = self._s
        f = s.subject.findings
        if kind not in PICTURE_KINDS:
            raise Fault(f"picture kind {kind!r}: use one of {', '.join(PICTURE_KINDS)}")
        if kind == "item":
            if s.subject.item.kind != "image2d":
                raise Fault(f"picture('item') is the picture of a 2D item; this is a {s.subject.item.kind} item: use 'key_slice'")
            kind = "key_slice"
        if f is None:
            raise Fault(f"picture({kind!r}) needs findings, and this task has no expert")
        candidates = [(i, img) for i, img in enumerate(f.images) if img.kind == kind]
        if not candidates:
            raise Fault(f"no {kind} picture in the findings of {f.expert} (runner {f.runner})")
        if kind == "sequence":
            if of is not None:
                raise Fault("sequence pictures are cut at the main slice only; leave out of=")
            if isinstance(which, str):
                found = [c for c in candidates if c[1].caption.lower() == which.lower()]
                if not found:
                    raise Fault(f"no sequence picture captioned {which!r} in the findings of {f.expert} (captions: {[i.caption for _, i in candidates]})")
                index, img = found[0]
            elif isinstance(which, int) and 0 <= which < len(candidates):
                index, img = candidates[which]
            else:
                raise Fault(f"no sequence picture {which!r} in the findings of {f.expert}, which have {len(candidates)}")
        else:
            z = self._slice_of(of) if of is not None else None
            # a structure measured apart from the label map (CT tissue's body) has no picture of
            # its own: the main slice shows it
            found = [c for c in candidates if c[1].slice == z] or candidates[:1]
            index, img = found[0]
        colours = {st["name"]: st["colour"] for st in (s.subject.view or {}).get("structures", [])}
        drawn = [{"name": n, "colour": colours[n]} for n in img.labels if colours.get(n)] if kind == "overlay" else []
        return {"index": index, "kind": img.kind, "slice": img.slice, "of": of, "caption": img.caption, "labels": list(img.labels),
                "truth": None if img.truth is None else list(img.truth), "digest": img.digest,
                "shows": list(img.truth if img.truth is not None else img.labels), "drawn": drawn,
                "colours": list(dict.fromkeys(d["colour"] for d in drawn))}

    def _slice_of(self, name: str) -> int | None:
        for view in (self._s.subject.truth, self._s.subject.view):
            found = (view or {}).get("by_name", {}).get(name)
            if found is not None:
                return int(found["key_slice"])
        return None

    def image(self, what: str | dict[str, Any] = "key_slice", which: int | str = 0, of: str | None = None) -> str:
        """Show a picture here (in a user turn): a `picture(...)`, or a kind as `picture` takes it."""
        pic = what if isinstance(what, dict) else self.picture(what, which, of)
        f = self._s.subject.findings
        if f is None or not isinstance(pic.get("index"), int) or not 0 <= pic["index"] < len(f.images):
            raise Fault("image() takes a picture(...) of this conversation's findings or a picture kind")
        record = {k: pic[k] for k in ("index", "kind", "slice", "of", "labels", "truth", "digest")}
        return self._s.add_image(f.images[pic["index"]].png, record)

    def legend(self, pic: dict[str, Any]) -> str:
        """`red: liver, blue: spleen`: exactly the structures drawn on the picture, in drawing
        order (in a user turn; recorded in `meta.legends`)."""
        s = self._s
        turn = s.in_turn("user", "legend()")
        colours = {d["name"]: d["colour"] for d in pic["drawn"]}
        entries = drawn_entries({"labels": pic["labels"]}, colours)
        s.legends.append({"turn": turn, "index": pic["index"], "kind": pic["kind"], "entries": entries})
        s.results.add(turn)
        return ", ".join(f"{colour}: {names}" for colour, names in entries)

    def colour_list(self, pic: dict[str, Any]) -> str:
        """`the liver (red), the spleen (blue) and the aorta (magenta)`: the structures drawn on
        the picture, each a fact shown there in its colour (in an assistant turn)."""
        s = self._s
        turn = s.in_turn("assistant", "colour_list()")
        parts = []
        for d in pic["drawn"]:
            text = f"the {d['name']} ({d['colour']})"
            s.facts.append({"turn": turn, "text": text, "shown": {"index": pic["index"], "kind": pic["kind"], "label": d["name"],
                                                                  "colour": d["colour"], "absent": False}, "given": None})
            parts.append(text)
        return join_and(parts)

    def report(self, structures: Any = None, counts: Any = ()) -> str:
        """The expert's measurements as a result turn states them (in a user turn): `Measured
        volumes: liver 1655.6 mL, hepatic tumor 13.1 mL (2 lesions).` — every structure of the
        findings, or those given (names or structures); `counts`: names whose number of lesions
        is stated too."""
        s = self._s
        turn = s.in_turn("user", "report()")
        view = s.subject.view or {}
        names = view.get("names", []) if structures is None else [x["name"] if isinstance(x, dict) else str(x) for x in structures]
        counted = {x["name"] if isinstance(x, dict) else str(x) for x in counts}
        parts = []
        for name in names:
            st = view.get("by_name", {}).get(name)
            if st is None:
                continue
            part = f"{name} {ml_text(st['volume_ml'])}"
            if name in counted:
                part += f" ({st['components']} lesion{'' if st['components'] == 1 else 's'})"
            parts.append(part)
        s.results.add(turn)
        return f"Measured volumes: {', '.join(parts)}." if parts else "Nothing was measured."

    def predictions(self, classes: Any) -> str:
        """VILA-M3's expert result lines, one per class: `atelectasis: no` (in a user turn)."""
        s = self._s
        s.results.add(s.in_turn("user", "predictions()"))
        return "\n".join(f"{c['label']}: {'yes' if c['present'] else 'no'}" for c in classes)

    # statements

    def fact(self, text: Any, shown: dict[str, Any] | None = None, label: str | None = None, colour: str | None = None,
             absent: bool = False, given: Any = None) -> str:
        """Say `text` in this assistant turn as a fact shown in a picture (`shown`, and the
        structure or class `label` on it, `colour` if it names one, `absent` for an absence)
        or given by an earlier turn (`given`: the words of that turn it repeats, e.g. a volume)."""
        s = self._s
        turn = s.in_turn("assistant", "fact()")
        text = str(text)
        record: dict[str, Any] = {"turn": turn, "text": text, "shown": None, "given": None}
        if shown is not None:
            record["shown"] = {"index": shown["index"], "kind": shown["kind"], "label": label, "colour": colour, "absent": bool(absent)}
        if given is not None:
            record["given"] = {"text": [str(g) for g in given] if isinstance(given, (list, tuple)) else str(given)}
        s.facts.append(record)
        return text

    def answer(self, text: Any, shown: dict[str, Any] | None = None, label: str | None = None, colour: str | None = None,
               absent: bool = False, given: Any = None) -> str:
        """`fact(...)`, in the turn that holds the scored answer (`meta.answer_turn`)."""
        s = self._s
        s.meta["answer_turn"] = s.in_turn("assistant", "answer()")
        if shown is None and given is None:
            return str(text)
        return self.fact(text, shown, label, colour, absent, given)

    def reference(self) -> dict[str, Any]:
        """Where closed answers come from: the truth (a label map measured like the findings, or
        the item's labels table) when the item has one; else the expert's findings if the task
        says `answer_from: expert`; else this item is skipped. Sets `meta.answer_from`."""
        s = self._s
        sub = s.subject
        if sub.truth is not None:
            s.meta.setdefault("answer_from", "truth")
            if sub.truth.get("table") is not None:
                s.meta["truth"] = {"classes": sub.truth["table"]}
            return sub.truth
        if sub.task.answer_from == "expert" and sub.view is not None:
            s.meta.setdefault("answer_from", "expert")
            return sub.view
        raise Skip("no ground truth for this item (a label map or a labels table); set `answer_from: expert` on the task "
                   "to answer from the expert's prediction")

    def meta(self, **values: Any) -> str:
        self._s.set_meta(values)
        return ""

    # choices and words

    def pick(self, values: Any) -> Any:
        seq = values if isinstance(values, (list, tuple)) else list(values)
        if not seq:
            raise Fault("pick() from an empty list")
        return self._s.rng.choice(seq)

    def shuffled(self, values: Any) -> list[Any]:
        seq = list(values)
        self._s.rng.shuffle(seq)
        return seq

    def sample(self, values: Any, k: int) -> list[Any]:
        seq = list(values)
        return self._s.rng.sample(seq, min(int(k), len(seq)))

    def chance(self, p: float = 0.5) -> bool:
        return self._s.rng.random() < float(p)

    def phrase(self, key: str | list[str], **fields: Any) -> str:
        """`phrase("key", name=…)`, or `phrase([key, fallback, …], …)`: the first key that has
        phrasings (a group's own wording, else the general one)."""
        banks = self._s.shared.phrasings
        if type(key) is str:
            bank = banks.get(key)
        else:
            for k in key:
                bank = banks.get(str(k))
                if bank is not None:
                    break
            else:
                bank = None
        if bank is None:
            raise Fault(f"no phrasing {key!r}: add it to a file in prompts/phrasings/")
        text = self._s.rng.choice(bank)
        try:
            return text.format_map(fields)
        except KeyError as e:
            raise Fault(f"phrasing {key!r} ({text!r}) needs {e.args[0]!r}: pass it as phrase({key!r}, {e.args[0]}=…)") from None

    def has_phrase(self, key: str) -> bool:
        return key in self._s.shared.phrasings

    def structure(self, name: str) -> dict[str, Any] | None:
        """The expert's structure `name`, or None."""
        view = self._s.subject.view
        if view is None:
            raise Fault("structure() needs findings, and this task has no expert")
        return view["by_name"].get(name)  # type: ignore[no-any-return]

    def skip(self, reason: str) -> str:
        """Make no conversation for this item (the reason goes to the ledger)."""
        raise Skip(str(reason))


def helpers() -> dict[str, Any]:
    """The helper functions, by the names templates call them."""
    h = TemplateHelpers()
    return {name: getattr(h, name) for name in (
        "picture", "image", "legend", "colour_list", "report", "predictions", "fact", "answer", "reference", "meta",
        "pick", "shuffled", "sample", "chance", "phrase", "has_phrase", "structure", "skip")}
