"""Tests of porcelain.data.digits: the few-shot long-tailed digits set, its split, labels and manifest."""

from __future__ import annotations

import csv
import hashlib
from collections import Counter

import numpy as np
import pytest

from porcelain.config import DataConfig, DigitsConfig
from porcelain.data.digits import (
    CLASSES,
    LOOPS,
    SPLITS,
    TASKS,
    DigitsData,
    load_digits_data,
    train_counts,
    write_digits,
)
from porcelain.data.manifest import validate
from porcelain.data.source import BUILTIN, materialize_builtin
from porcelain.errors import ConfigError
from porcelain.storage import Store


@pytest.fixture(scope="module")
def small() -> DigitsData:
    return load_digits_data(size=8, seed=0)


def _digit_counts(data: DigitsData, split: str) -> np.ndarray:
    return np.bincount(data.splits[split][1][:, 0], minlength=10)


def test_api_shapes_and_classes(small):
    assert TASKS == ("digit", "loops", "parity") and small.tasks == TASKS
    assert small.classes == {"digit": [str(d) for d in range(10)], "loops": ["none", "one", "two"],
                             "parity": ["even", "odd"]}
    assert all(small.classes[t] == sorted(small.classes[t]) for t in TASKS)
    total = 0
    for s in SPLITS:
        x, y = small.splits[s]
        assert x.dtype == np.uint8 and x.ndim == 4 and x.shape[1:] == (8, 8, 3)
        assert y.dtype == np.int64 and y.shape == (len(x), 3)
        assert (x[..., 0] == x[..., 1]).all() and (x[..., 1] == x[..., 2]).all()  # grey in RGB
        total += len(x)
    assert total == 1797


def test_dark_digit_on_white_at_size():
    d = load_digits_data(size=32, shots=5, imbalance=1.0, seed=3)
    x = d.splits["train"][0]
    assert x.shape == (50, 32, 32, 3)
    assert np.mean(x == 255) > 0.25 and np.median(x) > 200 and x.min() < 60  # paper white, ink dark
    assert x[:, :, 0].mean() > 200 and x[:, :, -1].mean() > 200  # the side columns are paper


def test_split_is_deterministic_and_seeded(small):
    again = load_digits_data(size=8, seed=0)
    other = load_digits_data(size=8, seed=1)
    for s in SPLITS:
        assert np.array_equal(small.indices[s], again.indices[s])
        assert np.array_equal(small.splits[s][0], again.splits[s][0])
        assert np.array_equal(small.splits[s][1], again.splits[s][1])
    assert not np.array_equal(small.indices["train"], other.indices["train"])
    # the order of digits from common to rare is seeded as well
    order0 = np.argsort(-_digit_counts(small, "train"), kind="stable")
    order1 = np.argsort(-_digit_counts(other, "train"), kind="stable")
    assert not np.array_equal(order0, order1)


def test_train_split_is_long_tailed_as_configured(small):
    counts = _digit_counts(small, "train")
    assert sorted(counts, reverse=True) == train_counts(25, 10.0) == [25, 19, 15, 12, 9, 7, 5, 4, 3, 3]
    assert counts.max() == 25 and 7 <= counts.max() / counts.min() <= 13  # 25/2.5 rounds to 25/3
    assert 95 <= counts.sum() <= 105
    exact = load_digits_data(size=8, shots=40, imbalance=10.0, seed=7)
    c = _digit_counts(exact, "train")
    assert c.max() == 40 and c.min() == 4 and c.max() / c.min() == 10.0
    flat = load_digits_data(size=8, shots=12, imbalance=1.0, seed=7)
    assert (_digit_counts(flat, "train") == 12).all()


def test_val_test_stratified_one_third_two_thirds(small):
    val, test = _digit_counts(small, "val"), _digit_counts(small, "test")
    assert (abs(test - 2 * val) <= 2).all()
    assert abs(len(small.splits["val"][1]) * 3 - (1797 - 102)) <= 10


def test_no_image_in_two_splits(small):
    idx = [set(small.indices[s].tolist()) for s in SPLITS]
    assert not (idx[0] & idx[1]) and not (idx[0] & idx[2]) and not (idx[1] & idx[2])
    assert set().union(*idx) == set(range(1797))
    big = load_digits_data(size=16, seed=0)
    hashes = [{hashlib.sha256(im.tobytes()).hexdigest() for im in big.splits[s][0]} for s in SPLITS]
    assert sum(len(h) for h in hashes) == 1797  # pixel-distinct, hence also distinct across splits


def test_labels_are_consistent(small):
    for s in SPLITS:
        y = small.splits[s][1]
        digit = np.array([int(small.classes["digit"][i]) for i in y[:, 0]])
        loops = [small.classes["loops"][i] for i in y[:, 1]]
        parity = [small.classes["parity"][i] for i in y[:, 2]]
        assert loops == [LOOPS[d] for d in digit]
        assert parity == ["even" if d % 2 == 0 else "odd" for d in digit]
    assert LOOPS[8] == "two" and LOOPS[4] == LOOPS[0] == LOOPS[6] == LOOPS[9] == "one"
    assert {d for d, v in LOOPS.items() if v == "none"} == {1, 2, 3, 5, 7}


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="shots"):
        load_digits_data(shots=0)
    with pytest.raises(ConfigError, match="imbalance"):
        load_digits_data(imbalance=0.5)
    with pytest.raises(ConfigError, match="size"):
        load_digits_data(size=4)


def test_written_manifest_validates_with_the_same_split(tmp_path, small):
    manifest = write_digits(tmp_path / "d", size=8, seed=0)
    with manifest.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "digit", "loops", "parity", "split"]
    ds = validate(str(manifest), str(manifest.parent), min_side=8)
    assert not ds.quarantine and not ds.warnings
    assert ds.n_near_duplicates == 0  # distinct scans are not flagged as near-duplicates across splits
    assert ds.tasks == list(TASKS) and ds.classes == CLASSES
    have = Counter(r.split for r in ds.records)
    assert have == {s: len(small.splits[s][1]) for s in SPLITS}
    assert ds.counts("digit", "train") == _digit_counts(small, "train").tolist()


def test_materialize_builtin_dispatches_and_is_idempotent(tmp_path):
    store = Store(f"memory://digits-{tmp_path.name}")  # no fsync per image: 1797 writes stay fast
    assert BUILTIN == ("sample", "digits")
    cfg = DataConfig(manifest="digits", digits=DigitsConfig(size=8, shots=5, imbalance=5.0, seed=2))
    out = materialize_builtin(store, cfg)
    assert set(out) == {"manifest", "root"} and "/samples/" in out["manifest"]
    assert out["manifest"] == out["root"] + "/manifest.csv"
    again = materialize_builtin(store, cfg)
    assert again == out
    ds = validate(out["manifest"], out["root"], min_images=10, min_side=8)
    assert sorted(ds.counts("digit", "train"), reverse=True) == train_counts(5, 5.0)
    other = materialize_builtin(store, DataConfig(manifest="digits", digits=DigitsConfig(size=8, shots=5, seed=3)))
    assert other["manifest"] != out["manifest"]
    sample = materialize_builtin(store, DataConfig(manifest="sample", sample={"n": 20, "size": 16}))
    assert sample["manifest"].endswith("manifest.csv") and sample["manifest"] != out["manifest"]
    with pytest.raises(ConfigError, match="not a built-in"):
        materialize_builtin(store, DataConfig(manifest="mnist"))


def test_config_defaults():
    d = DataConfig().digits
    assert (d.size, d.shots, d.imbalance, d.seed) == (32, 25, 10.0, 0)
    assert "digits" in DataConfig.model_fields["manifest"].description


def test_cli_sample_data_digits(tmp_path, capsys):
    from flows.cli import main

    assert main(["sample-data", "--dataset", "digits", str(tmp_path / "d"), "--size", "8", "--shots", "10"]) == 0
    manifest = tmp_path / "d" / "manifest.csv"
    assert capsys.readouterr().out.strip() == str(manifest)
    with manifest.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1797 and Counter(r["split"] for r in rows)["train"] == sum(train_counts(10, 10.0))
