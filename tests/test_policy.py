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
    ctx = SimpleNamespace(task=SimpleNamespace(name="t"))
    a, b = RunConfig(), config_from_dict({"storage": {"url": "s3://elsewhere"}, "runtime": {"device": "cpu"}})
    key = content_cache_key(ctx, {"data": {"data_hash": "abc"}, "storage": a.storage, "runtime": a.runtime})
    assert key == content_cache_key(ctx, {"data": {"data_hash": "abc"}, "storage": b.storage, "runtime": b.runtime})
    assert key != content_cache_key(ctx, {"data": {"data_hash": "abd"}, "storage": a.storage, "runtime": a.runtime})


def test_retry_options_follow_the_config():
    opts = retry_options(config_from_dict({"runtime": {"retries": 5, "retry_delay_seconds": 2}}).runtime)
    assert opts["retries"] == 5
    assert opts["retry_delay_seconds"](5) == [2, 4, 8, 16, 32]
    assert retry_options(config_from_dict({"runtime": {"retry_delay_seconds": 0}}).runtime)["retry_delay_seconds"] == 0
