"""Helpers for the build tests, importable by Ray workers (the tests put this folder on
`PYTHONPATH` before Ray starts).

- `CountingTissueRunner` / `CountingLabelsRunner`: the weight-free runners, registered in a
  manifest by dotted path (`build_helpers:CountingTissueRunner`); each run appends a line
  `<item_id> <args>` to the file named by `M3_TEST_RUN_LOG` (if set) and sleeps
  `M3_TEST_RUN_SLEEP` seconds (if set; or the seconds written in the file it names, read at
  each run, so a test can slow one build and not the next), so tests can count expert runs
  and kill a build while experts are busy; with `M3_TEST_NODE_LOG` set, `<Ray node> <expert>` of each run goes there, and
  with `M3_TEST_TIMELINE` set, `<expert> <pid> <start> <end>` of each run (epoch seconds);
  with `M3_TEST_RUN_GATE` set, each run waits (at most 5 minutes) until that file exists.
- `WeightedLabelsRunner`: `CountingLabelsRunner` with the files of its `bundle:` folder as
  weights, and safe in threads: placed as an expert with weights is (an expert host on a CPU
  cluster) without loading a model.
- `FailingRunner`: an expert that fails on every item; `CrashingLabelsRunner`: one whose
  process dies on chosen items; `SetupCrashingLabelsRunner`: one whose process dies while it
  sets up.
- `demo_manifest()`: a small manifest over a `m3-curate demo-archive`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from expert_runners.base import ExpertInput
from expert_runners.ct_tissue import CtTissueRunner
from curation.findings import Findings
from expert_runners.labels import LabelsRunner


def _count(inp: ExpertInput, args: str, expert: str = "") -> None:
    started = time.time()
    path = os.environ.get("M3_TEST_RUN_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{inp.item.item_id} {args}\n")
    nodes = os.environ.get("M3_TEST_NODE_LOG")
    if nodes:
        import ray

        with open(nodes, "a") as f:
            f.write(f"{ray.get_runtime_context().get_node_id()} {expert}\n")
    gate = os.environ.get("M3_TEST_RUN_GATE")
    deadline = time.monotonic() + 300
    while gate and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.05)
    delay = os.environ.get("M3_TEST_RUN_SLEEP", "0") or "0"
    delay = float(Path(delay).read_text() if os.path.isfile(delay) else delay)
    if delay:
        time.sleep(delay)
    timeline = os.environ.get("M3_TEST_TIMELINE")
    if timeline:
        with open(timeline, "a") as f:
            f.write(f"{expert} {os.getpid()} {started:.3f} {time.time():.3f}\n")


class CountingTissueRunner(CtTissueRunner):
    runner = "build_helpers:CountingTissueRunner"

    def predict(self, inp: ExpertInput, args: str, timing: dict[str, float]) -> Findings:
        _count(inp, args, self.name)
        return super().predict(inp, args, timing)


class FailingRunner(LabelsRunner):
    """Fails on every item, as a broken expert would."""

    runner = "build_helpers:FailingRunner"

    def predict(self, inp: ExpertInput, args: str, timing: dict[str, float]) -> Findings:
        raise RuntimeError("synthetic failure")


class CrashingLabelsRunner(LabelsRunner):
    """Kills its own process (as the OOM killer or a crash in native code would) on the items
    with a file whose name holds `M3_TEST_CRASH_ON`; the ground truth elsewhere."""

    runner = "build_helpers:CrashingLabelsRunner"

    def predict(self, inp: ExpertInput, args: str, timing: dict[str, float]) -> Findings:
        marker = os.environ.get("M3_TEST_CRASH_ON")
        if marker and any(marker in uri for uri in inp.item.uris):
            os._exit(1)
        return super().predict(inp, args, timing)


class SetupCrashingLabelsRunner(LabelsRunner):
    """Kills its own process while setting up (as a GPU driver crash or the out-of-memory
    killer would while loading weights) when `M3_TEST_CRASH_SETUP` is set."""

    runner = "build_helpers:SetupCrashingLabelsRunner"

    def setup(self, device: str = "cpu") -> None:
        if os.environ.get("M3_TEST_CRASH_SETUP"):
            os._exit(1)
        super().setup(device)


class CountingLabelsRunner(LabelsRunner):
    runner = "build_helpers:CountingLabelsRunner"

    def predict(self, inp: ExpertInput, args: str, timing: dict[str, float]) -> Findings:
        _count(inp, args, self.name)
        return super().predict(inp, args, timing)


class WeightedLabelsRunner(CountingLabelsRunner):
    runner = "build_helpers:WeightedLabelsRunner"
    thread_safe = True

    def weight_files(self) -> list[Path]:
        return sorted(p for p in Path(self.spec.bundle).iterdir() if p.is_file()) if self.spec.bundle else []


def demo_manifest(archive: Path, out: Path, *, rows_per_shard: int = 7, counting: bool = False,
                  prompts: Path | None = None, extra_tasks: list[dict[str, Any]] | None = None,
                  extra_experts: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A build over `m3-curate demo-archive` with the weight-free runners: CT tissue and the
    ground truth (as VISTA3D) on CT, the ground truth as BRATS on brain MRI and as CXR on chest
    X-rays; templates from `prompts/`, with a fractional weight and a list of arguments. BRATS
    has `actors: 1`, so builds of it run both an actor pool and experts in load tasks."""
    tissue = "build_helpers:CountingTissueRunner" if counting else "ct_tissue"
    labels = "build_helpers:CountingLabelsRunner" if counting else "labels"
    data: dict[str, Any] = {
        "name": "tiny",
        "seed": 3,
        "sources": [
            {"name": "ct", "kind": "dicom", "root": str(archive / "ct"), "labels": "../ct_labels"},
            {"name": "brain", "kind": "nifti_group", "root": str(archive / "brain"), "channels": ["t1c", "t1", "t2", "flair"],
             "labels": "seg"},
            {"name": "cxr", "kind": "image2d", "root": str(archive / "cxr"), "labels": "labels.csv"},
        ],
        "experts": [
            {"name": "CT_TISSUE", "runner": tissue},
            {"name": "VISTA3D", "runner": labels, "options": {"preset": "vista3d"}},
            {"name": "BRATS", "runner": labels, "options": {"preset": "brats"}, "actors": 1},  # a pool; the others run in load tasks
            {"name": "CXR", "runner": labels},
            *(extra_experts or []),
        ],
        "tasks": [
            {"template": "findings/volume.j2", "source": "ct", "expert": "CT_TISSUE", "weight": 1},
            {"template": "vista3d/segment_and_answer.j2", "source": "ct", "expert": "VISTA3D", "args": ["everything", "organs"], "weight": 2},
            {"template": "findings/volume.j2", "source": "brain", "expert": "BRATS", "weight": 1.5},
            {"template": "cxr/expert_hint_vqa.j2", "source": "cxr", "expert": "CXR", "weight": 1},
            {"template": "cxr/expert_hint_choice.j2", "source": "cxr", "expert": "CXR", "weight": 0.5},
            *(extra_tasks or []),
        ],
        "split": {"val": 0.25, "test": 0.25},
        "output": {"dir": str(out), "rows_per_shard": rows_per_shard, "image_max_side": 128},
    }
    if prompts is not None:
        data["prompts"] = [str(prompts)]
    return data
