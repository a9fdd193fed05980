"""End-to-end: the whole flow on a tiny config, under one session-scoped Prefect test server."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from flows.cli import run_config
from porcelain.config import config_from_dict
from porcelain.storage import Store

pytestmark = pytest.mark.slow


def tiny_config(storage_url: str, **overrides) -> dict:
    cfg = {
        "name": "tiny",
        "data": {"sample": {"n": 240, "size": 32, "seed": 3}, "shard_size": 100, "min_images": 20},
        "storage": {"url": storage_url},
        "generator": {"preset": "tiny", "resolution": 32, "train_steps": 40, "batch_size": 16},
        "generation": {"steps": 4, "shard_size": 8, "batch_size": 16, "grid_per_combination": 2},
        "classifier": {"model": "tiny", "image_size": 32, "epochs": 1, "batch_size": 32},
        "sweep": {"ratios": ["100:0", "80:20"], "seeds": [0, 1]},
        "faithfulness": {"epochs": 1},
        "runtime": {"retries": 1, "retry_delay_seconds": 0},
    }
    for section, values in overrides.items():
        cfg[section] = {**cfg.get(section, {}), **values} if isinstance(values, dict) else values
    return cfg


def _task_states(flow_run_id) -> dict[str, list[str]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    async def read():
        # Task run states reach the server through events, a moment after the flow returns.
        async with get_client() as client:
            for _ in range(100):
                runs = await client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                    sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200)
                if runs and all(r.state is not None and r.state.is_final() for r in runs):
                    break
                await asyncio.sleep(0.2)
            out: dict[str, list[str]] = {}
            for r in runs:
                out.setdefault(r.name, []).append(r.state.name if r.state else "unknown")
            return out

    return asyncio.run(read())


STAGE_FUNCTIONS = ("materialize_sample", "train_closed_set", "plan_generation", "generate_shard",
                   "measure_faithfulness", "train_and_evaluate", "build_report")


@pytest.fixture
def body_calls(monkeypatch):
    """Counts the library calls made by task bodies (each task body calls exactly one)."""
    import tasks.stages as stages

    calls: list[str] = []
    for name in STAGE_FUNCTIONS:
        fn = getattr(stages, name)

        def wrapper(*a, __fn=fn, __name=name, **k):
            calls.append(__name)
            return __fn(*a, **k)

        monkeypatch.setattr(stages, name, wrapper)
    return calls


def _run(cfg_dict):
    from flows.pipeline import pipeline
    from tasks.policy import result_storage_for

    cfg = config_from_dict(cfg_dict)
    state = pipeline.with_options(result_storage=result_storage_for(cfg.storage))(
        cfg.model_dump(mode="json"), return_state=True)
    assert state.is_completed(), state.message
    return state.result(), _task_states(state.state_details.flow_run_id)


@pytest.fixture(scope="module")
def first_run(prefect_harness, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("store") / "runs")
    cfg = tiny_config(url)
    result, states = _run(cfg)
    return cfg, result, states


def test_flow_produces_report_and_metrics(first_run):
    cfg, result, states = first_run
    store = Store(cfg["storage"]["url"])
    md = store.read_bytes(result["report"]["report"]).decode()
    for heading in ("Does synthetic data help?", "Imbalance ratio", "Label faithfulness", "Results on the real test split"):
        assert heading in md
    report_dir = result["report"]["key"]
    assert {f"{report_dir}/{n}" for n in ("macro_f1.png", "imbalance.png", "samples.png", "results.csv")} <= set(store.list(report_dir))
    faith = result["faithfulness"]
    assert set(faith["faithfulness"]) == {"dynasty", "kiln", "glaze", "type"}
    assert all(0.0 <= v <= 1.0 for v in faith["faithfulness"].values())
    # every task ran and completed once on the first run
    assert all(s == ["Completed"] or set(s) == {"Completed"} for s in states.values()), states
    assert len(states["train-80:20-seed0"]) == 1 and "train-100:0-seed1" in states
    # each shard is recorded with its provenance
    shard_keys = [k for k in store.list("synthetic") if k.endswith(".json")]
    prov = store.read_json(shard_keys[0])["provenance"]
    assert {"combination", "seed", "model_sha256", "steps", "guidance"} <= set(prov)


def test_second_run_executes_no_task_body(first_run, body_calls):
    cfg, result, _ = first_run
    result2, states = _run(cfg)
    assert result2["report"] == result["report"]
    assert body_calls == []
    flat = [s for v in states.values() for s in v]
    assert flat and set(flat) == {"Cached"}, states


def test_changing_one_ratio_recomputes_only_what_depends_on_it(first_run, body_calls):
    cfg, _, _ = first_run
    changed = tiny_config(cfg["storage"]["url"], sweep={"ratios": ["100:0", "70:30"], "seeds": [0, 1]})
    _, states = _run(changed)
    assert body_calls.count("train_and_evaluate") == 2 and "train_closed_set" not in body_calls
    ran = {name for name, s in states.items() if "Completed" in s}
    cached = {name for name, s in states.items() if s == ["Cached"] * len(s)}
    assert {"train-100:0-seed0", "train-100:0-seed1", "ingest", "train-generator"} <= cached
    assert {"train-70:30-seed0", "train-70:30-seed1", "plan-generation", "report"} <= ran
    # finished shards are reused; only the extra images are generated
    gen_ran = [n for n in ran if n.startswith("generate-")]
    gen_cached = [n for n in cached if n.startswith("generate-")]
    assert gen_ran and gen_cached


def test_flow_on_s3_storage(prefect_harness, moto_server, s3_bucket):
    cfg = tiny_config(f"{s3_bucket}/runs", sweep={"ratios": ["100:0", "90:10"], "seeds": [0]})
    cfg["storage"]["endpoint_url"] = moto_server.endpoint
    result, states = _run(cfg)
    store = Store(cfg["storage"]["url"], config_from_dict(cfg).storage.storage_options())
    assert store.exists(result["report"]["report"])
    assert result["report"]["uri"].startswith("s3://")
    # Prefect's own result records live in the bucket too, as JSON
    records = store.list("prefect-results")
    assert records and b"pickle" not in store.read_bytes(records[0])
