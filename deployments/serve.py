"""Serve the pipeline as scheduled Prefect deployments.

    python -m deployments.serve configs/museum.yaml

* ``ratio-sweep`` — weekly (Monday 02:00) full ratio sweep of the given config.
* ``refresh`` — nightly run of the same config: when new museum images land in the manifest, the
  dataset fingerprint changes and only the stages that depend on the data rerun; on a night with no
  new images every task is a cache hit and the run ends in seconds.

Both show in the Prefect UI with their runs, task states, artifacts (report, results table) and logs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefect import serve

from flows.cli import configured_flow
from porcelain.config import RunConfig, load_config

WEEKLY = "0 2 * * 1"
NIGHTLY = "30 1 * * *"


def build_deployments(cfg: RunConfig, weekly: str = WEEKLY, nightly: str = NIGHTLY) -> list:
    flow = configured_flow(cfg)  # workers and result storage come from the config inside the flow
    params = {"config": cfg.model_dump(mode="json")}
    tags = ["porcelain", cfg.name]
    return [
        flow.to_deployment(name=f"{cfg.name}-ratio-sweep", cron=weekly, parameters=params, tags=tags,
                           description="Weekly real:synthetic ratio sweep with confidence intervals."),
        flow.to_deployment(name=f"{cfg.name}-refresh", cron=nightly, parameters=params, tags=tags,
                           description="Nightly rerun: new images recompute only what depends on them."),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--weekly", default=WEEKLY, help="cron of the ratio sweep")
    parser.add_argument("--nightly", default=NIGHTLY, help="cron of the refresh run")
    args = parser.parse_args(argv)
    serve(*build_deployments(load_config(args.config), args.weekly, args.nightly))
    return 0


if __name__ == "__main__":
    sys.exit(main())
