from types import SimpleNamespace

import pytest

from porcelain.config import RunConfig, config_from_dict
from porcelain.errors import ConfigError, DataError, NonFiniteLossError, WeightsError
from tasks.policy import content_cache_key, retry_options, retry_unless_deterministic


def _state(exc):
    return SimpleNamespace(result=lambda raise_on_failure=False: exc)


@pytest.mark.parametrize("exc", [DataError("bad"), ConfigError("bad"), WeightsError("bad"),
                                 NonFiniteLossError("stage", 3, float("nan")),
                                 TypeError("UNet2DModel got an unexpected keyword 'atention'"),
                                 ValueError("patch_size 3 does not divide resolution 32")])
def test_deterministic_errors_are_not_retried(exc):
    assert retry_unless_deterministic(None, None, _state(exc)) is False


@pytest.mark.parametrize("exc", [OSError("connection refused"), RuntimeError("CUDA out of memory"), TimeoutError()])
def test_transient_errors_are_retried(exc):
    assert retry_unless_deterministic(None, None, _state(exc)) is True


def test_cache_key_ignores_where_and_how_but_not_what():
    ctx = SimpleNamespace(task=SimpleNamespace(name="train-evaluate"))
    a, b = RunConfig(), config_from_dict({"storage": {"url": "s3://elsewhere"}, "runtime": {"device": "cpu"}})
    key = content_cache_key(ctx, {"data": {"data_hash": "abc"}, "storage": a.storage, "runtime": a.runtime})
    assert key == content_cache_key(ctx, {"data": {"data_hash": "abc"}, "storage": b.storage, "runtime": b.runtime})
    assert key != content_cache_key(ctx, {"data": {"data_hash": "abd"}, "storage": a.storage, "runtime": a.runtime})


def test_retry_options_follow_the_config():
    opts = retry_options(config_from_dict({"runtime": {"retries": 5, "retry_delay_seconds": 2}}).runtime)
    assert opts["retries"] == 5
    assert opts["retry_delay_seconds"](5) == [2, 4, 8, 16, 32]
    assert retry_options(config_from_dict({"runtime": {"retry_delay_seconds": 0}}).runtime)["retry_delay_seconds"] == 0


def _ctx(name):
    return SimpleNamespace(task=SimpleNamespace(name=name))


def test_cache_key_holds_the_numerics_of_the_runtime_not_its_threads():
    a = config_from_dict({"runtime": {"device": "cpu", "dtype": "fp32", "threads": 1}}).runtime
    b = config_from_dict({"runtime": {"device": "cpu", "dtype": "fp32", "threads": 2, "workers": 2}}).runtime
    c = config_from_dict({"runtime": {"device": "cpu", "dtype": "bf16"}}).runtime
    keys = [content_cache_key(_ctx("train-evaluate"), {"data": {"data_hash": "abc"}, "runtime": r}) for r in (a, b, c)]
    assert keys[0] == keys[1] != keys[2]


def test_cache_key_holds_a_weights_file_by_content_not_by_path(tmp_path):
    from porcelain.config import ClassifierConfig

    w = tmp_path / "w.safetensors"
    w.write_bytes(b"one")
    moved = tmp_path / "elsewhere.safetensors"
    moved.write_bytes(b"one")

    def key(path):
        return content_cache_key(_ctx("train-evaluate"), {"classifier": ClassifierConfig(weights=str(path))})

    first = key(w)
    assert key(moved) == first  # moving the file does not recompute
    w.write_bytes(b"two")  # replacing it does (no stale hit)
    import os
    os.utime(w, (1, 1))
    assert key(w) != first


def test_a_stage_version_changes_the_keys_of_that_stage_only(monkeypatch):
    import dataclasses

    from porcelain import versions

    params = {"data": {"data_hash": "abc"}}
    before = {n: content_cache_key(_ctx(n), params) for n in ("train-evaluate", "report", "ingest")}
    monkeypatch.setitem(versions.STAGES, "report", dataclasses.replace(versions.STAGES["report"], version="99"))
    after = {n: content_cache_key(_ctx(n), params) for n in before}
    assert after["report"] != before["report"]
    assert after["train-evaluate"] == before["train-evaluate"] and after["ingest"] == before["ingest"]
