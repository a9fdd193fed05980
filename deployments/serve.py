"""Serve a run config as Prefect deployments, each with one purpose, on one machine (no work pool):

    python -m deployments.serve configs/museum.yaml      # or: porcelain serve configs/museum.yaml

* ``<name>-ratio-sweep`` — the full real:synthetic ratio sweep of the config, weekly (Monday 02:00).
* ``<name>-watch-images`` — every 10 minutes, lists the dataset's prefix (local or s3://), compares it
  with the watermark in the run's store, and emits ``porcelain.images.landed`` once per new snapshot.
* ``<name>-rerun`` — no schedule: an event trigger on ``porcelain.images.landed`` for this dataset
  (one run per snapshot; duplicates within the debounce window are dropped). The pipeline's cache keys
  come from content, so a rerun recomputes what the new images change and reads the rest from cache.

The whole run config is every deployment's one parameter (the UI shows it as a form), so
``runtime.workers`` and every other setting travel with it. ``deployments/prefect.yaml`` defines the
same three for work pools. A built-in dataset (``data.manifest: sample``) has nothing to watch: it
gets the ratio sweep only.
"""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

WEEKLY = "0 2 * * 1"
WATCH_EVERY_S = 600.0
DEBOUNCE_S = 60.0
SWEEP, RERUN, WATCH = "ratio-sweep", "rerun", "watch-images"


def rerun_trigger(cfg: Any, debounce_s: float = DEBOUNCE_S) -> Any:
    """The rerun's trigger: ``porcelain.images.landed`` for this config's dataset, one run per snapshot
    (``for_each``) and per ``debounce_s`` window (Prefect fires on the first event of a window and
    ignores the rest)."""
    from prefect.events import DeploymentEventTrigger

    from porcelain.watch import EVENT, resource_id

    return DeploymentEventTrigger(
        name=f"{cfg.name}: new images", description="Rerun when the watcher announces a new snapshot of the data.",
        expect={EVENT}, match={"prefect.resource.id": resource_id(cfg.data.manifest, cfg.data.root)},
        for_each={"porcelain.snapshot"}, posture="Reactive", threshold=1, within=timedelta(seconds=debounce_s))


def build_deployments(cfg: Any, weekly: str = WEEKLY, watch_every_s: float = WATCH_EVERY_S,
                      debounce_s: float = DEBOUNCE_S) -> list:
    """The config's deployments: ratio sweep, and (for a dataset with a prefix) watcher and rerun."""
    from flows.cli import configured_flow
    from flows.watcher import watch_images
    from porcelain.data.source import BUILTIN

    flow = configured_flow(cfg)  # workers and result storage come from the config inside the flow
    params = {"config": cfg.model_dump(mode="json")}
    tags = ["porcelain", cfg.name]
    out = [flow.to_deployment(
        name=f"{cfg.name}-{SWEEP}", cron=weekly, parameters=params, tags=[*tags, SWEEP], concurrency_limit=1,
        description="The full real:synthetic ratio sweep of this config, with confidence intervals.")]
    if cfg.data.manifest in BUILTIN:
        return out
    out += [
        flow.to_deployment(
            name=f"{cfg.name}-{RERUN}", parameters=params, tags=[*tags, RERUN], concurrency_limit=1,
            triggers=[rerun_trigger(cfg, debounce_s)],
            description="Runs when new images land (porcelain.images.landed); unchanged stages come from cache."),
        watch_images.to_deployment(
            name=f"{cfg.name}-{WATCH}", interval=timedelta(seconds=watch_every_s), parameters=params,
            tags=[*tags, WATCH], concurrency_limit=1,
            description="Lists the dataset's prefix and announces new images once per snapshot."),
    ]
    return out


def serve_config(cfg: Any, weekly: str = WEEKLY, watch_every_s: float = WATCH_EVERY_S,
                 debounce_s: float = DEBOUNCE_S) -> None:
    """Serve the config's deployments from this process until interrupted (``prefect.serve``)."""
    from prefect import serve

    deployments = build_deployments(cfg, weekly, watch_every_s, debounce_s)
    print("serving " + ", ".join(d.name for d in deployments), flush=True)
    serve(*deployments)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path)
    parser.add_argument("--weekly", default=WEEKLY, metavar="CRON", help=f"cron of the ratio sweep ({WEEKLY})")
    parser.add_argument("--watch-every", type=float, default=WATCH_EVERY_S, metavar="SECONDS",
                        help=f"interval of the image watcher ({WATCH_EVERY_S:.0f} s)")
    parser.add_argument("--debounce", type=float, default=DEBOUNCE_S, metavar="SECONDS",
                        help=f"events of one snapshot within this window start one run ({DEBOUNCE_S:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    from porcelain.config import load_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    serve_config(load_config(args.config), args.weekly, args.watch_every, args.debounce)
    return 0


if __name__ == "__main__":
    sys.exit(main())
