"""Fault injection on the real flow with tiny models: crashes, SIGKILL, storage outage, concurrent runs,
non-finite losses. Each test reuses the trained tiny generator of the session's first run (same data
and generator config → cache hit) and changes the generation settings to force new shards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from porcelain.storage import Store
from porcelain.storage.verify import verify_store
from tests.conftest import ROOT, _free_port
from tests.flowkit import run_flow, tiny_config

pytestmark = pytest.mark.slow


def _shard_manifests(store: Store) -> set[str]:
    return {k for k in store.list("synthetic") if k.endswith(".json")}


def _cli_env() -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONUNBUFFERED": "1"}


def _write_config(tmp_path: Path, cfg: dict, name: str = "run.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_crash_in_one_shard_never_loses_the_others(tiny_run, body_calls, monkeypatch):
    import tasks.stages as stages

    cfg = tiny_config(tiny_run[0]["storage"]["url"], generation={"guidance": 1.0})
    store = Store(cfg["storage"]["url"])
    before = _shard_manifests(store)
    counted = stages.generate_shard
    doomed: dict = {}
    attempts = []

    def crash_first_shard(store_, gen, spec, *a, **k):
        doomed.setdefault("spec", spec)
        if spec == doomed["spec"]:
            attempts.append(1)
            raise RuntimeError("injected crash inside one shard")
        return counted(store_, gen, spec, *a, **k)

    monkeypatch.setattr(stages, "generate_shard", crash_first_shard)
    state, states = run_flow(cfg, expect_success=False)
    assert state.is_failed()
    assert "1 generation shards failed" in state.message
    assert len(attempts) == 2  # retried once (runtime.retries=1), then reported
    failed = [n for n, s in states.items() if n.startswith("generate-") and "Failed" in s]
    assert len(failed) == 1
    new = _shard_manifests(store) - before
    n_shards = sum(1 for n in states if n.startswith("generate-"))
    assert len(new) == n_shards - 1  # every other shard finished and was kept

    monkeypatch.setattr(stages, "generate_shard", counted)
    body_calls.clear()
    result, _ = run_flow(cfg)
    assert body_calls.count("generate_shard") == 1  # only the shard that crashed runs again
    assert len(_shard_manifests(store) - before) == n_shards
    assert verify_store(store) == []


def test_sigkill_during_generation_loses_nothing(tiny_run, tmp_path, monkeypatch):
    import porcelain.generate.sampling as sampling  # closed_set imports sample_images from it at each shard

    cfg = tiny_config(tiny_run[0]["storage"]["url"], generation={"guidance": 2.0, "steps": 12, "shard_size": 4})
    store = Store(cfg["storage"]["url"])
    before = _shard_manifests(store)
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(_write_config(tmp_path, cfg))],
                            cwd=ROOT, env=_cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while len(_shard_manifests(store) - before) < 3:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no shard finished in time"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = _shard_manifests(store) - before
    assert verify_store(store) == []  # no partial or corrupt object is visible

    calls = []
    real = sampling.sample_images
    monkeypatch.setattr(sampling, "sample_images", lambda *a, **k: calls.append(1) or real(*a, **k))
    run_flow(cfg)
    after = _shard_manifests(store) - before
    assert done <= after
    assert len(calls) == len(after) - len(done)  # finished shards were not recomputed
    assert verify_store(store) == []


def test_two_runs_of_one_config_at_once(tiny_run, tmp_path):
    cfg = tiny_config(tiny_run[0]["storage"]["url"], generation={"guidance": 0.25},
                      sweep={"ratios": ["100:0", "80:20"], "seeds": [5]})
    path = _write_config(tmp_path, cfg)
    procs = [subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(path)], cwd=ROOT, env=_cli_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    reports = [next(ln for ln in out.splitlines() if ln.startswith("report:")) for out, _ in outs]
    assert reports[0] == reports[1]
    store = Store(cfg["storage"]["url"])
    assert verify_store(store) == []
    assert not [p for p in store.fs.find(store.root) if ".tmp-" in p]


def test_non_finite_loss_stops_at_once_with_stage_and_step(tiny_run, monkeypatch):
    import porcelain.train.generator as training

    real = training.train_generator
    # A learning rate no config accepts: the weights overflow and the loss turns non-finite.
    monkeypatch.setattr(training, "train_generator", lambda *a, **k: real(*a, **{**k, "lr": 1e30}))
    cfg = tiny_config(tiny_run[0]["storage"]["url"], generator={"train_steps": 41})
    state, states = run_flow(cfg, expect_success=False)
    assert state.is_failed()
    assert states["prepare-closed_set"] == ["Failed"]  # not retried: retrying cannot help
    msg = str(state.result(raise_on_failure=False))
    assert "closed-set generator training" in msg and "step" in msg and "learning rate" in msg


class Proxy:
    def __init__(self, target_port: int):
        self.port, self.target, self.proc = _free_port(), target_port, None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "tcp_proxy.py"), str(self.port), str(self.target)])
        import socket

        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("proxy did not start")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def test_storage_outage_mid_run_retries_and_loses_nothing(tiny_run, moto_server, s3_bucket, body_calls):
    proxy = Proxy(moto_server.port)
    proxy.start()
    cfg = tiny_config(f"{s3_bucket}/runs", runtime={"retries": 4, "retry_delay_seconds": 1})
    cfg["storage"]["endpoint_url"] = f"http://127.0.0.1:{proxy.port}"
    direct = Store(cfg["storage"]["url"], moto_server.storage_options())
    outage = {}

    def cut_storage():
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and not _shard_manifests(direct):
            time.sleep(0.1)
        proxy.kill()
        outage["start"] = time.monotonic()
        time.sleep(5)
        proxy.start()
        outage["end"] = time.monotonic()

    cutter = threading.Thread(target=cut_storage, daemon=True)
    cutter.start()
    try:
        result, states = run_flow(cfg)
        finished = time.monotonic()
        assert outage.get("end") and outage["end"] < finished, "the outage did not happen during the run"
        fresh = Store(cfg["storage"]["url"], {**moto_server.storage_options(), "skip_instance_cache": True})
        n_shards = sum(1 for name in states if name.startswith("generate-"))
        assert n_shards and len(_shard_manifests(fresh)) == n_shards  # every shard landed
        assert verify_store(fresh) == []
        # the outputs are complete: the same config again makes nothing and gives the same report. (A
        # shard whose Prefect result record was being written when storage went away has no cache
        # record: Prefect does not retry that commit. Its task body runs again, finds the shard in the
        # store, content-addressed, and returns it unchanged.)
        made = {k: fresh.read_bytes(k) for k in _shard_manifests(fresh)}
        body_calls.clear()
        again, _ = run_flow(cfg)
        assert set(body_calls) <= {"generate_shard"} and len(body_calls) <= 2, body_calls
        after = Store(cfg["storage"]["url"], {**moto_server.storage_options(), "skip_instance_cache": True})
        assert {k: after.read_bytes(k) for k in _shard_manifests(after)} == made
        assert again["report"] == result["report"]
    finally:
        cutter.join(30)
        proxy.kill()
