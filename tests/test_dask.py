"""Scale-out on prefect-dask: the pipeline on a real local Dask cluster of 2 worker processes writes
exactly the shards the single-process run writes, its submitted tasks run in the workers, and
GPU-annotated tasks run only on workers that declare the resource (and wait, unscheduled, where none
does)."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pytest
from prefect import flow, task

from flows import engine
from porcelain.config import RuntimeConfig, config_from_dict
from porcelain.hashing import code_version
from porcelain.storage import Store
from tests.flowkit import tiny_config


def _without_code_version(manifest: bytes) -> dict[str, Any]:
    doc = json.loads(manifest)
    doc["provenance"].pop("code_version")
    return doc


def _generated(store: Store) -> dict[str, bytes]:
    """Every shard manifest a run wrote, and every image they name."""
    files: dict[str, bytes] = {}
    for key in store.list("synthetic"):
        if "/shards/" in key:
            files[key] = store.read_bytes(key)
            for im in json.loads(files[key])["images"]:
                files[im["key"]] = store.read_bytes(im["key"])
    return files


def test_pipeline_on_two_dask_worker_processes_generates_what_one_process_does(prefect_harness, tmp_path):
    """The real pipeline flow with runtime.engine dask, on a LocalCluster of 2 worker processes (reached at
    its address, so that the test can watch the scheduler), against the same run on threads."""
    from distributed import Client, LocalCluster, get_task_stream

    from flows.pipeline import pipeline

    small = {"sweep": {"ratios": ["100:0", "95:5"], "seeds": [0]},
             "generator": {"preset": "tiny", "resolution": 32, "train_steps": 10, "batch_size": 16}}
    one = config_from_dict(tiny_config(str(tmp_path / "threads"), runtime={"workers": 1, "device": "cpu"}, **small))
    # provenance's code_version hashes porcelain's source, once per process: fresh worker processes can
    # only write the flow process's value if the source is still what this process read
    code_before = code_version.__wrapped__()
    a = pipeline(one.model_dump(mode="json"), return_state=True)
    assert a.is_completed(), a.message
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        two = config_from_dict(tiny_config(str(tmp_path / "dask"), runtime={
            "workers": 2, "device": "cpu", "engine": "dask", "dask_address": cluster.scheduler_address}, **small))
        with get_task_stream(client=client) as stream:  # the scheduler's record of every task and its worker
            b = pipeline(two.model_dump(mode="json"), return_state=True)
        worker_pids = client.run(os.getpid)
    assert b.is_completed(), b.message
    code_unchanged = code_version() == code_before == code_version.__wrapped__()

    # the same shards under the same keys, byte for byte the same images and manifests
    fa, fb = _generated(Store(one.storage.url)), _generated(Store(two.storage.url))
    manifests = {k for k in fa if k.startswith("synthetic/")}
    assert len(manifests) >= 2 and sorted(fa) == sorted(fb)
    assert all(fa[k] == fb[k] for k in fa if k not in manifests)
    if code_unchanged:
        assert all(fa[k] == fb[k] for k in manifests)
    else:  # porcelain/ was edited since this process read it (a shared checkout): all but code_version
        assert all(_without_code_version(fa[k]) == _without_code_version(fb[k]) for k in manifests)
    # the same classifier runs (content keys), and the same report sections
    assert sorted(Store(one.storage.url).list("runs")) == sorted(Store(two.storage.url).list("runs"))
    # the submitted stages ran in the 2 worker processes, none in the flow's process
    ran = {}
    for r in stream.data:
        ran.setdefault(r["key"].split("-")[0], set()).add(r["worker"])
    assert len(worker_pids) == 2 and os.getpid() not in worker_pids.values()
    assert {"generate", "pack_shard", "train_evaluate"} <= set(ran)
    assert set().union(*ran.values()) <= set(worker_pids)
    assert sum(1 for r in stream.data if r["key"].startswith("generate")) == len(manifests)


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
