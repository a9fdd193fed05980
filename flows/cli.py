"""The ``porcelain`` command line: ``demo``, ``run CONFIG``, ``sample-data OUT``, ``config schema|example``,
``store check URL``, ``serve CONFIG``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from pathlib import Path

# Offline by design: nothing downloads weights at run time, and Prefect sends no analytics.
for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_LOGGING_EXTRA_LOGGERS": "porcelain",
               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}.items():
    os.environ.setdefault(_k, _v)

from porcelain.config import RunConfig, demo_config, example_yaml, json_schema, load_config  # noqa: E402
from porcelain.errors import ConfigError, PorcelainError  # noqa: E402


def _start_temporary_server() -> threading.Thread | None:
    """Start Prefect's temporary API server in a thread, or None when a server is configured.

    Without ``PREFECT_API_URL`` Prefect starts a server subprocess at the flow's first call and waits
    for it (~8 s here). Started now, it boots on the other core while this process imports torch and
    diffusers (~15 s). The flow must not be called before the thread ends: a second ``start()`` would
    return at once, before the server answers.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    def start() -> None:
        try:
            SubprocessASGIServer().start()
        except Exception as e:  # the flow's own start will try again and report it
            logging.getLogger("porcelain").warning("early start of Prefect's temporary server failed: %s", e)

    thread = threading.Thread(target=start, name="prefect-server-start", daemon=True)
    thread.start()
    return thread


def configured_flow(cfg: RunConfig):
    """The pipeline flow. Everything a run config decides (task result storage beside the run's data,
    ``runtime.workers`` tasks at once) is applied inside the flow, so a deployment that loads the flow
    from its entrypoint behaves like the CLI."""
    from flows.pipeline import pipeline

    return pipeline


def run_config(cfg: RunConfig) -> dict:
    """Run the pipeline flow with task results persisted beside the run's data."""
    server = _start_temporary_server()
    if server is not None:
        server.join()
    state = configured_flow(cfg)(cfg.model_dump(mode="json"), return_state=True)
    if server is not None:
        wait_until_recorded(state.state_details.flow_run_id)
    return state.result()


def wait_until_recorded(flow_run_id, timeout_s: float = 15.0) -> None:
    """Wait until the server has recorded every task run of the flow run in a final state.

    Task run states reach the server as events, a moment after the flow returns. A temporary server
    stopped before it wrote them loses the last states (what the Prefect UI shows for this run)
    and prints the recorder's cancelled writes as tracebacks. Settled: no task run in a non-final
    state and the same number of task runs at two polls in a row.
    """
    import asyncio
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    final = {StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED}
    not_final = [t for t in StateType if t not in final]
    open_ = TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(any_=not_final)))

    async def count(client, **filters) -> int:
        body = {k: f.model_dump(mode="json") for k, f in filters.items()}
        response = await client.request("POST", "/task_runs/count", json=body)
        response.raise_for_status()
        return int(response.json())

    async def poll() -> None:
        async with get_client() as client:
            # the run and its subflow runs (with runtime.engine dask, the flow reruns itself on that runner)
            from prefect.client.schemas.filters import FlowRunFilterParentFlowRunId

            parent = FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
            response = await client.request("POST", "/flow_runs/filter", json={
                "flow_runs": parent.model_dump(mode="json"), "limit": 100, "sort": "ID_DESC"})
            response.raise_for_status()
            runs = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id, *(r["id"] for r in response.json())]))
            deadline, last = time.monotonic() + timeout_s, -1
            while time.monotonic() < deadline:
                n = await count(client, flow_runs=runs)
                if n == last and not await count(client, flow_runs=runs, task_runs=open_):
                    return
                last = n
                await asyncio.sleep(0.3)

    asyncio.run(poll())


def _print_result(result: dict) -> None:
    faith = result.get("faithfulness") or {}
    if faith.get("faithfulness"):
        print("label faithfulness: " + ", ".join(
            f"{t} not measurable" if "not_measurable" in v else f"{t} {v['share']:.1%}"
            for t, v in faith["faithfulness"].items()))
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
    for p in (demo, run):
        p.add_argument("--refresh", action="append", default=[], metavar="STAGE",
                       help="recompute this stage although it is cached (repeatable): ingest, reference, "
                            "synthesizer:closed_set, shards, sweep, report, …; what depends on it reruns only "
                            "if its outputs changed")
    sd = sub.add_parser("sample-data", help="write a built-in dataset (manifest.csv + images/) to a folder")
    sd.add_argument("out_dir", type=Path)
    sd.add_argument("--dataset", choices=["sample", "digits"], default="sample",
                    help="sample: procedural porcelain (no split column); digits: scikit-learn's digit scans, "
                         "few-shot long-tailed, with a split column")
    sd.add_argument("--n", type=int, default=1600, help="sample only: number of images")
    sd.add_argument("--size", type=int, default=32)
    sd.add_argument("--seed", type=int, default=0)
    sd.add_argument("--shots", type=int, default=25, help="digits only: train images of the commonest digit")
    sd.add_argument("--imbalance", type=float, default=10.0, help="digits only: commonest/rarest train count")
    tiny = sub.add_parser("tiny-sd", help="write a tiny random Stable Diffusion pipeline (diffusers format) to a "
                          "folder: a `base` for trying the sd_lora kind offline (its images are noise-like)")
    tiny.add_argument("out_dir", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    cfg_p = sub.add_parser("config", help="print the run config's JSON schema or a complete example")
    cfg_p.add_argument("what", choices=["schema", "example", "kinds", "stages"])
    st_p = sub.add_parser("store", help="check a store after killed or failed runs")
    st_p.add_argument("action", choices=["check"])
    st_p.add_argument("url", help="the run's storage.url (folder or s3://bucket/prefix)")
    st_p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (MinIO, moto)")
    st_p.add_argument("--clean", action="store_true",
                      help="also delete temporary files that killed writers left (older than --older-than)")
    st_p.add_argument("--older-than", type=float, default=3600.0, metavar="SECONDS")
    serve_p = sub.add_parser("serve", help="serve the config's deployments on this machine (no work pool): weekly "
                             "ratio sweep, image watcher, rerun on new images (see docs/OPERATIONS.md)")
    serve_p.add_argument("config", type=Path)
    serve_p.add_argument("--weekly", default="0 2 * * 1", metavar="CRON", help="cron of the ratio sweep (Monday 02:00)")
    serve_p.add_argument("--watch-every", type=float, default=600.0, metavar="SECONDS",
                         help="interval of the image watcher (600 s)")
    serve_p.add_argument("--debounce", type=float, default=60.0, metavar="SECONDS",
                         help="events of one snapshot within this window start one run (60 s)")
    args = parser.parse_args(argv)

    # porcelain's progress lines go through Prefect's handlers (PREFECT_LOGGING_EXTRA_LOGGERS above).
    logging.getLogger("porcelain").setLevel(logging.INFO)
    try:
        if args.command == "config":
            if args.what == "kinds":
                from porcelain import synthesizers

                print("\n".join(synthesizers.kinds()))
            elif args.what == "stages":
                from porcelain.versions import all_stage_names, get_stage

                print("\n".join(f"{n}\tversion {get_stage(n).version}" for n in all_stage_names()))
            else:
                print(json.dumps(json_schema(), indent=2) if args.what == "schema" else example_yaml(), end="")
            return 0
        if args.command == "sample-data":
            if args.dataset == "digits":
                from porcelain.data.digits import write_digits

                print(write_digits(args.out_dir, size=args.size, shots=args.shots, imbalance=args.imbalance,
                                   seed=args.seed))
                return 0
            from porcelain.data.sample import write_sample

            print(write_sample(args.out_dir, n=args.n, size=args.size, seed=args.seed))
            return 0
        if args.command == "tiny-sd":
            from porcelain.diffusion.tiny import build_tiny_pipeline

            print(build_tiny_pipeline(args.out_dir, seed=args.seed))
            return 0
        if args.command == "store":
            return check_store(args.url, args.endpoint_url, clean=args.clean, older_than_s=args.older_than)
        if args.command == "serve":
            from deployments.serve import serve_config

            serve_config(load_config(args.config), args.weekly, args.watch_every, args.debounce)
            return 0
        cfg = load_config(args.config) if args.command == "run" else demo_config(url=args.storage)
        if args.refresh:
            from porcelain.versions import all_stage_names

            unknown = sorted(set(args.refresh) - set(all_stage_names()))
            if unknown:
                raise ConfigError(f"--refresh {unknown[0]}: not a stage; stages: {', '.join(all_stage_names())}")
            cfg = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"refresh": list(args.refresh)})})
        _print_result(run_config(cfg))
        return 0
    except PorcelainError as e:
        print(f"porcelain: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
