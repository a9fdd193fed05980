"""The ``porcelain`` command line: ``demo``, ``run CONFIG``, ``sample-data OUT``, ``config schema|example``,
``store check URL``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

# Offline by design: nothing downloads weights at run time, and Prefect sends no analytics.
for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_LOGGING_EXTRA_LOGGERS": "porcelain",
               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}.items():
    os.environ.setdefault(_k, _v)

from porcelain.config import RunConfig, demo_config, example_yaml, json_schema, load_config  # noqa: E402
from porcelain.errors import PorcelainError  # noqa: E402


def result_storage_for_config(cfg: RunConfig):
    from tasks.policy import result_storage_for

    return result_storage_for(cfg.storage)


def run_config(cfg: RunConfig) -> dict:
    """Run the pipeline flow with task results persisted beside the run's data."""
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.pipeline import pipeline

    flow = pipeline.with_options(result_storage=result_storage_for_config(cfg),
                                 task_runner=ThreadPoolTaskRunner(max_workers=cfg.runtime.workers))
    return flow(cfg.model_dump(mode="json"))


def _print_result(result: dict) -> None:
    faith = result.get("faithfulness") or {}
    if faith.get("faithfulness"):
        print("label faithfulness: " + ", ".join(f"{t} {v:.1%}" for t, v in faith["faithfulness"].items()))
    print(f"report: {result['report']['uri']}")


def check_store(url: str, endpoint_url: str | None, *, clean: bool, older_than_s: float) -> int:
    """Print what :func:`~porcelain.storage.verify.verify_store` finds; 1 when anything is wrong."""
    from porcelain.config import StorageConfig
    from porcelain.storage import Store
    from porcelain.storage.verify import verify_store

    store = Store(url, StorageConfig(url=url, endpoint_url=endpoint_url).storage_options())
    if clean:
        print(f"removed {store.clean_temporary(older_than_s)} temporary files older than {older_than_s:.0f} s")
    problems = verify_store(store)
    for p in problems:
        print(p)
    print(f"{store.url}: " + (f"{len(problems)} problems" if problems else "sound"))
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="porcelain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the whole pipeline on the built-in sample (CPU)")
    demo.add_argument("--storage", default="./porcelain-runs", help="folder or s3:// URL for everything the run makes")
    run = sub.add_parser("run", help="run the pipeline for a YAML run config")
    run.add_argument("config", type=Path)
    sd = sub.add_parser("sample-data", help="write the built-in sample (manifest.csv + images/) to a folder")
    sd.add_argument("out_dir", type=Path)
    sd.add_argument("--n", type=int, default=1600)
    sd.add_argument("--size", type=int, default=32)
    sd.add_argument("--seed", type=int, default=0)
    cfg_p = sub.add_parser("config", help="print the run config's JSON schema or a complete example")
    cfg_p.add_argument("what", choices=["schema", "example"])
    st_p = sub.add_parser("store", help="check a store after killed or failed runs")
    st_p.add_argument("action", choices=["check"])
    st_p.add_argument("url", help="the run's storage.url (folder or s3://bucket/prefix)")
    st_p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (MinIO, moto)")
    st_p.add_argument("--clean", action="store_true",
                      help="also delete temporary files that killed writers left (older than --older-than)")
    st_p.add_argument("--older-than", type=float, default=3600.0, metavar="SECONDS")
    args = parser.parse_args(argv)

    # porcelain's progress lines go through Prefect's handlers (PREFECT_LOGGING_EXTRA_LOGGERS above).
    logging.getLogger("porcelain").setLevel(logging.INFO)
    try:
        if args.command == "config":
            print(json.dumps(json_schema(), indent=2) if args.what == "schema" else example_yaml(), end="")
            return 0
        if args.command == "sample-data":
            from porcelain.data.sample import write_sample

            print(write_sample(args.out_dir, n=args.n, size=args.size, seed=args.seed))
            return 0
        if args.command == "store":
            return check_store(args.url, args.endpoint_url, clean=args.clean, older_than_s=args.older_than)
        cfg = load_config(args.config) if args.command == "run" else demo_config(url=args.storage)
        _print_result(run_config(cfg))
        return 0
    except PorcelainError as e:
        print(f"porcelain: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
