"""The main flow: ingest → reference classifier; for each synthesizer: prepare → generate shards →
label faithfulness; then the sweep crosses synthesizer × ratio × seed against one real-only
baseline → report."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.runtime import deployment, flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from porcelain.config import RunConfig
from porcelain.data.source import BUILTIN
from porcelain.report.publish import slug as _slug
from porcelain.generate.targeting import synthetic_for
from porcelain.synthesizers import get as get_synthesizer
from porcelain.watch import run_identity, series_of
from tasks import stages
from tasks import watch as watch_tasks
from tasks.policy import TASK_STAGES, result_storage_for, retry_options

MAX_WORKERS = 64  # an upper bound; runtime.workers sets the real limit (see _submit)


def _run_name() -> str:
    """``{config name}-{config hash}`` until the data is read; then renamed ``{name}-{data hash}``."""
    cfg = flow_run.parameters.get("config")
    return run_name(cfg if isinstance(cfg, RunConfig) else RunConfig.model_validate(cfg or {}))


@flow(name="porcelain-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=MAX_WORKERS), persist_result=False,
      flow_run_name=_run_name, validate_parameters=True)
def pipeline(config: RunConfig) -> dict[str, Any]:
    """Run the whole pipeline for one run config (in the Prefect UI, a form of its sections)."""
    cfg: RunConfig = config if isinstance(config, RunConfig) else RunConfig.model_validate(config)
    log = get_run_logger()
    st, rt = cfg.storage, cfg.runtime
    if getattr(rt, "engine", "threads") != "threads":  # e.g. dask: the same flow, on that task runner
        from flows import engine

        if not engine.uses(rt, _current_task_runner()):
            return pipeline.with_options(task_runner=engine.task_runner_for(rt))(cfg)
    retry = retry_options(rt)  # runtime.retries governs every task
    # Task results live beside the run's data, whoever calls the flow (the store is not in the keys).
    results_at = result_storage_for(st)
    builtin_data, ingest, pack_shard, plan_generation, prepare, generate, reference, faithfulness, drift, \
        filter_, top_up_plan, train_evaluate, report = (_task(name, rt, retry, results_at) for name in (
            "builtin_data", "ingest", "pack_shard", "plan", "prepare", "generate", "reference",
            "faithfulness", "drift", "filter_", "top_up_plan", "train_evaluate", "report"))
    adapt = _task("adapt", rt, retry, results_at)
    publish = stages.publish_report.with_options(**retry)

    if cfg.data.manifest in BUILTIN:
        src = builtin_data(cfg.data, st)
        manifest, root = src["manifest"], src["root"]
    else:
        manifest, root = cfg.data.manifest, cfg.data.root
    data = ingest(manifest, root, cfg.data, st)
    _rename(f"{_slug(cfg.name)}-{data['data_hash'][:10]}")
    if data["n_quarantined"]:
        log.warning("set aside %d rows in quarantine (%s): see %s", data["n_quarantined"],
                    data["quarantine_reasons"], data["quarantine_key"])
    if data.get("n_near_duplicates"):
        log.warning("%d near-duplicate image pairs span different splits (kept, listed in %s)",
                    data["n_near_duplicates"], data["quarantine_key"])
    for line in data.get("warnings", []):
        log.warning("%s", line)

    ref_size = cfg.reference.image_size or cfg.classifier.image_size
    sizes = sorted({cfg.classifier.image_size, ref_size, *(n for s in cfg.synthesizers for n in s.image_sizes())})
    packs = _submit(pack_shard, [(data["data_hash"], pack_id, i, data["n_shards"], s, st)
                                 for s in sizes for i, pack_id in enumerate(data["packs"])], rt.workers)
    for p in packs:
        p.result()

    plan = plan_generation(data, cfg.sweep, cfg.generation, cfg.synthesizers, st)
    ref = reference(data, cfg.reference, ref_size, st, rt)
    models, shards, faith, drifts, failed = {}, {}, {}, {}, []
    for syn in cfg.synthesizers:  # one seam for every kind: prepare → generate shards → judge
        specs = plan["shards"][syn.label]
        if not specs:
            continue
        needs = get_synthesizer(syn.kind).needs_for(syn)  # e.g. saliency from the reference classifier
        context = {k: {"reference": ref}[k] for k in sorted(needs)} or None
        models[syn.label] = prepare.with_options(
            refresh_cache=f"synthesizer:{syn.kind}" in rt.refresh or None)(data, syn, context, st, rt)
        if get_synthesizer(syn.kind).image_conditioned:  # how far S moves images off their source's label
            drifts[syn.label] = drift(data, models[syn.label], syn, ref, st, rt)
        futures = _submit(generate, [(models[syn.label], spec, syn, st, rt) for spec in specs], rt.workers,
                          progress=f"generation-{syn.label}", stage="generation", runtime=rt)
        shards[syn.label] = []
        for spec, fut in zip(specs, futures):
            if fut.state.is_completed():
                shards[syn.label].append(fut.result())
            else:
                failed.append({"synthesizer": syn.label, "shard": spec, "error": str(fut.state.message)})
    if failed:
        log.error("%d generation shards failed after retries: %s", len(failed), failed)
        raise RuntimeError(f"{len(failed)} generation shards failed; finished shards are kept, rerun to resume")
    for syn in cfg.synthesizers:  # each synthesizer's chain: its own `filters:` or the run's
        if syn.label in shards and cfg.filters_for(syn).enabled:
            shards[syn.label] = _filtered(syn, models[syn.label], shards[syn.label], data, ref, plan, cfg,
                                          filter_, top_up_plan, generate)
    for label, done in shards.items():  # judged as the sweep reads them: after the filters, the kept images
        faith[label] = faithfulness(data, done, ref, cfg.faithfulness, label, st, rt)

    calls = []
    base = cfg.sweep.baseline
    arms = [(None, base)] + [(syn.label, r) for syn in cfg.synthesizers for r in cfg.sweep.ratios if r != base]
    for label, ratio in arms:
        alloc = plan["ratios"][ratio]["alloc"]
        synthetic = synthetic_for(alloc, shards.get(label, [])) if label else {}
        arm = ratio if label is None else f"{label} {ratio}"
        calls += [(data, ratio, seed, synthetic, cfg.classifier, label, arm, st, rt) for seed in cfg.sweep.seeds]
    for f in cfg.sweep.real_fractions:  # the real learning curve of the equivalence scale
        calls += [(data, base, seed, {}, cfg.classifier, None, f"real {f:.0%}", st, rt, f) for seed in cfg.sweep.seeds]
    runs = _submit(train_evaluate, calls, rt.workers, progress="sweep", stage="sweep", runtime=rt)
    results = [r.result() for r in runs]
    adaptive = {}
    if cfg.sweep.adaptive:  # per-task synthetic loss weights, chosen on val; one more arm per synthesizer
        calls = []
        for syn in cfg.synthesizers:
            choice = adapt(data, results, syn.label, base, cfg.classifier.image_size, st)
            if choice is None:
                continue
            adaptive[syn.label] = choice
            synthetic = synthetic_for(plan["ratios"][choice["ratio"]]["alloc"], shards.get(syn.label, []))
            calls += [(data, choice["ratio"], seed, synthetic, cfg.classifier, syn.label, f"{syn.label} adaptive", st,
                       rt, 1.0, choice["weights"]) for seed in cfg.sweep.seeds]
        results += [r.result() for r in _submit(train_evaluate, calls, rt.workers, stage="sweep", runtime=rt)]

    summary = {"config": cfg.model_dump(mode="json"), "data": data, "plan": plan,
               "models": {k: v.model_dump(mode="json") for k, v in models.items()},
               "shards": {k: [s.model_dump(mode="json") for s in v] for k, v in shards.items()},
               "reference": ref, "faithfulness": faith, "drift": drifts, "runs": results, "adaptive": adaptive}
    # what changed since the previous run of this deployment (or of the CLI) with other inputs
    series = series_of(cfg.name, deployment.name)
    identity = run_identity(data["data_hash"], cfg.model_dump(mode="json"))
    summary["previous"] = watch_tasks.previous_run(series, identity, st)
    written = report(summary, st)
    watch_tasks.record_run(series, identity, data["data_hash"], written["key"], st)
    listed = data["n_quarantined"] or data.get("n_near_duplicates")
    publish(written, cfg.name, st, data["quarantine_key"] if listed else None)  # on every run, cache hits included
    log.info("report: %s", written["uri"])
    return {"report": written, "faithfulness": faith, "data_hash": data["data_hash"], "failed_shards": failed}


def _filtered(syn: Any, model: Any, done: list[Any], data: dict[str, Any], ref: dict[str, Any], plan: dict[str, Any],
              cfg: RunConfig, filter_: Any, top_up_plan: Any, generate: Any) -> list[Any]:
    """Filter a synthesizer's shards, then top up the combinations left short, for a few rounds."""
    st, rt, fc = cfg.storage, cfg.runtime, cfg.filters_for(syn)
    kept = [f.result() for f in _submit(filter_, [(data, s, ref, fc, st, rt) for s in done], rt.workers,
                                        stage="filter", runtime=rt)]
    for round_ in range(fc.rounds):
        specs = top_up_plan(data, syn, plan["need"], kept, fc, cfg.generation.shard_size, cfg.generation.seed,
                            round_, st)
        if not specs:
            break
        new = [f.result() for f in _submit(generate, [(model, s, syn, st, rt) for s in specs], rt.workers,
                                           stage="generation", runtime=rt)]
        new = [f.result() for f in _submit(filter_, [(data, s, ref, fc, st, rt) for s in new], rt.workers,
                                           stage="filter", runtime=rt)]
        by_place = {(tuple(s.combo), s.start): s for s in kept}
        by_place.update({(tuple(s.combo), s.start): s for s in new})  # a grown shard replaces itself
        kept = list(by_place.values())
    return kept


def _submit(task: Any, calls: list[tuple], workers: int, *, progress: str | None = None, stage: str | None = None,
            runtime: Any = None) -> list[Any]:
    """Submit ``task`` once per argument tuple with at most ``workers`` runs in flight, and wait for all
    of them; the futures come back in the order of ``calls``.

    The limit is applied here, in the flow, rather than by the flow's task runner, so that it holds
    however the flow is started (CLI, a served deployment that loads it from its entrypoint, tests).
    A slot frees when *any* run finishes (a done callback), so a long run does not hold back the
    short ones behind it, as a plain thread pool would not. ``progress`` names a progress artifact
    updated as runs finish (from the flow's thread); ``stage`` lets the engine annotate the runs (on
    Dask, one GPU per generation shard).
    """
    import contextlib
    import threading

    annotate = contextlib.nullcontext()
    if stage and runtime is not None and getattr(runtime, "engine", "threads") != "threads":
        from flows import engine

        annotate = engine.annotate(runtime, stage)
    bar = create_progress_artifact(0.0, key=_slug(progress), description=f"{progress}: 0/{len(calls)}") \
        if progress and calls else None
    slots = threading.Semaphore(max(1, workers))
    lock = threading.Lock()
    finished = [0]
    shown = [0]

    def free(_future: Any) -> None:
        with lock:
            finished[0] += 1
        slots.release()

    def show() -> None:
        with lock:
            done = finished[0]
        if bar is not None and done > shown[0]:
            update_progress_artifact(bar, 100.0 * done / len(calls), description=f"{progress}: {done}/{len(calls)}")
            shown[0] = done

    futures: list[Any] = []
    with annotate:
        for args in calls:
            slots.acquire()
            show()
            future = task.submit(*args)
            future.add_done_callback(free)
            futures.append(future)
    for future in futures:
        future.wait()
    with lock:
        finished[0] = len(futures)  # every run has ended, whether or not its callback has run yet
    show()
    return futures


def run_name(cfg: RunConfig) -> str:
    from porcelain.hashing import stable_hash

    return f"{_slug(cfg.name)}-{stable_hash(cfg.model_dump(mode='json'))[:8]}"


def _rename(name: str) -> None:
    """Name the flow run after what it ran: the config's name and the data's content hash."""
    from prefect.client.orchestration import get_client

    run_id = flow_run.id
    if run_id is None:
        return
    with get_client(sync_client=True) as client:
        client.update_flow_run(run_id, name=name)


def _current_task_runner() -> Any:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return ctx.task_runner if ctx else None


def _task(name: str, runtime: Any, retry: dict[str, Any], results_at: Any) -> Any:
    """A stage's task with the run's retry settings and result storage; recomputed despite its cache
    when its stage is in ``runtime.refresh``."""
    t = getattr(stages, name)
    refresh = bool(set(TASK_STAGES[t.name]) & set(runtime.refresh))
    return t.with_options(**retry, result_storage=results_at, refresh_cache=refresh or None)
