"""The generic shard writer: one for every kind; shards grow in place, identically to a fresh run."""

from __future__ import annotations

from porcelain.config import RuntimeConfig
from porcelain.generate.plan import ShardSpec
from porcelain.generate.shards import generate_shard, load_synthetic
from porcelain.results import ModelRef
from porcelain.storage import Store
from tests.fake_kind import SolidConfig

RT = RuntimeConfig(device="cpu", threads=1)
REF = ModelRef(kind="solid", key="m", meta={"tasks": ["a", "b"], "classes": {"a": ["x", "y"], "b": ["u", "v"]}})


def _images(store: Store, key: str) -> list[str]:
    return [im["key"] for im in store.read_json(key)["images"]]


def test_a_grown_shard_keeps_its_images_and_adds_the_ones_a_fresh_run_would_make(tmp_path):
    grown, fresh = Store(str(tmp_path / "a")), Store(str(tmp_path / "b"))
    small = ShardSpec(combo=(1, 0), start=8, count=3, seed=11)
    large = ShardSpec(combo=(1, 0), start=8, count=5, seed=11)
    first = generate_shard(grown, REF, small, SolidConfig(), RT)
    before = _images(grown, first.key)
    second = generate_shard(grown, REF, large, SolidConfig(), RT)
    assert second.key == first.key and second.n == 5
    after = _images(grown, second.key)
    assert after[:3] == before and len(after) == 5
    assert [im["index"] for im in grown.read_json(second.key)["images"]] == [8, 9, 10, 11, 12]
    assert after == _images(fresh, generate_shard(fresh, REF, large, SolidConfig(), RT).key)  # same bytes
    # asking for fewer reads the first images of the larger shard
    x, y = load_synthetic(grown, [first], {(1, 0): 3}, 32)
    assert len(x) == 3 and (y == [1, 0]).all()
    # a different seed is another shard
    assert generate_shard(grown, REF, ShardSpec((1, 0), 8, 3, 12), SolidConfig(), RT).key != first.key


def test_refresh_rewrites_a_shard_and_other_settings_are_other_shards(tmp_path):
    store = Store(str(tmp_path))
    spec = ShardSpec(combo=(0, 1), start=0, count=2, seed=5)
    a = generate_shard(store, REF, spec, SolidConfig(), RT)
    assert generate_shard(store, REF, spec, SolidConfig(size=16), RT).key != a.key
    again = generate_shard(store, REF, spec, SolidConfig(), RuntimeConfig(device="cpu", threads=1, refresh=["shards"]))
    assert again.key == a.key and _images(store, a.key) == _images(store, again.key)  # deterministic kind
