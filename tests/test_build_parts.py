"""Parts of the build that need no Ray: actor placement, the Ray address check, the cache's
error entries and expert registry, progress, and a build that plans no work."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from build_helpers import demo_manifest

from curation.store.cache import FindingsCache, content_hash
from curation.build.cluster import place_experts, ray_session
from curation.demo import write_demo_archive
from curation.errors import CurationError
from curation.manifest import BuildSpec, load_manifest
from curation.build.pipeline import build
from curation.build.plan import ExpertInfo, Lane, Plan, runner_spec
from curation.build.progress import BuildProgress


def spec_with(experts: list[dict], tmp_path: Path) -> BuildSpec:
    return BuildSpec.model_validate({
        "name": "p", "sources": [{"name": "ct", "kind": "dicom", "root": str(tmp_path)}, {"name": "x", "kind": "image2d", "root": str(tmp_path)}],
        "experts": experts,
        "tasks": [{"template": f"t{i}.j2", "source": "ct" if i < len(experts) - 1 else "x", "expert": e["name"]} for i, e in enumerate(experts)],
    })


def plan_for(spec: BuildSpec, weights: set[str]) -> Plan:
    lanes = [Lane(sources=("ct",), experts=tuple(e.name for e in spec.experts[:-1])), Lane(sources=("x",), experts=(spec.experts[-1].name,))]
    infos = {e.name: ExpertInfo(name=e.name, runner=e.runner, fingerprint="f", spec={}, weights=e.name in weights) for e in spec.experts}
    return Plan(spec=spec, lanes=lanes, experts=infos, shards={}, source=[], order=np.zeros(0, np.int64), splits=np.zeros(0, np.int8),
                counts=np.zeros((0, len(spec.tasks)), np.uint16), totals={}, per_shard=1)


def test_pools_get_a_gpu_each_when_there_are_enough(tmp_path):
    spec = spec_with([{"name": "V", "runner": "vista3d"}, {"name": "T", "runner": "ct_tissue"}, {"name": "C", "runner": "cxr_ensemble"}], tmp_path)
    placed = place_experts(spec, plan_for(spec, {"V", "C"}), {"CPU": 16, "GPU": 4})
    assert (placed["V"].actors, placed["V"].gpus) == (2, 1.0) and (placed["C"].actors, placed["C"].gpus) == (2, 1.0)
    assert placed["T"].tasks and placed["T"].gpus == 0 and placed["T"].actors == 0  # weight-free: in the load tasks
    assert all(p.cpus == 1.0 for p in placed.values())


def test_a_weight_free_expert_gets_a_pool_when_the_manifest_sizes_one(tmp_path):
    spec = spec_with([{"name": "T", "runner": "ct_tissue", "actors": 2}, {"name": "L", "runner": "labels", "gpus": 0.5},
                      {"name": "C", "runner": "labels"}], tmp_path)
    placed = place_experts(spec, plan_for(spec, set()), {"CPU": 16, "GPU": 1})
    assert (placed["T"].tasks, placed["T"].actors) == (False, 2) and (placed["L"].tasks, placed["L"].gpus) == (False, 0.5)
    assert placed["C"].tasks


def test_gpus_are_shared_when_pools_outnumber_them(tmp_path):
    spec = spec_with([{"name": "V", "runner": "vista3d"}, {"name": "B", "runner": "brats"}, {"name": "C", "runner": "cxr_ensemble"}], tmp_path)
    placed = place_experts(spec, plan_for(spec, {"V", "B", "C"}), {"CPU": 16, "GPU": 1})
    assert [p.gpus for p in placed.values()] == [0.33, 0.33, 0.33] and all(p.actors == 1 for p in placed.values())


def test_manifest_sizes_are_kept_and_checked(tmp_path):
    spec = spec_with([{"name": "V", "runner": "vista3d", "actors": 3, "gpus": 1, "batch_size": 2, "memory_gb": 1.5},
                      {"name": "C", "runner": "cxr_ensemble"}], tmp_path)
    with pytest.raises(CurationError, match=r"need 3 GPUs and the cluster has 2.*experts\[0\] \(V\): 3 actors"):
        place_experts(spec, plan_for(spec, {"V"}), {"CPU": 16, "GPU": 2})
    placed = place_experts(spec, plan_for(spec, {"V"}), {"CPU": 16, "GPU": 3})
    assert (placed["V"].actors, placed["V"].gpus, placed["V"].batch_size, placed["V"].memory) == (3, 1.0, 2, 1.5 * 2**30)


def test_cpu_experts_with_weights_share_one_expert_host_on_a_small_machine(tmp_path):
    """On 2 CPUs the three experts with weights run in one host process (one import of torch
    and MONAI, every model loaded once) on two threads, and one CPU stays for load and render
    tasks."""
    from curation.build.cluster import actor_cpus

    spec = spec_with([{"name": "A", "runner": "vista3d"}, {"name": "B", "runner": "brats"}, {"name": "C", "runner": "cxr_ensemble"}], tmp_path)
    placed = place_experts(spec, plan_for(spec, {"A", "B", "C"}), {"CPU": 2})
    assert all(p.hosted and (p.actors, p.threads, p.pools) == (1, 2, 1) for p in placed.values())
    assert actor_cpus(placed) <= 1.0


def test_expert_hosts_grow_with_the_cluster_and_leave_sized_pools_alone(tmp_path):
    """A thread per CPU of a node (HOST_THREADS at most) and hosts for the cluster's CPUs, no
    more than half its memory holds; an expert the manifest gives `actors` keeps its own pool,
    and on a cluster with GPUs experts with weights get GPUs, not hosts."""
    from curation.build.cluster import HOST_THREADS, NodeLimits, actor_cpus

    experts = [{"name": "A", "runner": "vista3d", "memory_gb": 2}, {"name": "B", "runner": "brats", "memory_gb": 2},
               {"name": "C", "runner": "cxr_ensemble", "actors": 2}]
    spec = spec_with(experts, tmp_path)
    plan = plan_for(spec, {"A", "B", "C"})
    placed = place_experts(spec, plan, {"CPU": 4, "memory": 2**36}, NodeLimits(cpus=2, gpus=0, memory=2**35, count=2))
    assert [(p.hosted, p.actors, p.threads) for p in placed.values()] == [(True, 2, 2), (True, 2, 2), (False, 2, 1)]
    assert actor_cpus(placed) <= 4 - 2 * 1.0  # each node keeps room for a task
    placed = place_experts(spec, plan, {"CPU": 64, "memory": 2**40}, NodeLimits(cpus=64, gpus=0, memory=2**40))
    assert (placed["A"].actors, placed["A"].threads) == (64 // HOST_THREADS, HOST_THREADS)
    placed = place_experts(spec, plan, {"CPU": 64, "memory": 17 * 2**30}, NodeLimits(cpus=64, gpus=0, memory=17 * 2**30))
    assert placed["A"].actors == 2  # 4 GiB a host, 8.5 GiB for hosts
    placed = place_experts(spec, plan, {"CPU": 16, "GPU": 2})
    assert not any(p.hosted for p in placed.values()) and placed["A"].gpus > 0


def test_an_expert_host_runs_items_at_once_only_when_the_runner_says_it_is_safe_in_threads(tmp_path, monkeypatch):
    """Two items handed to a host with two threads at once: their runs overlap for a runner
    that declares `thread_safe` itself, and take turns for one that inherits it (a plug-in
    deriving from a built-in runner may keep state its parent does not)."""
    from concurrent.futures import ThreadPoolExecutor
    from dataclasses import replace

    from build_helpers import CountingLabelsRunner
    from curation.build.stages import ExpertStage, WorkItem, load_item
    from expert_runners.base import thread_safe
    from expert_runners.labels import LabelsRunner

    assert LabelsRunner.thread_safe and not thread_safe(CountingLabelsRunner.__new__(CountingLabelsRunner))
    _, prep = prepared(tmp_path, counting=True)
    pair = [p for p in prep.plan.iter_working() if p.item.source == "cxr"][:2]
    monkeypatch.setenv("M3_TEST_RUN_SLEEP", "0.3")

    def runs_overlap(k: int) -> bool:
        ctx = replace(prep.ctx, cache_root=str(tmp_path / f"cache-{k}"))
        host = ExpertStage(ctx, ("CXR",), gpus=0.0, last=True, threads=2)
        works = [load_item(WorkItem(plan=p), ctx) for p in pair]
        timeline = tmp_path / f"timeline-{k}"
        monkeypatch.setenv("M3_TEST_TIMELINE", str(timeline))
        with ThreadPoolExecutor(2) as pool:
            done = list(pool.map(host.run_item, works))
        assert all(w.report.runs == {"CXR": 1} and w.volume is None for w in done)
        (s1, e1), (s2, e2) = sorted(tuple(map(float, line.split()[2:])) for line in timeline.read_text().splitlines())
        return s2 < e1

    assert not runs_overlap(0)
    monkeypatch.setattr(CountingLabelsRunner, "thread_safe", True, raising=False)
    assert runs_overlap(1)


def test_an_expert_host_runs_an_expert_once_on_two_items_with_the_same_files_handed_to_it_at_once(tmp_path, monkeypatch):
    """Two lanes that read one picture can hand a host's two threads its two items at once,
    both loaded before either ran: the second waits for the first's result and counts it as
    cached (a fresh demo build ran CXR 33 and 35 times on its 32 pictures before this)."""
    from concurrent.futures import ThreadPoolExecutor

    from build_helpers import CountingLabelsRunner
    from curation.build.stages import ExpertStage, WorkItem, load_item

    monkeypatch.setattr(CountingLabelsRunner, "thread_safe", True, raising=False)  # their runs could overlap
    _, prep = prepared(tmp_path, counting=True)
    item = next(p for p in prep.plan.iter_working() if p.item.source == "cxr")
    works = [load_item(WorkItem(plan=item), prep.ctx) for _ in range(2)]
    assert all(w.missing == {"CXR": [""]} for w in works)  # both loaded before either ran
    monkeypatch.setenv("M3_TEST_RUN_SLEEP", "0.3")
    runs = tmp_path / "runs.log"
    monkeypatch.setenv("M3_TEST_RUN_LOG", str(runs))
    host = ExpertStage(prep.ctx, ("CXR",), gpus=0.0, last=True, threads=2)
    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(host.run_item, works))
    assert len(runs.read_text().splitlines()) == 1
    assert sorted((w.report.runs.get("CXR", 0), w.report.cached.get("CXR", 0)) for w in done) == [(0, 1), (1, 0)]


def test_a_cluster_with_no_cpu_is_refused_before_ray_data_waits_for_one():
    """A head started with `--num-cpus=0` before any worker joined: Ray Data would wait for a
    CPU for the load tasks without end (measured: still waiting at 2 minutes)."""
    from curation.build.cluster import NodeLimits, refuse_without_cpus

    with pytest.raises(CurationError, match=r"the Ray cluster has no CPU on any of its 1 node\(s\).*start a worker node"):
        refuse_without_cpus(NodeLimits(cpus=0.0, gpus=1.0, memory=2**34, count=1))
    refuse_without_cpus(NodeLimits(cpus=0.5, gpus=0.0, memory=2**34, count=1))  # part of one is enough for a task


def test_actors_leave_every_node_room_for_a_task_wherever_ray_puts_them(tmp_path):
    """Two nodes of 2 CPUs and eight actors: with 0.37 CPU each (the whole cluster less one CPU)
    Ray can put four on each node, leaving 0.52 CPU per node, and no load task (1 CPU) ever
    runs. The actors take at most the cluster less one task per node."""
    from curation.build.cluster import NodeLimits

    experts = [{"name": n, "runner": "vista3d", "actors": 2} for n in "ABCD"]
    spec = spec_with(experts, tmp_path)
    placed = place_experts(spec, plan_for(spec, set("ABCD")), {"CPU": 4}, NodeLimits(cpus=2, gpus=0, memory=2**34, count=2))
    assert sum(p.cpus * p.actors * p.pools for p in placed.values()) <= 4 - 2 * 1.0


def test_pools_that_no_node_can_hold_are_refused_before_anything_starts(tmp_path):
    from curation.build.cluster import NodeLimits

    spec = spec_with([{"name": "V", "runner": "vista3d", "gpus": 2}, {"name": "C", "runner": "cxr_ensemble", "gpus": 0}], tmp_path)
    with pytest.raises(CurationError, match=r"experts\[0\] \(V\): gpus: 2 per actor, but no node has more than 1"):
        place_experts(spec, plan_for(spec, {"V", "C"}), {"CPU": 16, "GPU": 4}, NodeLimits(cpus=4, gpus=1, memory=2**35, count=4))
    spec = spec_with([{"name": "V", "runner": "vista3d"}, {"name": "C", "runner": "cxr_ensemble", "memory_gb": 64}], tmp_path)
    with pytest.raises(CurationError, match=r"experts\[1\] \(C\): memory_gb: 64 per actor, but no node offers more than 32.0 GiB"):
        place_experts(spec, plan_for(spec, {"V", "C"}), {"CPU": 16, "memory": 2**36}, NodeLimits(cpus=8, gpus=0, memory=2**35, count=2))


def test_scheduling_keys_do_not_change_the_runner_spec(tmp_path):
    spec = spec_with([{"name": "V", "runner": "ct_tissue", "actors": 4, "batch_size": 8, "gpus": 0.5, "memory_gb": 2},
                      {"name": "C", "runner": "labels"}], tmp_path)
    plain = spec_with([{"name": "V", "runner": "ct_tissue"}, {"name": "C", "runner": "labels"}], tmp_path)
    assert runner_spec(spec.experts[0]) == runner_spec(plain.experts[0]) == plain.experts[0]


@pytest.mark.ray
def test_local_session_stops_every_ray_process():
    """The local session's end kills the autoscaler monitor before `ray.shutdown` (which would
    wait a second for it): no Ray process of the session outlives it."""
    import ray
    from ray._private import worker

    assert not ray.is_initialized(), "another test left Ray running"
    with ray_session(None):
        processes = [info.process for infos in worker._global_node.all_processes.values() for info in infos]
        assert any("monitor" in " ".join(p.args) for p in processes)  # what the session stops
    assert not ray.is_initialized()
    for p in processes:
        assert p.wait(timeout=10) is not None, p.args


@pytest.mark.ray
def test_a_curation_error_raised_in_a_task_or_an_actor_reaches_the_user_as_its_message(tmp_path, capfd):
    """Ray Data wraps what a task raises in a UserCodeException, and only its text crosses to the
    driver: the build still stops with the `CurationError`'s own message (one line, status 2),
    not a Ray traceback, and Ray Data's console lines on a failed task, with advice on its
    settings, are left out. The task is a load task on a node that cannot see `--out` (one that
    joined the cluster after the build checked its nodes): `stages.read_blocks` names the node."""
    import pyarrow as pa
    import ray
    import ray.data

    from curation.build.cluster import _quiet_ray_data_console
    from curation.build.stages import read_blocks
    from curation.errors import CurationError, user_error

    said = "node 10.0.0.3 (cccccccc) cannot read this build's input blocks (/out/x: No such file or directory): --out must be shared"
    missing = tmp_path / "internal" / "plan" / "lane-0.parquet"

    def task(batch):
        return read_blocks(pa.table({"block": [0]}), str(missing))

    class Actor:
        def __call__(self, batch):
            raise CurationError(said)

    def other(batch):
        raise ValueError("a bug, not the user's: curation.errors.Nothing: not a CurationError")

    assert not ray.is_initialized(), "another test left Ray running"
    found = {}
    with ray_session(None):
        _quiet_ray_data_console()
        blocks = ray.data.from_blocks([pa.table({"a": [1]})])
        for name, ds in {"task": blocks.map_batches(task, batch_format="pyarrow"),
                         "actor": blocks.map_batches(Actor, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1)),
                         "other": blocks.map_batches(other, batch_format="pyarrow")}.items():
            with pytest.raises(Exception) as raised:
                ds.materialize()
            found[name] = user_error(raised.value)
    assert re.fullmatch(rf"node \S+ \([0-9a-f]{{8}}\) cannot read this build's input blocks \({re.escape(str(missing))}: "
                        r"No such file or directory\)\. Every node must mount .*\. What finished is cached: run the same command "
                        r"again once that node has them, or without it", str(found["task"])), found["task"]
    assert str(found["actor"]) == said and found["other"] is None
    assert all(type(e) is CurationError for e in (found["task"], found["actor"]))
    said_by_ray_data = capfd.readouterr().err
    assert "Dataset execution will now abort" not in said_by_ray_data and "Exception occurred in user code" not in said_by_ray_data


@pytest.mark.slow
@pytest.mark.ray
def test_a_small_object_store_gets_a_budget_that_holds_the_blocks(tmp_path):
    """A store too small for STORE_FRACTION to hold two of the largest input blocks per expert
    slot (here 80 MiB, brain blocks of 9 MB): the budget is raised, at most to half, and the
    build writes the same shards as a rebuild from its cache."""
    import ray
    import ray.data

    from curation.build.cluster import STORE_FRACTION

    assert not ray.is_initialized(), "another test left Ray running"
    archive = tmp_path / "archive"
    write_demo_archive(archive, cases=1, seed=0)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump(demo_manifest(archive, tmp_path / "out")))
    ray.init(num_cpus=2, object_store_memory=80 << 20, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        first = build(manifest, progress=False)
        fraction = ray.data.DataContext.get_current().override_object_store_memory_limit_fraction
    finally:
        ray.shutdown()
    assert STORE_FRACTION < fraction <= 0.5
    shards = {p.relative_to(first.out): p.read_bytes() for p in first.shards}
    again = build(manifest, progress=False)  # every finding cached: rendered here, without Ray
    assert len(shards) > 1 and {p.relative_to(again.out): p.read_bytes() for p in again.shards} == shards


def test_cache_error_entries_and_registry(tmp_path):
    cache = FindingsCache(tmp_path)
    cache.put_error("c0ffee", "fp", "load failed: truncated", "organs")
    assert cache.get_error("c0ffee", "fp", "organs") == ("quarantined", "load failed: truncated")
    assert not cache.has("c0ffee", "fp", "organs") and cache.get_error("c0ffee", "fp", "") is None
    # an expert's own failure is settled (the same fingerprint repeats it); the environment's is tried again
    assert cache.settled("c0ffee", "fp", "organs") and not cache.settled("c0ffee", "fp", "")
    cache.put_error("c0ffee", "fp", "the expert's process died 2 times", "bone", transient=True)
    assert not cache.settled("c0ffee", "fp", "bone") and cache.get_error("c0ffee", "fp", "bone")[1].startswith("the expert's process died")
    cache.register([{"spec": {"a": 1}, "fingerprint": "x", "info": {}}])
    cache.register([{"spec": {"a": 1}, "fingerprint": "x", "info": {"n": 2}}, {"spec": {"a": 2}, "fingerprint": "y", "info": {}}])
    assert [e["fingerprint"] for e in cache.experts()] == ["x", "y"] and cache.experts()[0]["info"] == {"n": 2}


def test_progress_redraws_on_a_terminal_and_prints_lines_elsewhere():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, log = Tty(), io.StringIO()
    for stream in (tty, log):
        p = BuildProgress(3, stream=stream, every=0)
        for _ in range(3):
            p.update(rows=2, runs=1)
        p.close()
    assert tty.getvalue().count("\r") == 3 and "3/3 items (100%), 6 rows, 3 expert runs" in tty.getvalue()
    assert log.getvalue().count("\n") == 3 and "\r" not in log.getvalue()
    lines = log.getvalue().splitlines()
    assert lines[0].endswith("eta ?") and lines[-1].endswith("eta 0:00")  # no estimate from the first item


def test_progress_keeps_its_clock_while_no_item_arrives_and_stops_when_closed():
    """On a node whose CPUs the expert hosts hold, the first rows reach the driver late in the
    build: the line is drawn on its clock meanwhile, and nothing is drawn after `close`, which
    a `with` block calls however it ends."""
    import time

    log = io.StringIO()
    with pytest.raises(RuntimeError), BuildProgress(5, stream=log, every=0.02) as p:
        _until(log.getvalue)
        raise RuntimeError("the pipeline failed")
    drawn = log.getvalue()
    assert drawn.startswith("build: 0/5 items (0%), 0 rows") and drawn.endswith("eta ?\n")
    time.sleep(0.1)
    assert log.getvalue() == drawn and p._closed.is_set()
    p.close()  # again, as the build's end does: nothing more


@pytest.mark.slow
def test_a_build_with_nothing_to_do_still_accounts_for_every_file(tmp_path):
    """`--limit 0`: no item goes to Ray (none is started); the ledger says why each file is left."""
    archive = tmp_path / "archive"
    write_demo_archive(archive, cases=1, seed=0)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump(demo_manifest(archive, tmp_path / "out")))
    result = build(manifest, limit=0, progress=False)
    ledger = pq.read_table(tmp_path / "out" / "internal" / "ledger.parquet").to_pylist()
    files = result.card["counts"]["files"]
    assert files["discovered"] == len(ledger) == files["used"] + files["skipped"] + files["quarantined"]
    assert any(r["reason"] == "left out by --limit" for r in ledger)
    assert result.card["counts"]["rows"]["total"] == 0 and not result.shards
    assert json.loads((tmp_path / "out" / "dataset" / "dataset_card.json").read_text())["counts"] == result.card["counts"]


def prepared(tmp_path, *, counting: bool = False):
    from curation.build.pipeline import _prepare
    from curation.store.layout import Layout

    archive = tmp_path / "archive"
    write_demo_archive(archive, cases=1, seed=0)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump(demo_manifest(archive, tmp_path / "out", counting=counting)))
    spec = load_manifest(manifest)
    return spec, _prepare(spec, Layout(tmp_path / "out"), limit=None, infos=None)


@pytest.mark.slow
def test_an_item_whose_loading_killed_workers_of_this_build_is_set_aside(tmp_path):
    """Ray retries a load task whose process died; the retry finds the mark the dead process
    left and, after RUN_TRIES deaths, quarantines the item instead of loading it into the
    next crash. A mark left by an earlier build (killed as a whole) does not count."""
    from curation.build.stages import LOADING, RUN_TRIES, WorkItem, load_item

    spec, prep = prepared(tmp_path)
    plan = next(p for p in prep.plan.working if p.item.source == "ct")
    cache = prep.ctx.cache()
    content = content_hash(plan.item, Path(spec.source("ct").root))

    cache.mark_running(content, LOADING, "an earlier build", tries=RUN_TRIES)
    assert load_item(WorkItem(plan=plan), prep.ctx).volume is not None  # loaded as usual
    assert not cache.running_path(content, LOADING).exists()

    cache.mark_running(content, LOADING, prep.ctx.build_id, tries=RUN_TRIES - 1)  # one death so far: tried again
    assert load_item(WorkItem(plan=plan), prep.ctx).volume is not None
    cache.mark_running(content, LOADING, prep.ctx.build_id, tries=RUN_TRIES)  # as processes of this build that died loading it
    out = load_item(WorkItem(plan=plan), prep.ctx)
    assert out.volume is None and "killed the worker process" in out.report.errors["load"]
    expert, args = next(iter(plan.needs(spec).items()))
    assert "killed the worker process" in cache.get_error(content, prep.ctx.fingerprints[expert], args[0])[1]
    assert not cache.running_path(content, LOADING).exists()


@pytest.mark.slow
def test_an_item_whose_rendering_killed_workers_of_this_build_is_set_aside(tmp_path):
    from curation.build.stages import RENDERING, RUN_TRIES, WorkItem, render_batch, table_from_bytes, work_items, work_table

    _, prep = prepared(tmp_path)
    plan = next(p for p in prep.plan.working if p.item.source == "cxr")
    prep.ctx.cache().mark_running(plan.item.item_id, RENDERING, prep.ctx.build_id, tries=RUN_TRIES)  # as workers that died rendering it
    result = render_batch(work_table([WorkItem(plan=plan)]), prep.ctx)
    outcomes = work_items(result)[0].report.outcomes
    assert len(outcomes) == len(plan.conversations) and all(o.status == "quarantined" and "rendering it killed" in o.reason for o in outcomes)
    assert table_from_bytes(result.column("rows")[0].as_py()).num_rows == 0
    assert not prep.ctx.cache().running_path(plan.item.item_id, RENDERING).exists()


@pytest.mark.slow
def test_an_expert_that_cannot_set_up_sets_its_items_aside_with_the_reason(tmp_path, monkeypatch):
    """A set-up that raises, or an actor that died SETUP_TRIES times setting up (Ray restarts
    it each time), leaves the stage broken: its items are set aside with the reason instead of
    the pool restarting forever."""
    from curation.build.stages import SETUP, SETUP_TRIES, ExpertStage, _setup_key, load_item, WorkItem

    _, prep = prepared(tmp_path)
    plan = next(p for p in prep.plan.working if p.item.source == "brain")
    cache = prep.ctx.cache()
    cache.mark_running(_setup_key("BRATS"), SETUP, prep.ctx.build_id, tries=SETUP_TRIES)
    stage = ExpertStage(prep.ctx, ("BRATS",), gpus=0.0, last=True)
    assert stage.experts[0].broken and "died 3 times while setting up" in stage.experts[0].broken
    work = stage.run_item(load_item(WorkItem(plan=plan), prep.ctx))
    assert "died 3 times while setting up" in work.report.errors["BRATS()"] and work.volume is None and not work.report.runs

    from expert_runners.labels import LabelsRunner

    monkeypatch.setattr(LabelsRunner, "setup", lambda self, device="cpu": (_ for _ in ()).throw(RuntimeError("no such device")))
    stage = ExpertStage(prep.ctx, ("BRATS",), gpus=0.0, last=True)
    assert stage.experts[0].broken == "setting up the expert failed: RuntimeError: no such device"


def _until(check, seconds: float = 10.0) -> bool:
    """Whether `check()` holds within `seconds`: for what a thread does in its own time (the
    progress line's clock, the timer that writes a worker's count)."""
    import time

    deadline = time.monotonic() + seconds
    while not check() and time.monotonic() < deadline:
        time.sleep(0.02)
    return bool(check())


def test_progress_counts_items_through_their_experts_from_each_workers_file(tmp_path, monkeypatch):
    """Items through their experts reach the line from the workers' own files before any item
    is rendered, and while they are ahead of the rendered items the estimate follows their pace;
    each lane's sum is capped at its items (a batch Ray retries counts again) and never goes
    back, what is not a finished count (a temporary name, a torn or foreign file) is skipped,
    and a folder that cannot be read keeps the last counts."""
    from curation.build import progress
    from curation.build.progress import LaneCount, PassedCount, through_experts

    monkeypatch.setattr(progress, "WRITE_EVERY", 0.0)
    folder = tmp_path / "progress"
    folder.mkdir()
    host = PassedCount.of_process(str(folder))
    assert PassedCount.of_process(str(folder)) is host and host.path.parent == folder
    task = PassedCount(folder)
    task.path = folder / "another-node-123.json"  # as another process would name it
    host.add(0, 3, 3.0)
    host.add(0, 2, 2.0)
    task.add(0, 4, 4.0)
    (folder / ".x.json.tmp").write_text('{"lanes": {"0": {"items": 100, "seconds": 1}}}')
    (folder / "torn.json").write_text('{"lan')
    (folder / "foreign.json").write_text('{"items": 7}')
    assert _until(lambda: through_experts(folder) == {0: LaneCount(9, 9.0)}) and through_experts(tmp_path / "none yet") == {}

    log = io.StringIO()
    p = BuildProgress(20, stream=log, every=0)
    p.watch({0: 10}, lambda: through_experts(folder))
    p.refresh()
    p._first = (p._first[0] - 9.0, 0.0)  # 9 of 10 through their experts, 1 s each, in 9 s: one more second
    assert "0/20 items (0%), 9/10 through experts, 0 rows" in p.line() and p.line().endswith("eta 0:01")
    p.done = 4  # 4 of 20 items in 9 s would leave 0:36: the experts, ahead, set the pace
    assert p.line().endswith("eta 0:01")
    task.add(0, 5, 5.0)  # a retried batch: 14 of 10
    assert _until(lambda: through_experts(folder)[0].items == 14)
    p.refresh()
    assert "10/10 through experts" in p.line()

    q = BuildProgress(20, stream=log, every=0)
    readings = iter([{0: LaneCount(5, 5.0)}, OSError("stale file handle"), {0: LaneCount(3, 3.0)}])
    q.watch({0: 10}, lambda: (lambda r: (_ for _ in ()).throw(r) if isinstance(r, Exception) else r)(next(readings)))
    q.started -= 9.0
    for _ in range(3):
        q.refresh()
        assert "5/10 through experts" in q.line()  # the failed read and the lower one keep 5
    q.done = 8  # a count left behind by the rendered items (a write that failed): their pace again
    assert q.line().endswith("eta 0:13")
    p.close()
    q.close()


def test_the_estimate_weighs_each_lanes_items_left_by_what_its_items_cost():
    """A mixed archive's lanes pass their experts at very different paces: the items left are
    weighed by what their lane's passed items cost, at the expert seconds done per second since
    they were first counted (before, the actors were starting). A lane with items left that has
    passed none is left out, and the estimate says it is at least that; with nothing but cached
    results passed there is nothing to go by."""
    from curation.build.progress import LaneCount

    lanes = {0: 100, 1: 10}  # X-rays; CT series
    readings = iter([{0: LaneCount(10, 1.0)}, {0: LaneCount(50, 5.0)},
                     {0: LaneCount(60, 6.0), 1: LaneCount(1, 10.0)}, {0: LaneCount(100, 10.0), 1: LaneCount(2, 20.0)}])
    p = BuildProgress(110, stream=io.StringIO(), every=0)
    p.watch(lanes, lambda: next(readings))
    p.refresh()  # the first count: 1 expert-s so far, at some moment after the actors started
    first = p._first[0]
    p.refresh()
    # 4 expert-s more in 4 s; no CT series through yet: at least the 50 X-rays left, at 0.1 s each
    assert "50/110 through experts" in p.line(first + 4.0) and p.line(first + 4.0).endswith("eta >0:05")
    p.refresh()
    # 15 expert-s more in 15 s: 40 X-rays at 0.1 s and 9 CT series at 10 s, 94 expert-s left at 1 a second
    assert "61/110 through experts" in p.line(first + 15.0) and p.line(first + 15.0).endswith("eta 1:34")
    p.refresh()
    # 29 expert-s more in 29.5 s: 8 CT series at 10 s each, 80 expert-s left; counted by items, 102 of 110 would leave 0:02
    assert "102/110 through experts" in p.line(first + 29.5) and p.line(first + 29.5).endswith("eta 1:21")
    cached = BuildProgress(110, stream=io.StringIO(), every=0)
    cached.watch(lanes, lambda: {0: LaneCount(60, 0.0), 1: LaneCount(5, 0.0)})  # every result found in the cache
    cached.refresh()
    assert cached.line().endswith("eta ?")
    p.close()
    cached.close()


def test_a_workers_count_is_written_by_a_timer_at_most_once_a_second_and_never_fails_a_batch(tmp_path, monkeypatch, caplog):
    """A batch only counts; a timer writes the first count at once and the next within
    WRITE_EVERY, even if no batch follows. A folder that cannot be written is said once and
    tried again; once the driver has removed it (the build is over) nothing is written or
    said; a process that cannot start a thread still counts."""
    import threading

    from curation.build import progress
    from curation.build.progress import LaneCount, PassedCount, through_experts

    monkeypatch.setattr(progress, "WRITE_EVERY", 0.3)
    folder = tmp_path / "progress"
    folder.mkdir()
    writes = []
    replace = os.replace
    monkeypatch.setattr(progress.os, "replace", lambda a, b: (writes.append(b), replace(a, b)))
    count = PassedCount(folder)
    for _ in range(3):
        count.add(0, 1, 0.5)
    assert _until(lambda: through_experts(folder) == {0: LaneCount(3, 1.5)}) and 1 <= len(writes) <= 2

    (tmp_path / "a file").write_text("")
    broken = PassedCount(tmp_path / "a file" / "progress")
    with caplog.at_level("WARNING"):
        broken.add(0, 1, 0.5)
        assert _until(lambda: broken.warned)
        broken.add(0, 1, 0.5)
        assert _until(lambda: not broken._pending, 5)
    assert broken.lanes == {0: LaneCount(2, 1.0)} and not broken.stopped and len(caplog.records) == 1

    shutil.rmtree(folder)
    caplog.clear()
    late = PassedCount(folder)
    late.add(0, 1, 0.5)
    assert _until(lambda: late.stopped) and not folder.exists() and not caplog.records

    folder.mkdir()
    starved = PassedCount(folder)
    monkeypatch.setattr(threading.Timer, "start", lambda self: (_ for _ in ()).throw(RuntimeError("can't start new thread")))
    starved.add(0, 2, 1.0)  # no error reaches the batch
    monkeypatch.undo()
    monkeypatch.setattr(progress, "WRITE_EVERY", 0.3)
    starved.add(1, 1, 0.5)
    assert _until(lambda: through_experts(folder) == {0: LaneCount(2, 1.0), 1: LaneCount(1, 0.5)})


def test_only_a_lanes_last_expert_stage_counts_the_items_it_passes(tmp_path):
    """An item is past its experts once, after the lane's last expert stage: a stage that hands
    the voxels on to another counts nothing, and a stage without a progress folder writes none."""
    from dataclasses import replace

    from curation.build.progress import through_experts
    from curation.build.stages import ExpertStage, WorkItem, load_item, work_table

    _, prep = prepared(tmp_path)
    folder = tmp_path / "progress"
    folder.mkdir()
    ctx = replace(prep.ctx, progress_dir=str(folder))
    plans = [p for p in prep.plan.iter_working() if p.item.source == "ct"]

    def batch(ctx=ctx):
        return work_table([load_item(WorkItem(plan=p), ctx) for p in plans])

    ExpertStage(ctx, ("CT_TISSUE",), gpus=0.0, last=False)(batch())
    ExpertStage(prep.ctx, ("CT_TISSUE",), gpus=0.0, last=True)(batch())
    assert through_experts(folder) == {}
    fresh = replace(ctx, cache_root=str(tmp_path / "another cache"))  # the runs above are cached: these run again
    out = ExpertStage(fresh, ("CT_TISSUE",), gpus=0.0, last=True)(batch(fresh))
    lane = {p.lane for p in plans}.pop()
    # counted under the items' lane, with the seconds each item's experts took
    assert _until(lambda: lane in through_experts(folder)) and out.num_rows == len(plans) > 0
    assert through_experts(folder)[lane].items == len(plans) and through_experts(folder)[lane].seconds > 0


@pytest.mark.slow
def test_each_lanes_items_go_to_ray_as_blocks_read_from_a_file_once_each(tmp_path):
    """The driver writes each lane's working items as row groups of one file (one block per
    load task) instead of holding every block of the archive."""
    from curation.build.cluster import BLOCK_ITEMS, write_lane_inputs
    from curation.build.stages import read_blocks, voxel_bytes, work_items

    _, prep = prepared(tmp_path)
    inputs = write_lane_inputs(prep.plan, tmp_path / "plan", limit=float("inf"))
    order = [p.item.item_id for p in prep.plan.iter_working()]
    seen = []
    for lane, given in inputs.items():
        ids, sizes = [], []
        for k in range(given.blocks):
            block = work_items(read_blocks(pa.table({"block": [k]}), str(given.path)))
            assert 0 < len(block) <= BLOCK_ITEMS and all(w.plan.lane == lane for w in block)
            ids += [w.plan.item.item_id for w in block]
            sizes.append(sum(voxel_bytes(w.plan.item) for w in block))
        assert ids == [i for i in order if i in set(ids)]  # in build order
        assert given.largest > 0 and given.block_bytes == max(sizes)  # what sizes the object-store budget
        seen += ids
    assert sorted(seen) == sorted(order)


def run_experts_here(prep) -> int:
    """Every expert result the plan needs, made in this process by the build's own stages (the
    weight-free runners of `demo_manifest`) and cached; returns how many there are."""
    from curation.build.stages import ExpertStage, WorkItem, load_item

    host = ExpertStage(prep.ctx, tuple(e.name for e in prep.spec.experts), gpus=0.0, last=True)
    needed = 0
    for plan in prep.plan.iter_working():
        host.run_item(load_item(WorkItem(plan=plan), prep.ctx))
        needed += sum(len(args) for args in plan.needs(prep.spec).values())
    return needed


def test_a_build_whose_findings_are_all_cached_looks_each_result_up_once(tmp_path, monkeypatch):
    """The render path after the cache check: each result is looked up once (by the check,
    whose hits the accounts keep), not again before rendering."""
    from collections import Counter

    from curation.build import pipeline

    _, prep = prepared(tmp_path)
    needed = run_experts_here(prep)
    looked: Counter[tuple[str, str, str]] = Counter()
    has = FindingsCache.has

    def counted(self, content, fingerprint, args=""):
        looked[(content, fingerprint, args)] += 1
        return has(self, content, fingerprint, args)

    monkeypatch.setattr(FindingsCache, "has", counted)
    monkeypatch.setattr(pipeline, "_on_ray", lambda *a, **k: pytest.fail("Ray was used"))
    result = build(tmp_path / "m.yaml", progress=False)
    assert len(looked) == needed and set(looked.values()) == {1}
    assert sum(e["cached"] for e in result.card["experts"].values()) == needed and result.card["counts"]["rows"]["total"] > 0


def test_each_expert_result_of_an_item_is_read_and_serialised_once_for_all_its_conversations(render_demo, tmp_path, monkeypatch):
    """`render_item` over an item whose conversations share expert results in any order (the
    variants of a task cycle through its arguments; several tasks use one result): each result
    is read from the cache once, the renderer derives its views and data once, and the rows'
    `findings` are serialised from that data, not from a second `to_dict`."""
    from collections import Counter

    from curation.build.plan import ItemPlan, PlannedConversation
    from curation.build.stages import BuildContext, render_item
    from curation.findings import Findings
    from curation.render import renderer as renderer_module
    from curation.store.report import ItemReport

    demo = render_demo
    cache = FindingsCache(tmp_path / "cache")
    ctx = BuildContext(spec=demo.spec, cache_root=str(cache.root), fingerprints={e.name: f"fp-{e.name}" for e in demo.spec.experts},
                       manifest_hash="m", code_version="c", experts=demo.experts)
    item, content = demo.items_of("ct")[0], "0123456789abcdef" * 2
    for (item_id, expert, args), f in demo.findings.items():
        if item_id == item.item_id:
            cache.put(content, ctx.fingerprints[expert], f, args)
    plan = ItemPlan(item=item, split="train", lane=0)
    for t, task in enumerate(demo.spec.tasks):
        if task.source == "ct":
            for v in range(2 * len(task.args)):
                plan.conversations.append(PlannedConversation(task=t, variant=v, arg=task.args[v % len(task.args)], shard=0,
                                                              pos=len(plan.conversations)))
    results = {(demo.spec.tasks[c.task].expert, c.arg) for c in plan.conversations}
    assert len(plan.conversations) >= 3 * len(results)  # results shared, and not in runs: the case of the fault

    reads, calls = Counter(), Counter()
    get, to_dict, view = FindingsCache.get, Findings.to_dict, renderer_module.findings_view
    monkeypatch.setattr(FindingsCache, "get", lambda self, c, fp, args="": reads.update([(fp, args)]) or get(self, c, fp, args))
    monkeypatch.setattr(Findings, "to_dict", lambda self, **kw: calls.update(["to_dict"]) or to_dict(self, **kw))
    monkeypatch.setattr(renderer_module, "findings_view", lambda f: calls.update(["view"]) or view(f))
    report = ItemReport()
    rows = render_item(plan, content, ctx, report).to_pylist()
    assert len(reads) == len(results) and set(reads.values()) == {1}
    assert calls == {"to_dict": len(results), "view": len(results)}
    monkeypatch.undo()
    assert len(rows) == sum(o.status == "used" for o in report.outcomes) >= len(plan.conversations) // 2
    for row in rows:  # the bytes a row held before: the findings its template saw, less the run timings
        f = cache.get(content, row["provenance"]["expert_fingerprint"], json.loads(row["meta"])["args"])
        assert row["findings"] == json.dumps({k: v for k, v in f.to_dict().items() if k != "timing"}, sort_keys=True)


def test_the_nodes_look_for_each_sources_first_file_its_labels_the_bundles_prompts_and_what_the_driver_just_made(tmp_path):
    """What `curation.build.shared` asks every other node of a cluster to see and to write in:
    files, not just folders (a node's own empty folder of the same name must not pass), and
    under `--out` and an outside cache something the driver made for this build."""
    from dataclasses import replace

    from curation.build.shared import NodeCheck, lacking, node_needs, read_paths
    from curation.items import StudyItem

    spec = BuildSpec.model_validate({
        "name": "p", "prompts": [str(tmp_path / "p")],
        "sources": [{"name": "ct", "kind": "dicom", "root": str(tmp_path / "ct"), "labels": str(tmp_path / "seg")},
                    {"name": "x", "kind": "image2d", "root": str(tmp_path / "x"), "labels": str(tmp_path / "x.csv")}],
        "experts": [{"name": "V", "runner": "vista3d", "bundle": str(tmp_path / "b")}, {"name": "C", "runner": "labels"}],
        "tasks": [{"template": "t0.j2", "source": "ct", "expert": "V"}, {"template": "t1.j2", "source": "x", "expert": "C"}],
    })
    ct = StudyItem(item_id="s1", patient_key="p", study_key="s", source="ct", kind="dicom", modality="CT", shape=[2, 2, 8],
                   spacing=[1.0, 1.0, 1.0], n_files=8, uris=["P1/1/IM2.dcm", "P1/1/IM1.dcm"])
    plan = replace(plan_for(spec, {"V"}), source=[ct, replace(ct, item_id="s2", uris=["P2/1/IM1.dcm"])])
    paths = read_paths(plan)
    assert paths == {"sources[0].root (ct)": f"{tmp_path}/ct/P1/1/IM2.dcm", "sources[0].labels": f"{tmp_path}/seg",
                     "sources[1].root (x)": f"{tmp_path}/x",  # nothing indexed: the root
                     "sources[1].labels": f"{tmp_path}/x.csv", "experts[0].bundle (V)": f"{tmp_path}/b", "prompts[0]": f"{tmp_path}/p"}
    (tmp_path / "x").mkdir()
    (tmp_path / "x.csv").write_text("image\n")
    assert lacking(paths, {}) == [f"sources[0].root (ct): not found: {tmp_path}/ct/P1/1/IM2.dcm", f"sources[0].labels: not found: {tmp_path}/seg",
                                  f"experts[0].bundle (V): not found: {tmp_path}/b", f"prompts[0]: not found: {tmp_path}/p"]

    out, folder = tmp_path / "out", tmp_path / "out" / "internal" / "plan" / "progress-b1"
    folder.mkdir(parents=True)
    see, write, mark = node_needs(plan, folder, out / "internal" / "cache", out, "b1")  # the cache under --out: the folder says it
    assert see == {**paths, "output.dir (this build's folder under it)": str(folder)} and mark is None
    assert write == {"output.dir (this build's folder under it)": str(folder), "output.cache": str(out / "internal" / "cache")}
    see, write, mark = node_needs(plan, folder, tmp_path / "cache", out, "b1")  # an outside cache, not made yet
    assert mark == Path(see["output.cache (a mark the driver wrote in it)"]) and mark.parent == tmp_path / "cache"
    check = NodeCheck(see, write, mark)
    check.write_mark()  # before the first node is asked; it stays for the nodes that join later
    assert mark.exists() and lacking({"mark": str(mark)}, write) == []  # both folders take a file
    check.close()
    assert not mark.exists() and not list((tmp_path / "cache").iterdir())  # the mark, and the write check's file, gone


def test_a_folder_a_node_cannot_write_in_is_named_with_the_reason():
    from curation.build.shared import lacking

    if os.access("/sys", os.W_OK) and not Path("/sys").is_mount():
        pytest.skip("/sys is writable here: this case needs a folder that refuses writes")
    # a folder that is not there is for `see` to name, not `write`
    assert lacking({}, {"output.cache": "/sys", "output.dir": "/nowhere/at/all"}) == ["output.cache: cannot write in /sys (Permission denied)"]
