"""What of a build may leave it: the shareable forms of the manifest and of set-aside reasons.

The shareable folder (`OUT/dataset/`) names items only by their keyed ids. Two things the
build knows would break that if copied as they are:

- the resolved manifest holds absolute paths (source roots, label tables, bundles, the output
  folder) and the secret `key`;
- a reason a conversation was set aside is free text from a reader, an expert or a template,
  and may quote a file's path (`DOE^JOHN_MRN12345/series1/IM0006.dcm: truncated`).

`public_manifest` replaces every path-typed value (and the key) by a marker, whatever the field,
so a path field added later is covered too. `Redactor` removes from a text every path-like
token, every DICOM UID and every file or folder name the build discovered (the ledger's URIs
and the source roots): it does not rely on each reader writing clean reasons.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePath
from typing import Any

from pydantic import BaseModel

PATH_MARK = "<path>"
NAME_MARK = "<name>"
UID_MARK = "<uid>"
SECRET_MARK = "<secret>"
MIN_NAME = 3  # shorter names ("ct", series "2") carry no identity and are common words

# A token with a slash or a backslash, up to the quotes, brackets or separators around it.
_PATH = re.compile(r"""[^\s'"`()\[\]{}<>,;]*[/\\][^\s'"`()\[\]{}<>,;]*""")
_UID = re.compile(r"(?<![\w.])\d+(?:\.\d+){3,}(?![\w.])")
_TOKEN = re.compile(r"""[^\s'"`()\[\]{}<>,;:=]+""")


def _looks_like_path(value: str) -> bool:
    return "/" in value or "\\" in value or Path(value).is_absolute()


def _public_value(value: Any, *, typed: bool) -> Any:
    """`typed`: the value sits in a declared (not free-form) field, whose strings are kept."""
    if isinstance(value, PurePath):
        return PATH_MARK
    if isinstance(value, BaseModel):
        return public_fields(value)
    if isinstance(value, Mapping):
        return {k: _public_value(v, typed=False) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_public_value(v, typed=typed) for v in value]
    if isinstance(value, str) and not typed and _looks_like_path(value):
        return PATH_MARK
    return value


def public_fields(model: BaseModel) -> dict[str, Any]:
    """A pydantic model as JSON-safe data with every `Path` value (and every path-like string in
    a free-form mapping such as expert `options` or `models`) replaced by `<path>`."""
    return {name: _public_value(getattr(model, name), typed=True) for name in type(model).model_fields}


def manifest_paths(model: Any) -> list[Path]:
    """Every path a manifest names (source roots, tables, bundles, folders)."""
    if isinstance(model, PurePath):
        return [Path(model)]
    if isinstance(model, BaseModel):
        return [p for name in type(model).model_fields for p in manifest_paths(getattr(model, name))]
    if isinstance(model, (list, tuple)):
        return [p for v in model for p in manifest_paths(v)]
    return []


def public_manifest(spec: BaseModel) -> dict[str, Any]:
    """The resolved manifest as the dataset card shows it: no path, no secret."""
    data = public_fields(spec)
    if data.get("key") is not None:
        data["key"] = SECRET_MARK
    return data


class Redactor:
    """Removes archive names from a text: path-like tokens, DICOM UIDs, and every file or folder
    name (and file stem) under the source roots, and the roots' own names.

    >>> r = Redactor(["DOE^JOHN_MRN12345/series1/IM0006.dcm"], roots=[Path("/data/archive")])
    >>> r("quarantined: IM0006.dcm in DOE^JOHN_MRN12345 (series 1.2.840.1.5): truncated")
    'quarantined: <name> in <name> (series <uid>): truncated'
    >>> r("load: /data/archive/x/y.nii.gz: not a NIfTI file")
    'load: <path>: not a NIfTI file'
    >>> Redactor([], keep=["cxr/plain.j2"])("template cxr/plain.j2, line 3: a/b")
    'template cxr/plain.j2, line 3: <path>'
    """

    def __init__(self, uris: Iterable[str], roots: Iterable[Path] = (), keep: Iterable[str] = ()):
        self._keep = sorted(set(keep), key=len, reverse=True)  # public names with a slash: templates
        names: set[str] = set()
        for path in [*(PurePath(u) for u in uris), *(Path(r) for r in roots)]:
            for part in path.parts:
                names.update({part, part.split(".", 1)[0], part.rsplit(".", 1)[0]})
        names = {n for n in names if len(n) >= MIN_NAME and n.strip("/\\. ")}
        self._names = names
        self._spaced = sorted((n for n in names if _TOKEN.fullmatch(n) is None), key=len, reverse=True)

    def __call__(self, text: str) -> str:
        kept = {f"\x00{i}\x00": k for i, k in enumerate(self._keep) if k in text}
        for mark, k in kept.items():
            text = text.replace(k, mark)
        text = self._redact(text)
        for mark, k in kept.items():
            text = text.replace(mark, k)
        return text

    def _redact(self, text: str) -> str:
        text = _PATH.sub(lambda m: PATH_MARK + m.group(0)[len(m.group(0).rstrip(":.")):], text)
        text = _UID.sub(UID_MARK, text)
        for name in self._spaced:  # names a token cannot hold whole ("John Smith", "a;b")
            text = text.replace(name, NAME_MARK)
        return _TOKEN.sub(lambda m: self._token(m.group(0)), text)

    @classmethod
    def of(cls, spec: BaseModel, uris: Iterable[str]) -> Redactor:
        """For a build: the files it discovered and every path its manifest names; the names of
        its templates (`vista3d/segment_and_answer.j2`) stay."""
        return cls(uris, roots=manifest_paths(spec), keep=[t.template for t in getattr(spec, "tasks", [])])

    def _token(self, token: str) -> str:
        for candidate in (token, token.rstrip(".")):
            if candidate in self._names:
                return NAME_MARK + token[len(candidate):]
        return token


def public_counts(counts: Mapping[str, int], redact: Redactor) -> dict[str, int]:
    """Counts keyed by reason, keyed by the redacted reason (reasons that differ only in a
    file's name add up), most frequent first."""
    merged: Counter[str] = Counter()
    for reason, n in counts.items():
        merged[redact(reason)] += n
    return dict(merged.most_common())
