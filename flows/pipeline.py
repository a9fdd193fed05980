"""The main flow: ingest → reference classifier, closed-set generator → targeted generation →
label faithfulness → ratio sweep → report."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from porcelain.config import RunConfig, config_from_dict
from porcelain.data.source import BUILTIN
from porcelain.generate.targeting import shards_for
from tasks import stages
from tasks.policy import retry_options


@flow(name="porcelain-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=1), persist_result=False)
def pipeline(config: dict[str, Any]) -> dict[str, Any]:
    """Run the whole pipeline for one run config (a dict of :class:`~porcelain.config.RunConfig`)."""
    cfg: RunConfig = config_from_dict(config)
    log = get_run_logger()
    st, rt = cfg.storage, cfg.runtime
    retry = retry_options(rt)  # runtime.retries governs every task
    builtin_data, ingest, pack_shard, plan_generation, train_generator, generate, reference, faithfulness, \
        train_evaluate, report = (getattr(stages, name).with_options(**retry) for name in (
            "builtin_data", "ingest", "pack_shard", "plan", "train_generator", "generate", "reference",
            "faithfulness", "train_evaluate", "report"))

    if cfg.data.manifest in BUILTIN:
        src = builtin_data(cfg.data, st)
        manifest, root = src["manifest"], src["root"]
    else:
        manifest, root = cfg.data.manifest, cfg.data.root
    data = ingest(manifest, root, cfg.data, st)
    if data["n_quarantined"]:
        log.warning("set aside %d rows in quarantine (%s): see %s", data["n_quarantined"],
                    data["quarantine_reasons"], data["quarantine_key"])
    if data.get("n_near_duplicates"):
        log.warning("%d near-duplicate image pairs span different splits (kept, listed in %s)",
                    data["n_near_duplicates"], data["quarantine_key"])
    for line in data.get("warnings", []):
        log.warning("%s", line)

    ref_size = cfg.reference.image_size or cfg.classifier.image_size
    sizes = sorted({cfg.generator.resolution, cfg.classifier.image_size, ref_size})
    packs = [pack_shard.submit(data["data_hash"], i, data["n_shards"], s, st)
             for s in sizes for i in range(data["n_shards"])]
    wait(packs)
    for p in packs:
        p.result()

    plan = plan_generation(data, cfg.sweep, cfg.generation, st)
    ref = reference(data, cfg.reference, ref_size, st, rt)
    gen, shards, failed = None, [], []
    if plan["shards"]:
        gen = train_generator(data, cfg.generator, st, rt)
        futures = [generate.submit(gen, spec, cfg.generation, st, rt) for spec in plan["shards"]]
        wait(futures)
        for spec, fut in zip(plan["shards"], futures):
            if fut.state.is_completed():
                shards.append(fut.result())
            else:
                failed.append({"shard": spec, "error": str(fut.state.message)})
        if failed:
            log.error("%d of %d generation shards failed after retries: %s", len(failed), len(futures), failed)
            raise RuntimeError(f"{len(failed)} generation shards failed; finished shards are kept, rerun to resume")
    faith = faithfulness(data, shards, ref, cfg.faithfulness, st, rt) if shards else None

    runs = []
    for ratio in cfg.sweep.ratios:
        alloc = plan["ratios"][ratio]["alloc"]
        synthetic = {"alloc": alloc, "shards": shards_for(alloc, shards)}
        runs += [train_evaluate.submit(data, ratio, seed, synthetic, cfg.classifier, st, rt) for seed in cfg.sweep.seeds]
    wait(runs)
    results = [r.result() for r in runs]

    summary = {"config": cfg.model_dump(mode="json"), "data": data, "plan": plan, "generator": gen,
               "shards": shards, "reference": ref, "faithfulness": faith, "runs": results}
    written = report(summary, st)
    log.info("report: %s", written["uri"])
    return {"report": written, "faithfulness": faith, "data_hash": data["data_hash"], "failed_shards": failed}
