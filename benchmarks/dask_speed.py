"""The generation stage on a 2-worker local Dask cluster against one process (prints a markdown table).

One small config (the flow tests' tiny sample: tiny closed-set generator, 32 px, 4 sampling steps,
8 images a shard), CPU, one torch thread per task. Each engine runs the stages before generation in
the flow's process, then generates every planned shard, twice, into two fresh stores (so that nothing
is a cache hit): pass 1 includes what a cold engine pays (Dask: worker processes importing torch and
porcelain at their first task), pass 2 is the steady state. Rows:

- threads, workers 1 — one shard at a time in the flow's process (the default engine and setting);
- threads, workers 2 — two shards side by side in the flow's process (runtime.workers 2);
- dask, 2 processes — runtime.engine dask, a LocalCluster of 2 worker processes × 1 thread, workers 2.

The shards' keys are checked to be the same in every row. The cluster's start is timed apart.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/dask_speed.py [--ratio 80:20] [--steps 4]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_HOME", str(ROOT / ".prefect"))

from prefect import flow  # noqa: E402
from prefect.context import FlowRunContext  # noqa: E402

from flows import engine  # noqa: E402
from porcelain.config import config_from_dict  # noqa: E402
from tasks import stages  # noqa: E402
from tasks.policy import result_storage_for  # noqa: E402


def _submit(task_: Any, calls: list[tuple], workers: int) -> list[Any]:
    futures: list[Any] = []  # as flows/pipeline.py: at most `workers` in flight
    for args in calls:
        if len(futures) >= workers:
            futures[len(futures) - workers].wait()
        futures.append(task_.submit(*args))
    return futures


@flow(name="bench-generation-stage", persist_result=False)
def generation_passes(configs: list[dict[str, Any]], started: float) -> dict[str, Any]:
    """For each config (same run, another store): the stages before generation in this process, then
    the generation stage on the run's engine; seconds of each generation stage."""
    rt = config_from_dict(configs[0]).runtime
    if not engine.uses(rt):
        return generation_passes.with_options(task_runner=engine.task_runner_for(rt))(configs, started)
    runner = FlowRunContext.get().task_runner
    if rt.engine == "dask":
        runner.client.wait_for_workers(rt.dask_workers)
    out: dict[str, Any] = {"ready_s": time.perf_counter() - started, "passes": [], "keys": []}
    for config in configs:
        cfg = config_from_dict(config)
        st = cfg.storage
        t = {n: getattr(stages, n).with_options(retries=0, result_storage=result_storage_for(st))
             for n in ("builtin_data", "ingest", "pack_shard", "plan", "prepare", "generate")}
        src = t["builtin_data"](cfg.data, st)
        data = t["ingest"](src["manifest"], src["root"], cfg.data, st)
        for size in sorted({cfg.classifier.image_size, *(n for s in cfg.synthesizers for n in s.image_sizes())}):
            for i in range(data["n_shards"]):
                t["pack_shard"](data["data_hash"], data["packs"][i], i, data["n_shards"], size, st)
        plan = t["plan"](data, cfg.sweep, cfg.generation, cfg.synthesizers, st)
        (syn,) = cfg.synthesizers
        model = t["prepare"](data, syn, None, st, rt)
        specs = plan["shards"][syn.label]
        t0 = time.perf_counter()
        with engine.annotate(rt, "generation"):
            shards = [f.result() for f in _submit(t["generate"], [(model, s, syn, st, rt) for s in specs], rt.workers)]
        out["passes"].append(time.perf_counter() - t0)
        out["keys"].append([s.key for s in shards])
        out["images"] = sum(s.n for s in shards)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", default="80:20", help="the synthetic ratio planned (more synthetic: more shards)")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps per image")
    args = parser.parse_args()

    from prefect.testing.utilities import prefect_test_harness

    from tests.flowkit import tiny_config

    engines = [("threads, workers 1", {"workers": 1}), ("threads, workers 2", {"workers": 2}),
               ("dask, 2 processes", {"workers": 2, "engine": "dask", "dask_workers": 2, "dask_threads_per_worker": 1})]
    results = []
    with prefect_test_harness(server_startup_timeout=180), tempfile.TemporaryDirectory() as tmp:
        for name, runtime in engines:
            configs = [config_from_dict(tiny_config(
                f"{tmp}/{name.replace(' ', '').replace(',', '-')}-{p}", runtime={**runtime, "device": "cpu", "threads": 1},
                sweep={"ratios": ["100:0", args.ratio], "seeds": [0]},
                generation={"steps": args.steps})).model_dump(mode="json") for p in (1, 2)]
            started = time.perf_counter()
            with contextlib.redirect_stderr(open(os.devnull, "w")):  # Dask's start/stop chatter
                r = generation_passes(configs, started)
            results.append((name, r))
            print(f"{name}: ready {r['ready_s']:.1f} s, generation {r['passes'][0]:.1f} s cold, "
                  f"{r['passes'][1]:.1f} s warm", file=sys.stderr, flush=True)
    keys = {tuple(k) for _, r in results for k in r["keys"]}
    assert len(keys) == 1, "the engines generated different shards"
    base = results[0][1]["passes"][1]
    n_shards, n_images = len(next(iter(keys))), results[0][1]["images"]
    print(f"\nGeneration stage, {n_shards} shards / {n_images} images (tiny generator, 32 px, {args.steps} steps), "
          f"CPU, 1 torch thread per task; {os.cpu_count()} cores\n")
    print("| engine | engine ready (s) | generation, cold (s) | generation, warm (s) | warm vs threads w1 |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results:
        print(f"| {name} | {r['ready_s']:.1f} | {r['passes'][0]:.1f} | {r['passes'][1]:.1f} | "
              f"{base / r['passes'][1]:.2f}× |")


if __name__ == "__main__":  # required: Dask's worker processes start by importing the main module
    main()
