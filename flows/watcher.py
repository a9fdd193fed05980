"""The image watcher: look under the dataset's prefix → compare with the watermark → announce
``porcelain.images.landed`` once per new snapshot → advance the watermark.

The rerun deployment (deployments/serve.py) has a trigger on this event for its dataset.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.events import emit_event
from prefect.runtime import flow_run

from porcelain.config import RunConfig
from porcelain.watch import EVENT
from tasks.watch import advance_watermark, claim_snapshot, look_for_images


def _run_name() -> str:
    cfg = flow_run.parameters.get("config")
    name = cfg.name if isinstance(cfg, RunConfig) else (cfg or {}).get("name", "porcelain")
    return f"watch-{name}"


@flow(name="porcelain-watch-images", flow_run_name=_run_name, persist_result=False,
      validate_parameters=True)
def watch_images(config: RunConfig) -> dict[str, Any]:
    """Announce new images (or a new manifest) of the config's dataset, once per snapshot."""
    cfg = config if isinstance(config, RunConfig) else RunConfig.model_validate(config)
    log = get_run_logger()
    looked = look_for_images(cfg.data, cfg.storage)
    landed = looked["landed"]
    emitted = None
    if landed is None:
        log.info("no new images under %s (snapshot %s)", cfg.data.manifest, looked["snapshot"][:12])
    elif claim_snapshot(landed, str(flow_run.id) if flow_run.id else None, cfg.storage):
        event = emit_event(
            EVENT,
            resource={"prefect.resource.id": looked["resource_id"], "prefect.resource.name": cfg.name,
                      "porcelain.manifest": landed["manifest"], "porcelain.root": cfg.data.root or "",
                      "porcelain.snapshot": landed["snapshot"]},
            payload=landed)
        emitted = str(event.id) if event else None
        log.info("%s: %d added, %d removed, %d changed (snapshot %s, manifest %s)", EVENT, landed["n_added"],
                 landed["n_removed"], landed["n_changed"], landed["snapshot"][:12], landed["manifest"])
    else:
        log.info("snapshot %s was already announced by another watcher", landed["snapshot"][:12])
    if landed is not None:
        advance_watermark(looked["dataset"], looked["snapshot"], cfg.storage)
    return {"snapshot": looked["snapshot"], "landed": landed, "event": emitted}
