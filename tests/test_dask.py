"""Scale-out on prefect-dask: the generation stage on a real local Dask cluster of 2 worker processes
writes exactly what the single-process run writes, the tasks run in the workers, and GPU-annotated
tasks run only on workers that declare the resource (and wait, unscheduled, where none does)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

import pytest
from prefect import flow, task
from prefect.context import FlowRunContext

from flows import engine
from porcelain.config import RuntimeConfig, config_from_dict
from porcelain.data.source import BUILTIN
from porcelain.hashing import code_version
from porcelain.storage import Store
from tasks import stages
from tasks.policy import result_storage_for
from tests.flowkit import tiny_config


def _submit(task_: Any, calls: list[tuple], workers: int) -> list[Any]:
    # as flows/pipeline.py: at most `workers` runs in flight
    futures: list[Any] = []
    for args in calls:
        if len(futures) >= workers:
            futures[len(futures) - workers].wait()
        futures.append(task_.submit(*args))
    return futures


@flow(name="porcelain-generation-stage", persist_result=False)
def generation_stage(config: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's stages up to generation, with the generation stage wired as flows/pipeline.py wires
    it (``_submit`` bounded by runtime.workers, under ``engine.annotate``). On engine dask the flow
    re-enters itself on the Dask task runner, as a deployment loaded from its entrypoint would. The stages
    before generation are called in the flow's process (pack too, to keep the test short)."""
    cfg = config_from_dict(config)
    st, rt = cfg.storage, cfg.runtime
    if not engine.uses(rt):
        return generation_stage.with_options(task_runner=engine.task_runner_for(rt))(config)
    results_at = result_storage_for(st)
    t = {name: getattr(stages, name).with_options(retries=0, result_storage=results_at)
         for name in ("builtin_data", "ingest", "pack_shard", "plan", "prepare", "generate")}
    assert cfg.data.manifest in BUILTIN
    src = t["builtin_data"](cfg.data, st)
    data = t["ingest"](src["manifest"], src["root"], cfg.data, st)
    for size in sorted({cfg.classifier.image_size, *(n for s in cfg.synthesizers for n in s.image_sizes())}):
        for i in range(data["n_shards"]):
            t["pack_shard"](data["data_hash"], i, data["n_shards"], size, st)
    plan = t["plan"](data, cfg.sweep, cfg.generation, cfg.synthesizers, st)
    (syn,) = cfg.synthesizers
    model = t["prepare"](data, syn, None, st, rt)
    runner = FlowRunContext.get().task_runner
    on_dask = rt.engine == "dask"
    if on_dask:  # the scheduler's record of which worker ran which task
        from distributed import get_task_stream

        stream: Any = get_task_stream(client=runner.client)
    else:
        stream = contextlib.nullcontext()
    with stream as ts, engine.annotate(rt, "generation"):
        futures = _submit(t["generate"], [(model, spec, syn, st, rt) for spec in plan["shards"][syn.label]], rt.workers)
        shards = [f.result() for f in futures]
    out: dict[str, Any] = {"shards": shards, "flow_pid": os.getpid(), "runner": type(runner).__name__}
    if on_dask:
        out["worker_pids"] = runner.client.run(os.getpid)  # address -> pid of each worker process
        out["ran_on"] = [r["worker"] for r in ts.data if r["key"].startswith("generate")]
        out["worker_resources"] = {a: w.get("resources", {}) for a, w in
                                   runner.client.scheduler_info()["workers"].items()}
    return out


def _shard_files(store: Store, shards: list[Any]) -> dict[str, bytes]:
    """Every stored file a run's shards consist of: the manifests and the images they name."""
    files: dict[str, bytes] = {}
    for s in shards:
        files[s.key] = store.read_bytes(s.key)
        for im in store.read_json(s.key)["images"]:
            files[im["key"]] = store.read_bytes(im["key"])
    return files


def _without_code_version(manifest: bytes) -> dict[str, Any]:
    doc = json.loads(manifest)
    doc["provenance"].pop("code_version")
    return doc


def test_generation_on_two_dask_worker_processes_matches_one_process(prefect_harness, tmp_path):
    small = {"sweep": {"ratios": ["100:0", "95:5"], "seeds": [0]},
             "generator": {"preset": "tiny", "resolution": 32, "train_steps": 10, "batch_size": 16}}
    one = tiny_config(str(tmp_path / "threads"), runtime={"workers": 1, "device": "cpu"}, **small)
    two = tiny_config(str(tmp_path / "dask"), runtime={"workers": 2, "device": "cpu", "engine": "dask",
                                                       "dask_workers": 2, "dask_threads_per_worker": 1}, **small)
    # provenance's code_version hashes porcelain's source, once per process: it can only match between
    # the flow's process and fresh worker processes if the source is the one the flow's process read
    code_before = code_version.__wrapped__()
    a = generation_stage(config_from_dict(one).model_dump(mode="json"))
    b = generation_stage(config_from_dict(two).model_dump(mode="json"))
    code_unchanged = code_version() == code_before == code_version.__wrapped__()

    assert a["runner"] == "ThreadPoolTaskRunner" and b["runner"] == "DaskTaskRunner"
    assert len(a["shards"]) >= 2
    # the same shards under the same keys, and byte for byte the same images and manifests
    assert [s.key for s in a["shards"]] == [s.key for s in b["shards"]]
    fa = _shard_files(Store(one["storage"]["url"]), a["shards"])
    fb = _shard_files(Store(two["storage"]["url"]), b["shards"])
    assert sorted(fa) == sorted(fb)
    manifests = {s.key for s in a["shards"]}
    assert all(fa[k] == fb[k] for k in fa if k not in manifests)
    if code_unchanged:
        assert all(fa[k] == fb[k] for k in manifests)
    else:  # porcelain/ was edited since this process read it (a shared checkout): all but code_version
        assert all(_without_code_version(fa[k]) == _without_code_version(fb[k]) for k in manifests)
    # every generation task ran in a worker process of the 2-process cluster, not in the flow's process
    pids = b["worker_pids"]
    assert len(pids) == 2 and b["flow_pid"] not in pids.values() and len(set(pids.values())) == 2
    assert len(b["ran_on"]) == len(b["shards"]) and set(b["ran_on"]) <= set(pids)
    assert all(not r for r in b["worker_resources"].values())  # a CPU run declares no GPUs


@task(name="gpu-probe")
def gpu_probe(i: int) -> dict[str, Any]:
    return {"i": i, "pid": os.getpid(), "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES")}


@flow(name="porcelain-gpu-annotation", persist_result=False)
def gpu_annotation(runtime: RuntimeConfig) -> list[dict[str, Any]]:
    with engine.annotate(runtime, "generation"):
        futures = [gpu_probe.submit(i) for i in range(4)]
    return [f.result() for f in futures]


def test_gpu_annotated_tasks_run_one_per_declared_gpu_each_worker_pinned_to_its_own(prefect_harness, monkeypatch):
    # Two "GPUs" on a CPU machine: CUDA_VISIBLE_DEVICES is all the workers are given, nothing touches CUDA.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    rt = RuntimeConfig(device="cuda", engine="dask", dask_workers=2)  # gpus_per_worker null: 1 for a GPU run
    monkeypatch.setattr(engine, "uses_gpu", lambda runtime: True)
    assert engine.local_gpus_per_worker(rt) == 1
    runner = engine.task_runner_for(rt)
    out = gpu_annotation.with_options(task_runner=runner)(rt)
    assert sorted(r["i"] for r in out) == [0, 1, 2, 3]
    # each worker process sees only its own GPU
    by_pid = {}
    for r in out:
        by_pid.setdefault(r["pid"], set()).add(r["cuda_visible"])
    assert all(len(v) == 1 for v in by_pid.values()) and set().union(*by_pid.values()) <= {"0", "1"}
    assert os.getpid() not in by_pid


def test_annotated_task_without_a_worker_declaring_the_resource_is_never_scheduled():
    """What a GPU run on workers started without ``--resources GPU=1`` does: its tasks wait forever.
    The scheduler says so (state ``no-worker``), so this asks the scheduler instead of waiting."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        with engine.annotate(RuntimeConfig(device="cuda", engine="dask", gpus_per_worker=1), "sweep"):
            fut = client.submit(sum, [1, 2], key="needs-a-gpu")
        plain = client.submit(sum, [3, 4], key="runs-anywhere")
        assert plain.result() == 7
        states: dict[str, str] = {}
        for _ in range(200):  # until the scheduler has decided where the task goes (it has: nowhere)
            states = client.run_on_scheduler(lambda dask_scheduler: {
                k: ts.state for k, ts in dask_scheduler.tasks.items()})
            if states.get("needs-a-gpu") not in (None, "released", "waiting"):
                break
            time.sleep(0.05)
        assert states["needs-a-gpu"] == "no-worker"
        assert not fut.done()
        fut.cancel()


def test_annotation_only_for_gpu_stages_of_a_gpu_run_on_dask():
    import dask

    gpu_dask = RuntimeConfig(device="cuda", engine="dask", dask_address="tcp://127.0.0.1:8786")
    for stage in ("generation", "filter", "sweep"):
        with engine.annotate(gpu_dask, stage):
            assert dask.get_annotations() == {"resources": {"GPU": 1}}
    for rt, stage in ((gpu_dask, "reference"), (RuntimeConfig(device="cuda"), "generation"),
                      (RuntimeConfig(device="cpu", engine="dask"), "generation")):
        with engine.annotate(rt, stage):
            assert dask.get_annotations() == {}
    with pytest.raises(ValueError, match="unknown stage 'generate'"):
        engine.annotate(gpu_dask, "generate")


def test_task_runner_for_each_engine():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    threads = engine.task_runner_for(RuntimeConfig())
    assert isinstance(threads, ThreadPoolTaskRunner) and engine.uses(RuntimeConfig(), threads)
    remote = engine.task_runner_for(RuntimeConfig(engine="dask", dask_address="tcp://10.0.0.5:8786"))
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://10.0.0.5:8786"
    local = engine.task_runner_for(RuntimeConfig(engine="dask", device="cpu", dask_workers=3,
                                                 dask_threads_per_worker=2))
    assert local.cluster_class == "distributed.LocalCluster"
    assert {k: local.cluster_kwargs[k] for k in ("n_workers", "threads_per_worker", "processes")} == \
        {"n_workers": 3, "threads_per_worker": 2, "processes": True}
    assert "resources" not in local.cluster_kwargs
    dask_rt = RuntimeConfig(engine="dask")
    assert engine.uses(dask_rt, local) and not engine.uses(dask_rt, threads) and not engine.uses(RuntimeConfig(), local)


def test_gpu_workers_are_pinned_to_distinct_devices_and_too_few_gpus_is_a_clear_error():
    from porcelain.errors import ConfigError

    specs = engine.gpu_worker_specs(2, 1, 2, {"PREFECT_API_URL": "http://x/api"}, ["0", "1", "2", "3"])
    assert [s["options"]["env"]["CUDA_VISIBLE_DEVICES"] for s in specs.values()] == ["0,1", "2,3"]
    assert all(s["options"]["resources"] == {"GPU": 2} and s["options"]["env"]["PREFECT_API_URL"] == "http://x/api"
               for s in specs.values())
    with pytest.raises(ConfigError, match=r"dask_workers 2 × gpus_per_worker 1 needs 2 GPUs.*shows 1"):
        engine.gpu_worker_specs(2, 1, 1, {}, ["0"])
