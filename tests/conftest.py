"""Shared fixtures: offline environment, one Prefect test server per session, an S3 server (moto)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_HOME", str(ROOT / ".prefect"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# Fake credentials for the local S3 server; never real ones.
for _k, _v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}.items():
    os.environ[_k] = _v


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for the whole session (each start costs 6–18 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """``moto_server`` as a subprocess on 127.0.0.1: start, stop (by pid) and restart on the same port."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
        if exe is None:
            raise RuntimeError("moto_server is not installed: pip install 'moto[server]'")
        self.exe = exe
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([self.exe, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("moto_server did not start within 30 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def storage_options(self) -> dict:
        return {"client_kwargs": {"endpoint_url": self.endpoint}}


@pytest.fixture(scope="session")
def moto_server():
    server = MotoServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(moto_server, request):
    """A fresh bucket on the local S3 server; yields its s3:// URL."""
    import s3fs

    fs = s3fs.S3FileSystem(**moto_server.storage_options())
    name = "b-" + request.node.name.lower().replace("_", "-")[:40].strip("-") + f"-{os.getpid()}"
    name = "".join(c for c in name if c.isalnum() or c == "-")[:60]
    fs.mkdir(name)
    yield f"s3://{name}"


@pytest.fixture
def body_calls(monkeypatch):
    """Counts the library calls made by task bodies (each task body calls exactly one)."""
    import tasks.stages as stages

    from tests.flowkit import STAGE_FUNCTIONS

    calls: list[str] = []
    for name in STAGE_FUNCTIONS:
        fn = getattr(stages, name)

        def wrapper(*a, __fn=fn, __name=name, **k):
            calls.append(__name)
            return __fn(*a, **k)

        monkeypatch.setattr(stages, name, wrapper)
    return calls




@pytest.fixture(scope="session")
def tiny_run(prefect_harness, tmp_path_factory):
    """The whole flow once on a tiny config in a local store, shared by the flow and fault tests."""
    from tests.flowkit import run_flow, tiny_config

    from tests.flowkit import LAST_RUN

    cfg = tiny_config(str(tmp_path_factory.mktemp("store") / "runs"))
    result, states = run_flow(cfg)
    result = {**result, "flow_run_id": LAST_RUN["id"]}
    return cfg, result, states
