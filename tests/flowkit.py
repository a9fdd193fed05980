"""Helpers for the flow tests: a tiny config, running the flow, reading task states, counting bodies."""

from __future__ import annotations

import asyncio

from porcelain.config import config_from_dict


def tiny_config(storage_url: str, **overrides) -> dict:
    cfg = {
        "name": "tiny",
        "data": {"sample": {"n": 240, "size": 32, "seed": 3}, "shard_size": 100, "min_images": 20},
        "storage": {"url": storage_url},
        "generator": {"preset": "tiny", "resolution": 32, "train_steps": 40, "batch_size": 16},
        "generation": {"steps": 4, "shard_size": 8, "batch_size": 16, "grid_per_combination": 2},
        "classifier": {"model": "small_cnn", "image_size": 32, "steps": 12, "batch_size": 32, "eval_every": 4},
        "sweep": {"ratios": ["100:0", "80:20"], "seeds": [0, 1]},
        "reference": {"model": "small_cnn", "steps": 12, "batch_size": 32, "eval_every": 4},
        "runtime": {"retries": 1, "retry_delay_seconds": 0, "threads": 1},
    }
    for section, values in overrides.items():
        cfg[section] = {**cfg.get(section, {}), **values} if isinstance(values, dict) else values
    return cfg


def task_states(flow_run_id) -> dict[str, list[str]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    from flows.cli import wait_until_recorded

    wait_until_recorded(flow_run_id)  # task run states reach the server as events, after the flow returns

    async def read():
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200)
            out: dict[str, list[str]] = {}
            for r in runs:
                out.setdefault(r.name, []).append(r.state.name if r.state else "unknown")
            return out

    return asyncio.run(read())


STAGE_FUNCTIONS = ("materialize_builtin", "ingest_dataset", "pack_data_shard", "train_reference", "prepare_synthesizer",
                   "plan_generation", "generate_shard", "measure_faithfulness", "measure_drift", "train_and_evaluate", "build_report")


LAST_RUN: dict = {}  # the id of the flow run that run_flow ran last


def run_flow(cfg_dict, expect_success: bool = True):
    from flows.cli import configured_flow

    cfg = config_from_dict(cfg_dict)
    state = configured_flow(cfg)(cfg.model_dump(mode="json"), return_state=True)  # as the CLI does
    LAST_RUN["id"] = state.state_details.flow_run_id
    states = task_states(state.state_details.flow_run_id)
    if not expect_success:
        return state, states
    assert state.is_completed(), state.message
    return state.result(), states




def flow_run_record(flow_run_id) -> tuple[object, list]:
    """The server's record of a flow run and the artifacts it created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import Artifact

    async def read():
        async with get_client() as client:
            run = await client.read_flow_run(flow_run_id)
            # (the client's read_artifacts sends null filters, which this server refuses; a task-run
            # filter would drop the flow's own artifacts)
            body = {"artifacts": {"flow_run_id": {"any_": [str(flow_run_id)]}}, "limit": 200, "sort": "CREATED_DESC"}
            response = await client.request("POST", "/artifacts/filter", json=body)
            response.raise_for_status()
            arts = [Artifact.model_validate(a) for a in response.json()]
            return run, arts

    return asyncio.run(read())


def write_split(store, data_hash: str, tasks: list[str], classes: dict[str, list[str]], labels, size: int,
                split: str = "test") -> None:
    """A stored dataset of blank images with these label indices (N×T), all in ``split``, packed at
    ``size``: what the report stage reads of the real data, without images to ingest."""
    import numpy as np
    from safetensors.numpy import save as st_save

    from porcelain.data.ingest import dataset_key, pack_key

    labels = np.asarray(labels)
    shas = [f"{i:064x}" for i in range(len(labels))]
    records = [{"image": f"{i}.png", "sha256": sha, "split": split,
                "labels": {t: classes[t][int(labels[i, j])] for j, t in enumerate(tasks)}} for i, sha in enumerate(shas)]
    store.write_json(f"{dataset_key(data_hash)}/dataset.json", {"data_hash": data_hash, "tasks": tasks,
                                                                "classes": classes, "root": "", "records": records})
    store.write_json(f"{dataset_key(data_hash)}/packs.json", {"packs": [{"id": "p" + data_hash, "sha256": shas}]})
    store.write_bytes(pack_key("p" + data_hash, size), st_save({"images": np.zeros((len(shas), size, size, 3), np.uint8)}))
