"""Every mistake a manifest or a command line can hold that shows without running an expert,
found in a second, before Ray or any model starts.

Without it a build would meet a missing folder only once Ray had started and the experts were
loading, tens of seconds in. Here each check is cheap (a `stat`, a walk
that stops at the first file it would use, reading template declarations) and its message is one
line naming the manifest file and the key, e.g.

    manifests/x.yaml: sources[1].root: folder not found: /data/brain
    manifests/x.yaml: tasks[2].template: no template 'vista3d/typo.j2' in prompts/ (or the manifest's prompts folders)
    --out /data/out.parquet: a file is there, not a folder

Checked: source roots, files and label tables; template folders; expert runners and bundles
(the MONAI bundle files); tasks (at least one where the command makes rows; each template
found and fit for its source and expert); each task's source holding at least one file its
reader takes; every output folder or file writable.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from curation.atomic import write_refused
from curation.errors import CurationError
from curation.manifest import BuildSpec

BUNDLE_RUNNERS = ("vista3d", "brats", "monai_bundle")
BUNDLE_FILES = (("configs/metadata.json",), ("configs/inference.json", "configs/inference.yaml", "configs/inference.yml"),
                ("models/model.pt",))
PROBE_FILES = 100_000  # a source walk stops here and leaves the verdict to the index


class _Where:
    """Formats `manifest: key: problem`."""

    def __init__(self, manifest: str | Path | None):
        self.prefix = f"{manifest}: " if manifest is not None else ""

    def error(self, key: str, problem: str) -> CurationError:
        return CurationError(f"{self.prefix}{key}: {problem}")


ExpertsFrom = Literal["describe", "cached", "cached_or_build"]


def preflight(spec: BuildSpec, manifest: str | Path | None, *, out: str | Path | None = None, rows: bool = False,
              outputs: bool = True, experts: ExpertsFrom = "describe") -> None:
    """Check a manifest (and the command's output folder) before anything runs.

    `rows`: the command makes rows (build, render, preview), so tasks are checked: at least one,
    templates found and fit, each task's source holding something to read. `out`: the command's
    `--out` (else the manifest's `output.dir`), checked writable when `outputs`. `experts`: where
    the template check learns what each expert gives — from the runners themselves (`describe`:
    constructed, options validated, weight files hashed for the fingerprint but never loaded;
    each file once per process), only from what a build recorded in the cache (`cached`:
    `render` constructs no runner), or the cache when it has every expert recorded, else the
    runners — unless some are MONAI bundles, whose check is then left to `build`
    (`cached_or_build`: the build describes the runners and checks the templates against them
    as it prepares, while Ray starts: reading a bundle's config imports MONAI, about 4 s that
    would otherwise come before Ray's start)."""
    where = _Where(manifest)
    check_sources(spec, where)
    check_prompts(spec, where)
    check_experts(spec, where)
    if outputs:
        from curation.store.layout import Layout

        layout = Layout.of(spec, out)
        writable_folder(layout.out, "--out" if out else f"{where.prefix}output.dir")
        if spec.output.cache is not None:
            writable_folder(Path(spec.output.cache), f"{where.prefix}output.cache")
        check_output_places(spec, layout, where, "--out" if out else "output.dir")
    if rows:
        check_tasks(spec, where, lambda: _expert_infos(spec, out, experts))


def check_output_places(spec: BuildSpec, layout: Any, where: _Where, out_key: str) -> None:
    """The output folder and the cache apart from every source root, and the cache out of the
    dataset folder. Inside a root, what a build writes (an export's pictures, a preview page)
    would be read as the archive's next time, and a root inside the output would index its
    shards; the dataset folder is replaced whole by each build (a cache there would be lost
    every time) and is the one shared (the cache is internal)."""
    places = [(out_key, layout.out.resolve())]
    if spec.output.cache is not None:
        cache = Path(spec.output.cache).resolve()
        places.append(("output.cache", cache))
        for dataset in (layout.dataset, layout.staged().dataset, layout.retired):
            if cache.is_relative_to(dataset.resolve()):
                raise where.error("output.cache", f"{cache} is inside the dataset folder {dataset}, which each build replaces whole "
                                                  "(the cache would be lost every time) and which is the one shared: put the cache "
                                                  "elsewhere (default: OUT/internal/cache)")
    for i, s in enumerate(spec.sources):
        root = Path(s.root).resolve()
        for key, place in places:
            if place.is_relative_to(root) or root.is_relative_to(place):
                inside = f"{place} is inside sources[{i}].root {root}" if place.is_relative_to(root) else \
                    f"sources[{i}].root {root} is inside it ({place})"
                raise where.error(key, f"{inside}: what a build writes would be read as the archive's next time; keep outputs and "
                                       "sources apart")


def check_sources(spec: BuildSpec, where: _Where) -> None:
    for i, s in enumerate(spec.sources):
        _folder(s.root, where, f"sources[{i}].root")
        if s.kind == "qa":
            _file(s.file, where, f"sources[{i}].file")
        labels = getattr(s, "labels", None)
        if s.kind == "dicom" and labels is not None:
            _folder(labels, where, f"sources[{i}].labels")
        elif s.kind == "image2d" and labels is not None:
            _file(labels, where, f"sources[{i}].labels")


def check_prompts(spec: BuildSpec, where: _Where) -> None:
    for i, folder in enumerate(spec.prompts):
        _folder(folder, where, f"prompts[{i}]")


def check_experts(spec: BuildSpec, where: _Where) -> None:
    from importlib.metadata import entry_points

    from expert_runners.base import BUILTIN, ENTRY_POINT_GROUP

    plugins = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    for i, e in enumerate(spec.experts):
        if e.runner not in BUILTIN and e.runner not in plugins and ":" not in e.runner:
            raise where.error(f"experts[{i}].runner", f"unknown runner {e.runner!r}: use one of {sorted(BUILTIN)}, an entry point "
                                                      f"in group {ENTRY_POINT_GROUP!r} or a dotted path 'package.module:Class'")
        if e.bundle is None:
            continue
        _folder(e.bundle, where, f"experts[{i}].bundle")
        if e.runner in BUNDLE_RUNNERS:
            for names in BUNDLE_FILES:
                if not any((e.bundle / n).is_file() for n in names):
                    raise where.error(f"experts[{i}].bundle", f"not a MONAI bundle: {e.bundle / names[0]} is missing "
                                                              "(a bundle holds configs/metadata.json, configs/inference.json and "
                                                              "models/model.pt; nothing is downloaded)")
        for j, model in enumerate(e.models):
            path = model.get("path") if isinstance(model, dict) else model if isinstance(model, str) else None
            if isinstance(path, str) and not (e.bundle / path).exists():
                raise where.error(f"experts[{i}].models[{j}].path", f"file not found: {e.bundle / path}")


def _expert_infos(spec: BuildSpec, out: str | Path | None, source: ExpertsFrom) -> dict[str, Any] | None:
    """What the renderer's check needs to know of each expert (see `preflight`); None: the
    check is left to the build."""
    from curation.store.cache import FindingsCache, expert_infos_from_cache
    from curation.store.layout import Layout

    if source != "describe":
        try:
            return expert_infos_from_cache(spec, FindingsCache(Layout.of(spec, out).cache))
        except CurationError:
            if source == "cached":
                raise
            if any(e.runner in BUNDLE_RUNNERS for e in spec.experts):  # cached_or_build
                return None
    from expert_runners.base import describe_experts

    return describe_experts(spec)


def check_tasks(spec: BuildSpec, where: _Where, expert_infos: Callable[[], dict[str, Any] | None]) -> None:
    if not spec.tasks:
        raise where.error("tasks", "none: a build makes rows from tasks (template, source, expert); add at least one")
    from curation.render.templates import BUILTIN_PROMPTS

    roots = [*spec.prompts, BUILTIN_PROMPTS]
    for i, t in enumerate(spec.tasks):
        if not any((r / t.template).is_file() for r in roots):
            extra = " or the manifest's prompts folders" if spec.prompts else ""
            raise where.error(f"tasks[{i}].template", f"no template {t.template!r} in prompts/{extra}")
    probed: set[str] = set()
    for i, t in enumerate(spec.tasks):
        if t.source not in probed:
            probed.add(t.source)
            _source_has_input(spec, t.source, where, f"tasks[{i}].source")
    infos = expert_infos()
    if infos is not None:
        check_templates(spec, infos, where.prefix)


def check_templates(spec: BuildSpec, infos: dict[str, Any], prefix: str = "") -> None:
    """Every task's template against what its expert gives and takes (`infos`: name →
    `ExpertInfo`), as the renderer will use it; `prefix` names the manifest in the error."""
    from curation.render.renderer import Renderer

    try:
        Renderer(spec, experts=infos).check()
    except CurationError as e:
        raise CurationError(f"{prefix}{e}") from None


def _source_has_input(spec: BuildSpec, name: str, where: _Where, key: str) -> None:
    """At least one file under the source's root that its reader takes (the walk stops at the
    first): a wrong root, kind, pattern or channel list fails here, not after Ray started."""
    index, s = next((k, s) for k, s in enumerate(spec.sources) if s.name == name)
    takes = _taker(s)
    seen = 0
    for rel in _walk(s.root):
        seen += 1
        if takes(rel) or seen >= PROBE_FILES:
            return
    what = {"dicom": "no file", "nifti": "no .nii or .nii.gz file", "image2d": "no PNG, JPEG or DICOM file",
            "nifti_group": f"no file matching pattern {getattr(s, 'pattern', '')!r} for channel "
                           f"{(getattr(s, 'channels', None) or ['?'])[0]!r}",
            "qa": "no file"}.get(s.kind, "no file")
    raise where.error(key, f"source {name!r} ({s.kind}) yields no items: {what} under sources[{index}].root {s.root}")


def _taker(s: Any) -> Callable[[str], bool]:
    """Whether the reader of source `s` would consider a file (by its relative path)."""
    kind = s.kind
    if kind == "nifti":
        from curation.ingest.nifti import NIFTI_SUFFIXES

        return lambda rel: rel.lower().endswith(NIFTI_SUFFIXES)
    if kind == "image2d":  # pictures by suffix; DICOM by suffix, or any file not named as something else
        from curation.ingest.dicom import NOT_DICOM_SUFFIXES
        from curation.ingest.image2d import PICTURE_SUFFIXES

        return lambda rel: rel.lower().endswith(PICTURE_SUFFIXES) or not rel.lower().endswith(NOT_DICOM_SUFFIXES)
    if kind == "nifti_group":
        from curation.ingest.nifti import pattern_regex

        regex, first = pattern_regex(s.pattern), s.channels[0]
        return lambda rel: (m := regex.fullmatch(rel)) is not None and m.group("channel") == first
    if kind == "dicom":
        from curation.ingest.dicom import NOT_DICOM_SUFFIXES

        return lambda rel: not rel.lower().endswith(NOT_DICOM_SUFFIXES)
    return lambda rel: True


def _walk(root: Path) -> Iterator[str]:
    """Relative POSIX paths of files under `root`, lazily, links to folders not followed twice."""
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            st = folder.stat()
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir():
                    stack.append(Path(entry.path))
                elif entry.is_file():
                    yield Path(entry.path).relative_to(root).as_posix()
            except OSError:
                continue


def _folder(path: Path, where: _Where, key: str) -> None:
    if not path.exists():
        raise where.error(key, f"folder not found: {path}")
    if not path.is_dir():
        raise where.error(key, f"{path} is a file, not a folder")


def _file(path: Path, where: _Where, key: str) -> None:
    if not path.exists():
        raise where.error(key, f"file not found: {path}")
    if path.is_dir():
        raise where.error(key, f"{path} is a folder, not a file")


def writable_folder(path: str | Path, what: str) -> None:
    """`path` is, or can become, a folder this process can write in. Tried for real (a
    temporary file in the nearest existing folder), since permission bits say nothing to root
    and nothing about read-only or full file systems."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CurationError(f"{what} {path}: a file is there, not a folder")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CurationError(f"{what} {path}: {existing} is a file, so no folder can be made there")
    refused = write_refused(existing)
    if refused is not None:
        raise CurationError(f"{what} {path}: cannot write in {existing}: {refused.strerror or refused}")


def writable_file(path: str | Path, what: str) -> None:
    """`path` can be written as a file: not a folder, its folder writable."""
    path = Path(path)
    if path.is_dir():
        raise CurationError(f"{what} {path}: a folder is there, not a file")
    writable_folder(path.parent, what)
