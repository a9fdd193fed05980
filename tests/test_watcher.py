"""New images: the watcher's snapshot, watermark and claims (local and S3), "what changed since the
previous run", the watcher flow's event, and end to end against a real Prefect server: served
deployments, a drop of new images on S3, exactly one rerun, and nothing for an identical drop."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from porcelain import watch
from porcelain.storage import Store

ROOT = Path(__file__).resolve().parents[1]


def _sample(tmp_path, n=30, size=16, seed=1) -> Path:
    from porcelain.data.sample import write_sample

    return Path(write_sample(tmp_path / "data", n=n, size=size, seed=seed))


def _rows(manifest: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(manifest.read_text())))


def _write_rows(manifest: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    manifest.write_text(buf.getvalue())


# -- snapshot, watermark, claims ------------------------------------------------------------------

def test_a_tick_announces_new_images_once_and_then_nothing_until_more_land(tmp_path):
    manifest = _sample(tmp_path)
    store = Store(str(tmp_path / "runs"))
    first = watch.look(store, str(manifest), None)
    assert first["landed"]["previous"] is None and first["landed"]["n_added"] == 30
    assert first["landed"]["manifest_sha256"] == watch.hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert first["resource_id"] == f"porcelain.dataset.{manifest}"
    # not yet advanced (the announcement comes first): the same change is still there
    assert watch.look(store, str(manifest), None)["landed"]["snapshot"] == first["snapshot"]
    assert watch.advance(store, first["dataset"], first["snapshot"])
    assert watch.look(store, str(manifest), None)["landed"] is None

    # touched, not changed: same snapshot, no announcement, and the next tick reads no image bytes
    img = manifest.parent / "images" / "00003.png"
    os.utime(img, (time.time() + 5, time.time() + 5))
    assert watch.look(store, str(manifest), None)["landed"] is None
    reads: list = []
    real = watch.fsspec.core.url_to_fs

    def counting(url, **kw):
        fs, path = real(url, **kw)
        cat = fs.cat
        fs.cat = lambda paths, **k: reads.extend(paths) or cat(paths, **k)
        return fs, path

    watch.fsspec.core.url_to_fs = counting
    try:
        assert watch.look(store, str(manifest), None)["landed"] is None
    finally:
        watch.fsspec.core.url_to_fs = real
    assert reads == []

    # a new image and its manifest row, and a replaced image: one announcement naming both
    rows = _rows(manifest)
    shutil.copy(manifest.parent / "images" / "00000.png", manifest.parent / "images" / "new-1.png")
    _write_rows(manifest, [*rows, {**rows[0], "image": "images/new-1.png"}])
    shutil.copy(manifest.parent / "images" / "00001.png", manifest.parent / "images" / "00002.png")
    second = watch.look(store, str(manifest), None)["landed"]
    assert second["previous"] == first["snapshot"] and second["manifest_changed"]
    assert (second["added"], second["removed"], second["changed"]) == (["images/new-1.png"], [], ["images/00002.png"])
    # the snapshot document is content-addressed in the store
    doc = Store(str(tmp_path / "runs")).read_json(watch.snapshot_key(first["dataset"], second["snapshot"]))
    assert doc["images"]["images/new-1.png"] == doc["images"]["images/00000.png"]


def test_images_without_their_manifest_wait_for_it(tmp_path):
    manifest = _sample(tmp_path, n=20)
    text = manifest.read_bytes()
    manifest.unlink()
    store = Store(str(tmp_path / "runs"))
    assert watch.look(store, str(manifest), None)["landed"] is None
    manifest.write_bytes(text)
    assert watch.look(store, str(manifest), None)["landed"]["n_added"] == 20


def test_two_watchers_on_one_drop_announce_it_once(tmp_path):
    manifest = _sample(tmp_path, n=20)
    store = Store(str(tmp_path / "runs"))
    a, b = watch.look(store, str(manifest), None), watch.look(store, str(manifest), None)
    assert a["landed"]["snapshot"] == b["landed"]["snapshot"]
    wins = []
    threads = [threading.Thread(target=lambda x=x: wins.append(watch.claim_landed(store, x["landed"], "w")))
               for x in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False, False, False, True]
    assert not [k for k in store.list("watch") if ".tmp-" in k]


def test_a_built_in_dataset_has_nothing_to_watch(tmp_path):
    from porcelain.errors import ConfigError

    with pytest.raises(ConfigError, match="built-in 'sample'"):
        watch.look(Store(str(tmp_path)), "sample", None)


def test_on_s3_the_watcher_claims_with_a_conditional_put_and_ignores_an_identical_reupload(s3_bucket, moto_server,
                                                                                          tmp_path):
    import s3fs

    opts = moto_server.storage_options()
    manifest = _sample(tmp_path, n=20)
    fs = s3fs.S3FileSystem(**opts)
    fs.put(str(manifest.parent) + "/", f"{s3_bucket}/museum/", recursive=True)
    url = f"{s3_bucket}/museum/manifest.csv"
    store = Store(f"{s3_bucket}/runs", opts)
    first = watch.look(store, url, None, opts)
    assert first["landed"]["n_added"] == 20
    assert watch.claim_landed(store, first["landed"]) and not watch.claim_landed(store, first["landed"])
    assert watch.advance(store, first["dataset"], first["snapshot"])
    fs.put(str(manifest.parent) + "/", f"{s3_bucket}/museum/", recursive=True)  # the same bytes again
    assert watch.look(store, url, None, opts)["landed"] is None
    fs.pipe(f"{s3_bucket}/museum/images/extra.png", (manifest.parent / "images" / "00000.png").read_bytes())
    fs.pipe(url, manifest.read_bytes() + b"images/extra.png,song,longquan,celadon,vase\n")
    later = watch.look(store, url, None, opts)["landed"]
    assert later["added"] == ["images/extra.png"] and later["previous"] == first["snapshot"]


# -- what changed since the previous run ----------------------------------------------------------

def _digest(data_hash, images, deltas):
    return {"data_hash": data_hash, "images": images, "deltas": deltas}


def test_changes_since_the_previous_run_name_images_added_and_deltas_moved():
    before = _digest("aaa", {"h1": "train", "h2": "test", "h3": "train"}, {"closed_set 80:20": {"glaze": 0.01, "type": 0.02}})
    after = _digest("bbb", {"h1": "train", "h2": "test", "h4": "train", "h5": "val"},
                    {"closed_set 80:20": {"glaze": 0.05, "type": 0.02}, "closed_set 50:50": {"glaze": -0.1}})
    c = watch.changes_since(before, after)
    assert (c["first_run"], c["data_changed"], c["n_added"], c["n_removed"]) == (False, True, 2, 1)
    assert c["added_by_split"] == {"train": 1, "val": 1} and c["removed_by_split"] == {"train": 1}
    assert c["deltas"] == [{"arm": "closed_set 80:20", "task": "glaze", "before": 0.01, "after": 0.05, "moved": 0.04}]
    assert c["new_arms"] == ["closed_set 50:50"]
    text = "\n".join(watch.changes_markdown(c))
    assert "2 images added (train 1, val 1), 1 removed (train 1)" in text and "| closed_set 80:20 | glaze |" in text
    first = watch.changes_since(None, after)
    assert first["first_run"] and first["n_added"] == 4
    assert "First run" in "\n".join(watch.changes_markdown(first))


def test_a_rerun_of_the_same_inputs_compares_with_the_same_previous_run(tmp_path):
    store = Store(str(tmp_path))
    d1, d2 = _digest("a", {"h1": "train"}, {}), _digest("b", {"h1": "train", "h2": "train"}, {})
    assert watch.previous_digest(store, "museum/rerun", "id-a") is None
    watch.record_digest(store, "museum/rerun", "id-a", d1)
    assert watch.previous_digest(store, "museum/rerun", "id-a") is None  # same inputs: same report
    assert watch.previous_digest(store, "museum/rerun", "id-b") == d1
    watch.record_digest(store, "museum/rerun", "id-b", d2)
    assert watch.previous_digest(store, "museum/rerun", "id-b") == d1
    watch.record_digest(store, "museum/rerun", "id-b", d2)
    assert watch.previous_digest(store, "museum/rerun", "id-b") == d1
    assert watch.previous_digest(store, "museum/rerun", "id-c") == d2


def test_a_run_is_recorded_from_its_report_table_and_compared_by_its_dataset(tmp_path):
    store = Store(str(tmp_path))
    for h, recs in (("abc", [("h1", "train"), ("h2", "test")]), ("abd", [("h1", "train"), ("h3", "val")])):
        store.write_json(f"datasets/{h}/dataset.json", {"records": [{"sha256": x, "split": y} for x, y in recs]})
    rows = [{"arm": "100:0", "task": "glaze", "verdict": "baseline", "delta_macro_f1": None},
            {"arm": "closed_set 80:20", "task": "glaze", "verdict": "no clear difference", "delta_macro_f1": 0.03}]
    store.write_json("reports/r1/table.json", {"rows": rows})
    series = watch.series_of("my museum", "my museum-rerun")
    assert series == "my_museum/my_museum-rerun"
    ident = watch.run_identity("abc", {"name": "m", "sweep": {}, "storage": {"url": "x"}})
    assert ident == watch.run_identity("abc", {"name": "m", "sweep": {}, "storage": {"url": "elsewhere"}})
    watch.record_run(store, series, ident, "abc", "reports/r1")
    previous = watch.previous_digest(store, series, watch.run_identity("abd", {"name": "m"}))
    assert previous == {"data_hash": "abc", "deltas": {"closed_set 80:20": {"glaze": 0.03}}}
    current = watch.run_digest("abd", [{**rows[1], "delta_macro_f1": -0.01}])
    c = watch.changes_since(watch.with_images(store, previous), watch.with_images(store, current))
    assert (c["n_added"], c["added_by_split"], c["n_removed"], c["removed_by_split"]) == (1, {"val": 1}, 1, {"test": 1})
    assert c["deltas"][0]["moved"] == -0.04


# -- the watcher flow's event ---------------------------------------------------------------------

def _events(resource: str) -> list[dict]:
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            r = await client.request("POST", "/events/filter", json={
                "filter": {"event": {"name": [watch.EVENT]}, "resource": {"id": [resource]}}, "limit": 50})
            return r.json()["events"]

    return asyncio.run(read())


def test_the_watcher_flow_emits_one_event_per_snapshot(prefect_harness, tmp_path):
    from prefect.events.worker import EventsWorker

    from flows.watcher import watch_images
    from porcelain.config import config_from_dict

    manifest = _sample(tmp_path, n=20)
    cfg = config_from_dict({"name": "w", "data": {"manifest": str(manifest)}, "storage": {"url": str(tmp_path / "runs")}})
    first, again = watch_images(cfg), watch_images(cfg)
    assert first["event"] and first["landed"]["n_added"] == 20
    assert again == {"snapshot": first["snapshot"], "landed": None, "event": None}
    EventsWorker.drain_all()
    rid = watch.resource_id(str(manifest))
    deadline, events = time.monotonic() + 30, []
    while time.monotonic() < deadline and not events:
        events = _events(rid)
        time.sleep(0.3)
    assert [e["id"] for e in events] == [first["event"]]
    e = events[0]
    assert e["resource"]["porcelain.snapshot"] == first["snapshot"] and e["payload"]["manifest"] == str(manifest)
    assert e["payload"]["manifest_sha256"] == first["landed"]["manifest_sha256"]


# -- end to end: a real server, served deployments, a drop on S3 ----------------------------------

class PrefectServer:
    """``prefect server start`` on 127.0.0.1 with its own PREFECT_HOME (sqlite); no UI, no scheduler
    (the test starts the watcher itself), triggers and actions on."""

    def __init__(self, home: Path):
        from tests.conftest import _free_port

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.home = home
        self.log = open(home / "server.log", "wb")
        self.env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
                    "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false", "PREFECT_SERVER_SERVICES_FOREMAN_ENABLED": "false",
                    "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db"}
        self.env.pop("PREFECT_API_URL", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                      "--port", str(self.port)], env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout_s: float = 120) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.home / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError("prefect server did not answer: " + (self.home / "server.log").read_text()[-3000:])

    def stop(self) -> None:
        for p in (self.proc,):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.log.close()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _deployment_id(client, name: str, timeout_s: float = 120):
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return (await client.read_deployment_by_name(name)).id
        except ObjectNotFound:
            await asyncio.sleep(0.5)
    raise AssertionError(f"deployment {name} never appeared")


async def _runs_of(client, deployment_id):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
    from prefect.client.schemas.sorting import FlowRunSort

    # limit and sort given: this client sends null for them otherwise, which the server refuses (422)
    return await client.read_flow_runs(
        flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id])),
        sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=50)


async def _task_states(client, flow_run_id) -> dict[str, list[str]]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                       sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200)
    out: dict[str, list[str]] = {}
    for r in runs:
        out.setdefault(r.name, []).append(r.state.name if r.state else "unknown")
    return out


@pytest.mark.slow
def test_served_deployments_rerun_once_per_drop_of_new_images(moto_server, s3_bucket, tmp_path):
    import s3fs
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.flowkit import tiny_config

    t0 = time.monotonic()

    def phase(what: str) -> None:  # where the time goes (printed with -s, or shown on failure)
        print(f"[{time.monotonic() - t0:6.1f} s] {what}", file=sys.stderr, flush=True)

    home = tmp_path / "prefect-home"
    home.mkdir()
    server = PrefectServer(home)  # starts while the data is written

    # the museum's data on S3: 200 images first, 40 more (and a new manifest) later
    manifest = _sample(tmp_path, n=240, size=32, seed=3)
    rows = _rows(manifest)
    old, new = rows[:200], rows[200:]
    fs = s3fs.S3FileSystem(**moto_server.storage_options())
    base = f"{s3_bucket}/museum"
    for r in old:
        fs.pipe(f"{base}/{r['image']}", (manifest.parent / r["image"]).read_bytes())
    _write_rows(manifest, old)
    fs.pipe(f"{base}/manifest.csv", manifest.read_bytes())

    cfg = tiny_config(f"{s3_bucket}/runs", synthesizers=[], sweep={"ratios": ["100:0"], "seeds": [0]},
                      storage={"endpoint_url": moto_server.endpoint}, runtime={"workers": 2})
    cfg.pop("generator")
    cfg["generation"] = {"shard_size": 8, "grid_per_combination": 2}
    cfg["data"] = {**cfg["data"], "manifest": f"{base}/manifest.csv"}
    cfg_path = tmp_path / "museum.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))

    # the watermark as the watcher left it when it announced the first 200 images
    from porcelain.config import config_from_dict

    rc = config_from_dict(cfg)
    store = Store(rc.storage.url, rc.storage.storage_options())
    try:
        seed_tick = watch.look(store, rc.data.manifest, None, rc.storage.storage_options())
        watch.advance(store, seed_tick["dataset"], seed_tick["snapshot"])
    except BaseException:
        server.stop()
        raise

    served = None
    try:
        server.wait_healthy()
        phase("server healthy")
        env = {**server.env, "PREFECT_API_URL": server.url, "PREFECT_RUNNER_POLL_FREQUENCY": "1",
               "PREFECT_LOGGING_LEVEL": "INFO"}
        served_log = open(home / "served.log", "wb")
        served = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", str(cfg_path), "--debounce", "30",
                                   "--watch-every", "86400"], cwd=ROOT, env=env, stdout=served_log,
                                  stderr=subprocess.STDOUT)

        async def scenario():
            async with get_client() as client:
                await _deployment_id(client, "porcelain-watch-images/tiny-watch-images")
                rerun_id = await _deployment_id(client, "porcelain-pipeline/tiny-rerun")
                sweep_id = await _deployment_id(client, "porcelain-pipeline/tiny-ratio-sweep")
                phase("deployments served")
                automations = await client.read_automations_by_name("tiny: new images")
                assert automations and automations[0].trigger.match.get("prefect.resource.id") == \
                    [watch.resource_id(rc.data.manifest)]

                async def watcher_tick():
                    run = await run_deployment("porcelain-watch-images/tiny-watch-images", timeout=120,
                                               poll_interval=1, client=client)
                    assert run.state.type == StateType.COMPLETED, run.state
                    return run

                async def wait_for_rerun(n: int, timeout_s: float = 150):
                    deadline = time.monotonic() + timeout_s
                    while time.monotonic() < deadline:
                        runs = await _runs_of(client, rerun_id)
                        if len(runs) >= n and all(r.state and r.state.is_final() for r in runs):
                            return runs
                        await asyncio.sleep(1)
                    raise AssertionError(f"no {n} finished rerun(s): {[(r.name, r.state) for r in runs]}")

                async def events():
                    r = await client.request("POST", "/events/filter", json={
                        "filter": {"event": {"name": [watch.EVENT]}}, "limit": 50})
                    return r.json()["events"]

                # the weekly sweep has run on the first 200 images (its packs, in the shared cache)
                first = await run_deployment("porcelain-pipeline/tiny-ratio-sweep", timeout=150, poll_interval=1,
                                             client=client)
                assert first.state.type == StateType.COMPLETED, first.state
                phase("sweep ran on the first 200 images")
                first_states = await _task_states(client, first.id)

                # the drop: 40 new images, then the manifest that lists them
                for r in new:
                    fs.pipe(f"{base}/{r['image']}", (manifest.parent / r["image"]).read_bytes())
                _write_rows(manifest, rows)
                fs.pipe(f"{base}/manifest.csv", manifest.read_bytes())
                await watcher_tick()
                phase("watcher ran after the drop")
                runs = await wait_for_rerun(1)
                phase("rerun finished")
                assert len(runs) == 1 and runs[0].state.type == StateType.COMPLETED, runs[0].state
                landed = await events()
                assert len(landed) == 1 and landed[0]["payload"]["n_added"] == 40
                assert landed[0]["payload"]["previous"] == seed_tick["snapshot"]
                states = await _task_states(client, runs[0].id)

                # the same drop again (identical bytes): the watcher announces nothing, no run starts
                for r in new:
                    fs.pipe(f"{base}/{r['image']}", (manifest.parent / r["image"]).read_bytes())
                fs.pipe(f"{base}/manifest.csv", manifest.read_bytes())
                await watcher_tick()
                phase("watcher ran after the identical drop")
                await asyncio.sleep(8)  # time for an event to reach the trigger and a run to be polled
                assert len(await events()) == 1
                assert len(await _runs_of(client, rerun_id)) == 1
                assert len(await _runs_of(client, sweep_id)) == 1  # its weekly schedule is its own
                return first_states, states

        with temporary_settings({PREFECT_API_URL: server.url}):
            first_states, states = asyncio.run(scenario())
        served_log.close()
    except BaseException:
        if served is not None:
            _stop(served)
        print((home / "served.log").read_text()[-6000:] if (home / "served.log").exists() else "", file=sys.stderr)
        print((home / "server.log").read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        if served is not None:
            _stop(served)
        server.stop()

    # What the new images change: the data hash, so every stage that reads the data ran (ingest, the
    # plan, the reference classifier, the sweep's run, the report), but of the packs only the one the
    # new rows fall in: the full packs of the first 200 images came from the sweep's cache.
    from porcelain.data.ingest import dataset_key

    hashes = sorted(k.split("/")[1] for k in store.list("datasets") if k.endswith("dataset.json"))
    assert len(hashes) == 2
    metas = [store.read_json(f"{dataset_key(h)}/dataset.json") for h in hashes]
    assert sorted(len(m["records"]) for m in metas) == [200, 240]
    size = rc.data.shard_size
    old_packs, new_packs = -(-200 // size), -(-240 // size)
    assert first_states["pack-32px-0"] == ["Completed"]
    unchanged = 200 // size  # full packs of the first 200 rows
    assert states == {
        "ingest": ["Completed"], **{f"pack-32px-{i}": ["Cached"] for i in range(unchanged)},
        **{f"pack-32px-{i}": ["Completed"] for i in range(unchanged, new_packs)},
        **{name: ["Completed"] for name in ["plan-generation", "reference-classifier", "train-100:0-seed0",
                                           "previous-run", "report", "record-run", "publish-report"]}}, states
    assert unchanged >= 1 and new_packs > unchanged and old_packs == unchanged + (200 % size > 0)
