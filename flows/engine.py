"""Where a flow's tasks run (``runtime.engine``): threads of the flow's process, or a Dask cluster.

Nothing here changes what a task computes or its cache key (``runtime_identity`` holds only the device
type and dtype), so a run on Dask and one on threads write the same objects under the same keys.

- :func:`task_runner_for` — the task runner a run config asks for: prefect's ``ThreadPoolTaskRunner``, or
  prefect-dask's ``DaskTaskRunner`` on the scheduler at ``runtime.dask_address`` or on a local cluster of
  ``runtime.dask_workers`` processes (one per GPU, pinned with ``CUDA_VISIBLE_DEVICES``, when the run uses
  GPUs).
- :func:`uses` — whether the flow run in progress already runs on the engine the config asks for (a
  deployment loads the flow with the runner of its decorator; the flow then re-enters itself on the right
  one as a subflow).
- :func:`annotate` — around the submission of a generation, filter or sweep task: on Dask with a GPU run,
  the task asks for the worker resource ``GPU=1``, so that one shard holds one GPU at a time. Workers must
  declare that resource (``--resources GPU=1``); a task asking for an undeclared resource waits forever.

See docs/SCALE_OUT.md.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from porcelain.config import RuntimeConfig
from porcelain.errors import ConfigError

MAX_WORKERS = 64  # threads engine: an upper bound; runtime.workers sets the real limit (flows/pipeline.py)
GPU_STAGES = frozenset({"generation", "filter", "sweep"})  # the stages whose tasks hold a GPU each
OTHER_STAGES = frozenset({"ingest", "pack", "plan", "prepare", "reference", "drift", "faithfulness", "top_up",
                          "report"})  # accepted by annotate, never annotated (a misspelt stage is an error)
GPU = "GPU"  # the Dask worker resource (declared by workers, asked for by annotated tasks)


def uses_gpu(runtime: RuntimeConfig) -> bool:
    """Whether the run's tasks compute on a GPU: device cuda, or auto where CUDA is available."""
    if runtime.device == "cuda":
        return True
    if runtime.device != "auto":
        return False
    import torch

    return torch.cuda.is_available()


def local_gpus_per_worker(runtime: RuntimeConfig) -> int:
    """GPUs each local worker process declares: ``runtime.gpus_per_worker``, or 1 for a GPU run."""
    if runtime.gpus_per_worker is not None:
        return runtime.gpus_per_worker
    return 1 if uses_gpu(runtime) else 0


def _worker_env() -> dict[str, str]:
    """Environment given to local worker processes: the Prefect API of the flow (also passed with each
    task's serialized settings; in the environment it covers whatever a worker does outside a task)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    return {"PREFECT_API_URL": url} if url else {}


def task_runner_for(runtime: RuntimeConfig) -> TaskRunner:
    """The task runner ``runtime.engine`` asks for. A Dask runner starts (or connects to) its cluster
    when the flow starts and, for a local cluster, shuts it down when the flow ends."""
    if runtime.engine == "threads":
        return ThreadPoolTaskRunner(max_workers=MAX_WORKERS)
    from prefect_dask import DaskTaskRunner

    if runtime.dask_address:
        return DaskTaskRunner(address=runtime.dask_address)
    kwargs: dict[str, Any] = {"n_workers": runtime.dask_workers, "threads_per_worker": runtime.dask_threads_per_worker,
                              "env": _worker_env()}
    gpus = local_gpus_per_worker(runtime)
    if gpus:
        # too few GPUs fail here, as a config error, rather than as workers that never start
        gpu_worker_specs(runtime.dask_workers, runtime.dask_threads_per_worker, gpus, {}, visible_gpus())
        return DaskTaskRunner(cluster_class="flows.engine.local_gpu_cluster",
                              cluster_kwargs={**kwargs, "gpus_per_worker": gpus})
    return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                          cluster_kwargs={**kwargs, "processes": True, "dashboard_address": None})


def _runner_of_current_flow() -> TaskRunner | None:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return ctx.task_runner if ctx is not None else None


def uses(runtime: RuntimeConfig, runner: TaskRunner | None = None) -> bool:
    """Whether ``runner`` (default: the task runner of the flow run in progress) is of the engine the run
    asks for. Any Dask runner counts for engine dask (a deployment may bring its own cluster)."""
    runner = runner if runner is not None else _runner_of_current_flow()
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:  # prefect-dask is a dependency; without it only threads can match
        return runtime.engine == "threads"
    on_dask = isinstance(runner, DaskTaskRunner)
    return on_dask if runtime.engine == "dask" else not on_dask


def annotate(runtime: RuntimeConfig, stage: str) -> contextlib.AbstractContextManager[Any]:
    """Wrap the ``.submit`` calls of a stage's tasks: on Dask, with a GPU run, generation, filter and
    sweep tasks ask for one ``GPU`` each; everything else runs unannotated."""
    if stage not in GPU_STAGES | OTHER_STAGES:
        raise ValueError(f"annotate: unknown stage {stage!r}; GPU stages are {', '.join(sorted(GPU_STAGES))}")
    if runtime.engine != "dask" or stage not in GPU_STAGES or not uses_gpu(runtime):
        return contextlib.nullcontext()
    import dask

    return dask.annotate(resources={GPU: 1})


def visible_gpus() -> list[str]:
    """The GPU ids this process may hand out: ``CUDA_VISIBLE_DEVICES`` when set, else every CUDA device."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [x.strip() for x in visible.split(",") if x.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def gpu_worker_specs(n_workers: int, threads_per_worker: int, gpus_per_worker: int, env: dict[str, str],
                     gpu_ids: list[str]) -> dict[str, dict[str, Any]]:
    """SpecCluster worker specs: worker i declares ``GPU=gpus_per_worker`` and sees only its own GPUs
    (``CUDA_VISIBLE_DEVICES``), so that every worker's ``cuda:0`` is a different device."""
    from distributed import Nanny

    need = n_workers * gpus_per_worker
    if need > len(gpu_ids):
        raise ConfigError(f"runtime.dask_workers {n_workers} × gpus_per_worker {gpus_per_worker} needs {need} GPUs, "
                          f"but this machine shows {len(gpu_ids)} ({','.join(gpu_ids) or 'none'}): lower "
                          "runtime.dask_workers")
    return {f"gpu-{i}": {"cls": Nanny, "options": {
        "nthreads": threads_per_worker, "resources": {GPU: gpus_per_worker},
        "env": {**env, "CUDA_VISIBLE_DEVICES": ",".join(gpu_ids[i * gpus_per_worker:(i + 1) * gpus_per_worker])}}}
        for i in range(n_workers)}


def local_gpu_cluster(n_workers: int, threads_per_worker: int, gpus_per_worker: int,
                      env: dict[str, str] | None = None, **kwargs: Any) -> Any:
    """A local Dask cluster of one worker process per ``gpus_per_worker`` GPUs (no dask-cuda needed)."""
    from distributed import Scheduler, SpecCluster

    workers = gpu_worker_specs(n_workers, threads_per_worker, gpus_per_worker, env or {}, visible_gpus())
    return SpecCluster(workers=workers, scheduler={"cls": Scheduler, "options": {"dashboard_address": None}},
                       name="porcelain-gpu", **kwargs)
