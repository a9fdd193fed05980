"""Apply the run's runtime settings (torch threads) at the start of each stage."""

from __future__ import annotations

import os

import torch

from porcelain.config import RuntimeConfig


def available_cores() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def stage_threads(runtime: RuntimeConfig, *, concurrent: int = 1) -> int:
    """Torch threads for one task when ``concurrent`` tasks of a stage run at once.

    The thread budget (``runtime.threads``, default all cores) is shared: two small CPU trainings
    side by side, one thread each, finish ~1.6× sooner than one after the other with two threads
    each (measured on 2 cores: 8.5 s → 5.4 s for two runs), because small models barely scale
    across intra-op threads (benchmarks/classifier_speed.py: 310 vs 319 img/s for 1 vs 2 threads).
    """
    total = runtime.threads or available_cores()
    return max(1, total // max(1, min(concurrent, runtime.workers)))


def apply_runtime(runtime: RuntimeConfig, *, concurrent: int = 1) -> int:
    """Set torch's intra-op threads for a stage whose tasks run ``concurrent`` at a time; return it.

    Stages do not overlap in the flow, so the process-wide setting is the same for every task that
    runs at one time.
    """
    n = stage_threads(runtime, concurrent=concurrent)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def runtime_identity(runtime: RuntimeConfig) -> dict[str, str]:
    """What of the runtime changes results: the device type and the numeric precision actually used
    (a CPU-fp32 and a CUDA-bf16 training must not share a cache key). Threads, workers and retries
    change how fast, not what."""
    from porcelain.device import choose_device, choose_dtype

    dev = choose_device(runtime.device)
    return {"device": dev.type, "dtype": str(choose_dtype(runtime.dtype, dev)).removeprefix("torch.")}
