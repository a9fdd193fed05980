"""One measurement of benchmarks/costs.py, in its own process (so that time and peak memory are its own).

    python benchmarks/_costs_child.py flow    CONFIG.yaml OUT.json     # the pipeline under Prefect (flows.cli.run_config)
    python benchmarks/_costs_child.py direct  CONFIG.yaml OUT.json     # the same porcelain functions in a plain loop
    python benchmarks/_costs_child.py memory  CONFIG.yaml OUT.json --ref STORE REF --images N
    python benchmarks/_costs_child.py sampler CONFIG.yaml OUT.json --ref STORE REF --images N --threads T

Each mode writes one JSON document to OUT.json. Not a public interface: costs.py is.
"""

from __future__ import annotations

import time

T_PROCESS = time.monotonic()  # before the heavy imports

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from collections import Counter  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}.items():
    os.environ.setdefault(_k, _v)


def _rss_mib() -> float:
    """Peak resident set size of this process so far (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --- the pipeline under Prefect ------------------------------------------------------------------------------

STAGE_FUNCTIONS = ("materialize_builtin", "ingest_dataset", "pack_data_shard", "train_reference",
                   "prepare_synthesizer", "plan_generation", "generate_shard", "measure_faithfulness",
                   "measure_drift", "filter_shard", "top_up", "train_and_evaluate", "build_report")


def _count_bodies() -> Counter:
    """Count the library calls made by task bodies (each task body calls one), as tests/conftest.py does.
    Only calls made in this process are seen (not those on Dask workers)."""
    import tasks.stages as stages

    calls: Counter = Counter()
    for name in STAGE_FUNCTIONS:
        fn = getattr(stages, name)

        def wrapper(*a, __fn=fn, __name=name, **k):
            calls[__name] += 1
            return __fn(*a, **k)

        setattr(stages, name, wrapper)
    return calls


def _task_runs_since(started_after: float) -> list[dict[str, Any]]:
    """Every task run of the flow runs (subflows included) that started after ``started_after`` (epoch s)."""
    import asyncio
    from datetime import datetime, timezone

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterStartTime
    from prefect.client.schemas.sorting import FlowRunSort, TaskRunSort

    from flows.cli import wait_until_recorded

    since = datetime.fromtimestamp(started_after, tz=timezone.utc)

    async def flow_ids() -> list:
        async with get_client() as client:
            runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=since)),
                sort=FlowRunSort.START_TIME_ASC, limit=200)
            return [r.id for r in runs]

    ids = asyncio.run(flow_ids())
    for i in ids:
        wait_until_recorded(i)

    async def read() -> list[dict[str, Any]]:
        async with get_client() as client:
            out, offset = [], 0
            while True:
                page = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)),
                                                   sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200,
                                                   offset=offset)
                out += [{"task": r.task_key.rsplit("-", 1)[0], "name": r.name,
                         "state": r.state.name if r.state else "unknown",
                         "start": r.start_time.timestamp() if r.start_time else None,
                         "end": r.end_time.timestamp() if r.end_time else None} for r in page]
                if len(page) < 200:
                    return out
                offset += 200

    return asyncio.run(read()) if ids else []


def run_flow(cfg_path: str) -> dict[str, Any]:
    from porcelain.config import load_config

    cfg = load_config(cfg_path)
    bodies = _count_bodies()
    import flows.pipeline  # noqa: F401  (imported here, not inside the timed call: imports are timed apart)
    from flows.cli import run_config

    t_imported = time.monotonic()
    wall0 = time.time()
    t0 = time.monotonic()
    result = run_config(cfg)
    seconds = time.monotonic() - t0
    t_done = time.monotonic()
    out: dict[str, Any] = {"seconds": seconds, "import_seconds": t_imported - T_PROCESS,
                           "data_hash": result["data_hash"], "report": result["report"]["uri"],
                           "bodies": dict(bodies), "peak_rss_mib": _rss_mib()}
    if os.environ.get("PREFECT_API_URL"):  # a shared server outlives this process: read what it recorded
        runs = _task_runs_since(wall0 - 1.0)
        out["task_states"] = {}
        for r in runs:
            out["task_states"].setdefault(r["task"], Counter())[r["state"]] += 1
        gen = [r for r in runs if r["task"] == "generate" and r["start"] and r["end"]]
        if gen:
            out["generation_span_seconds"] = max(r["end"] for r in gen) - min(r["start"] for r in gen)
            out["generation_task_seconds"] = sum(r["end"] - r["start"] for r in gen)
    out["after_seconds"] = time.monotonic() - t_done  # reading the server back: not part of the run's time
    return out


# --- the same porcelain functions, called directly ---------------------------------------------------------

def run_direct(cfg_path: str) -> dict[str, Any]:
    """flows/pipeline.py without Prefect: the same stage functions with the arguments tasks/stages.py
    gives them, fan-outs on a thread pool of ``runtime.workers`` (as the flow's ``_submit``)."""
    from porcelain.config import load_config
    from porcelain.data.ingest import ingest_dataset, pack_data_shard
    from porcelain.data.source import BUILTIN, materialize_builtin
    from porcelain.evaluate.judging import measure_faithfulness
    from porcelain.evaluate.reference import train_reference
    from porcelain.filter.stage import filter_shard, top_up
    from porcelain.generate.shards import generate_shard
    from porcelain.generate.targeting import decode_alloc, plan_generation, synthetic_for
    from porcelain.report.build import build_report
    from porcelain.report.publish import published_report
    from porcelain.storage import Store
    from porcelain.synthesizers import get as get_synthesizer
    from porcelain.synthesizers.drift import measure_drift
    from porcelain.synthesizers.prepare import prepare_synthesizer
    from porcelain.train.sweep import train_and_evaluate

    cfg = load_config(cfg_path)
    t_imported = time.monotonic()
    t0 = time.monotonic()
    st, rt, d = cfg.storage, cfg.runtime, cfg.data
    store = Store(st.url, st.storage_options())
    pool = ThreadPoolExecutor(max_workers=rt.workers)

    def fan_out(fn, calls: list[tuple]) -> list[Any]:
        return [f.result() for f in [pool.submit(fn, *c) for c in calls]]

    if d.manifest in BUILTIN:
        src = materialize_builtin(store, d)
        manifest, root = src["manifest"], src["root"]
    else:
        manifest, root = d.manifest, d.root
    data = ingest_dataset(
        store, manifest, root, tasks=d.tasks, classes=d.classes, val_fraction=d.val_fraction,
        test_fraction=d.test_fraction, split_seed=d.split_seed, min_images=d.min_images, shard_size=d.shard_size,
        storage_options=st.storage_options(), fold_case=d.fold_case, max_megapixels=d.max_megapixels,
        near_duplicate_bits=d.near_duplicate_bits)
    ref_size = cfg.reference.image_size or cfg.classifier.image_size
    sizes = sorted({cfg.classifier.image_size, ref_size, *(n for s in cfg.synthesizers for n in s.image_sizes())})
    fan_out(pack_data_shard, [(store, data["data_hash"], i, data["n_shards"], s, st.storage_options())
                              for s in sizes for i in range(data["n_shards"])])
    plan = plan_generation(store, data, cfg.sweep, cfg.generation, cfg.synthesizers)
    ref = train_reference(store, data, cfg.reference, ref_size, rt)
    models, shards, faith, drifts = {}, {}, {}, {}
    for syn in cfg.synthesizers:
        specs = plan["shards"][syn.label]
        if not specs:
            continue
        needs = get_synthesizer(syn.kind).needs
        context = {k: {"reference": ref}[k] for k in sorted(needs)} or None
        models[syn.label] = prepare_synthesizer(store, data, syn, rt, context)
        if get_synthesizer(syn.kind).image_conditioned:
            drifts[syn.label] = measure_drift(store, data, models[syn.label], syn, ref, rt)
        shards[syn.label] = fan_out(generate_shard, [(store, models[syn.label], spec, syn, rt) for spec in specs])
    for label, done in shards.items():
        faith[label] = measure_faithfulness(store, data, done, ref, cfg.faithfulness, rt)
    if cfg.filters.enabled:
        fc = cfg.filters
        for syn in cfg.synthesizers:
            if syn.label not in shards:
                continue
            kept = fan_out(filter_shard, [(store, data, s, ref, fc, rt) for s in shards[syn.label]])
            for _round in range(fc.rounds):
                specs = top_up(store, data, syn, decode_alloc(plan["need"]), kept, fc, cfg.generation.shard_size,
                               cfg.generation.seed)
                if not specs:
                    break
                new = fan_out(generate_shard, [(store, models[syn.label], s, syn, rt) for s in specs])
                new = fan_out(filter_shard, [(store, data, s, ref, fc, rt) for s in new])
                by_place = {(tuple(s.combo), s.start): s for s in kept}
                by_place.update({(tuple(s.combo), s.start): s for s in new})
                kept = list(by_place.values())
            shards[syn.label] = kept
    base = cfg.sweep.baseline
    arms = [(None, base)] + [(syn.label, r) for syn in cfg.synthesizers for r in cfg.sweep.ratios if r != base]
    calls = []
    for label, ratio in arms:
        alloc = plan["ratios"][ratio]["alloc"]
        synthetic = synthetic_for(alloc, shards.get(label, [])) if label else {}
        calls += [(store, data, ratio, seed, synthetic, cfg.classifier, rt, label) for seed in cfg.sweep.seeds]
    results = fan_out(train_and_evaluate, calls)
    # what the flow's tasks hand on is their JSON form (results persisted as JSON): the report gets the same
    summary = json.loads(json.dumps({
        "config": cfg.model_dump(mode="json"), "data": data, "plan": plan,
        "models": {k: v.model_dump(mode="json") for k, v in models.items()},
        "shards": {k: [s.model_dump(mode="json") for s in v] for k, v in shards.items()},
        "reference": ref, "faithfulness": faith, "drift": drifts, "runs": results}, default=_jsonable))
    written = build_report(store, summary)
    published_report(store, {k: written[k] for k in ("key", "report", "uri", "html")})  # the artifacts' content
    pool.shutdown()
    return {"seconds": time.monotonic() - t0, "import_seconds": t_imported - T_PROCESS, "data_hash": data["data_hash"],
            "report": written["uri"], "peak_rss_mib": _rss_mib()}


def _jsonable(o: Any) -> Any:
    if hasattr(o, "model_dump"):
        return o.model_dump(mode="json")
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


# --- generation alone: peak memory, sampler speed ----------------------------------------------------------

def _closed_set(cfg_path: str):
    from porcelain.config import load_config

    cfg = load_config(cfg_path)
    syn = next((s for s in cfg.synthesizers if s.kind == "closed_set"), None)
    if syn is None:
        raise SystemExit("the config has no closed_set synthesizer")
    return cfg, syn


def _copy_ref(src_store: str, ref_key: str, dst_url: str):
    """The trained generator of an earlier run, copied (weights by content) into a fresh store."""
    from porcelain.results import ModelRef
    from porcelain.storage import Store

    src, dst = Store(src_store), Store(dst_url)
    ref = ModelRef.model_validate(src.read_json(ref_key))
    for f in ref.files.values():
        key = dst.put_object(src.read_verified(f.key, f.sha256), f.key.rsplit(".", 1)[-1],
                             prefix=f.key.split("/", 1)[0])
        if key != f.key:
            raise RuntimeError(f"copied weights landed at {key}, not {f.key}")
    return dst, ref


def _plan(ref, n: int, shard_size: int, seed: int) -> list:
    """``n`` images of the model's first label combination, in shards of ``shard_size``."""
    from porcelain.generate.plan import ShardSpec

    combo = tuple(0 for _ in ref.meta["tasks"])
    return [ShardSpec(combo=combo, start=s, count=min(shard_size, n - s), seed=seed) for s in range(0, n, shard_size)]


def run_memory(cfg_path: str, src_store: str, ref_key: str, n: int, out_dir: str, steps: int | None) -> dict[str, Any]:
    from porcelain.generate.shards import generate_shard
    from porcelain.synthesizers import get

    cfg, syn = _closed_set(cfg_path)
    if steps is not None:  # peak memory does not depend on the number of denoising steps; time does
        syn = syn.model_copy(update={"sampling": syn.sampling.model_copy(update={"steps": steps})})
    store, ref = _copy_ref(src_store, ref_key, out_dir)
    after_imports = _rss_mib()
    get("closed_set")._load(store, ref)  # the model, as the first shard would load it
    baseline = _rss_mib()
    t0 = time.monotonic()
    shards = [generate_shard(store, ref, spec, syn, cfg.runtime)
              for spec in _plan(ref, n, cfg.generation.shard_size, cfg.generation.seed)]
    seconds = time.monotonic() - t0
    peak = _rss_mib()
    return {"images": sum(s.n for s in shards), "shards": len(shards), "after_imports_mib": after_imports,
            "baseline_mib": baseline, "peak_mib": peak, "increment_mib": peak - baseline, "seconds": seconds,
            "steps": syn.sampling.steps}


def run_sampler(cfg_path: str, src_store: str, ref_key: str, n: int, out_dir: str, threads: int) -> dict[str, Any]:
    import numpy as np
    import torch

    from porcelain.generate.sampling import image_noise, sample_images, to_uint8
    from porcelain.generate.shards import generate_shard
    from porcelain.synthesizers import get

    torch.set_num_threads(threads)
    cfg, syn = _closed_set(cfg_path)
    # one generation task at a time here, with ``threads`` threads (generate_shard would set its own)
    rt = cfg.runtime.model_copy(update={"threads": threads, "workers": 1})
    store, ref = _copy_ref(src_store, ref_key, out_dir)
    model = get("closed_set")._load(store, ref)
    s, spec = syn.sampling, model.spec
    steps, w, res = s.steps, float(s.guidance), spec.resolution
    combo = [0] * len(ref.meta["tasks"])
    labels = np.tile(np.asarray(combo, dtype=np.int64), (n, 1))
    seed = 1234

    def plain_per_image() -> np.ndarray:
        """The diffusers docs' "deconstruct a basic pipeline" loop, once per image: the model's own DDIM
        scheduler, classifier-free guidance written as the docs do for text (uncond + scale·(cond − uncond),
        scale = 1 + w, which is porcelain's cond + w·(cond − uncond)), class labels instead of a prompt."""
        scheduler = spec.make_sample_scheduler()
        scheduler.set_timesteps(steps)
        y = torch.tensor([combo], dtype=torch.long)
        null = model.null_labels(1)
        out = []
        for i in range(n):
            sample = image_noise(seed, [i], (spec.in_channels, res, res)) * scheduler.init_noise_sigma
            for t in scheduler.timesteps:
                with torch.no_grad():
                    if w == 0:  # porcelain skips the unconditional pass at w = 0; so does this loop
                        pred = model(sample, torch.full((1,), int(t)), y)
                    else:
                        model_input = torch.cat([sample] * 2)
                        pred = model(model_input, torch.full((2,), int(t)), torch.cat([y, null]))
                        pred_text, pred_uncond = pred.chunk(2)
                        pred = pred_uncond + (1.0 + w) * (pred_text - pred_uncond)
                sample = scheduler.step(pred, t, sample, eta=0.0).prev_sample
            out.append(to_uint8(sample)[0])
        return np.stack(out)

    def ours_batched() -> np.ndarray:
        return sample_images(model, labels, steps=steps, guidance=w, seed=seed, batch_size=s.batch_size,
                             device=rt.device, dtype=rt.dtype)

    def ours_sharded() -> int:
        done = [generate_shard(store, ref, sp, syn, rt) for sp in _plan(ref, n, cfg.generation.shard_size, seed)]
        return sum(d.n for d in done)

    model.eval()
    # warm-up with the shapes used below (oneDNN primitive caches)
    sample_images(model, labels[:1], steps=1, guidance=w, seed=0, batch_size=1)
    sample_images(model, labels[: min(n, s.batch_size)], steps=1, guidance=w, seed=0, batch_size=s.batch_size)
    rows = {}
    t0 = time.perf_counter()
    plain = plain_per_image()
    rows["plain"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = ours_batched()
    rows["batched"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    made = ours_sharded()
    rows["sharded"] = time.perf_counter() - t0
    diff = int(np.max(np.abs(plain.astype(np.int16) - batched.astype(np.int16))))
    return {"images": n, "made_sharded": made, "steps": steps, "guidance": w, "resolution": res,
            "batch_size": s.batch_size, "shard_size": cfg.generation.shard_size, "threads": threads,
            "seconds": rows, "max_abs_uint8_diff": diff}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["flow", "direct", "memory", "sampler"])
    p.add_argument("config")
    p.add_argument("out")
    p.add_argument("--ref", nargs=2, metavar=("STORE", "REF_KEY"))
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default=None, help="memory/sampler: a fresh store for what they write")
    a = p.parse_args()
    if a.mode == "flow":
        out = run_flow(a.config)
    elif a.mode == "direct":
        out = run_direct(a.config)
    elif a.mode == "memory":
        out = run_memory(a.config, *a.ref, a.images, a.work, a.steps)
    else:
        out = run_sampler(a.config, *a.ref, a.images, a.work, a.threads)
    Path(a.out).write_text(json.dumps(out, indent=1, default=lambda o: dict(o) if isinstance(o, Counter) else str(o)))


if __name__ == "__main__":
    main()
