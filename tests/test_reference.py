"""The reference classifier, label faithfulness, memorisation and the report's refusal to give verdicts
it cannot back, on a small real dataset (the digits scans at 16 px) without Prefect."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest

from porcelain.config import (
    ClassifierConfig,
    DataConfig,
    FaithfulnessConfig,
    GenerationConfig,
    ReferenceConfig,
    RuntimeConfig,
    config_from_dict,
)
from porcelain.data.images import encode_png
from porcelain.data.ingest import ingest_dataset, load_split, pack_data_shard
from porcelain.data.source import materialize_builtin
from porcelain.evaluate.judging import measure_faithfulness, memorisation
from porcelain.evaluate.reference import holdout_mask, load_reference, train_reference
from porcelain.generate.targeting import plan_generation
from porcelain.report.build import build_report, chance_macro_f1
from porcelain.storage import Store
from porcelain.train.sweep import train_and_evaluate

SIZE = 16
RT = RuntimeConfig(device="cpu", threads=1)
REF = ReferenceConfig(model="small_cnn", steps=150, eval_every=25, patience=None)
CLS = ClassifierConfig(model="small_cnn", image_size=SIZE, steps=100, eval_every=25)


def _dataset(root, scramble: bool) -> tuple[Store, dict]:
    """The digits set in a store; with ``scramble``, the labels of every row are those of another row."""
    store = Store(str(root))
    src = materialize_builtin(store, DataConfig(manifest="digits", digits={"size": SIZE, "shots": 12}))
    manifest = src["manifest"]
    if scramble:
        text = store.read_bytes(manifest.removeprefix(store.root + "/")).decode()
        rows = list(csv.DictReader(io.StringIO(text)))
        perm = np.random.default_rng(0).permutation(len(rows))
        tasks = ("digit", "loops", "parity")
        shuffled = [{**r, **{t: rows[int(j)][t] for t in tasks}} for r, j in zip(rows, perm)]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(shuffled)
        manifest = store.uri(manifest.removeprefix(store.root + "/").replace("manifest.csv", "scrambled.csv"))
        store.write_bytes(manifest.removeprefix(store.root + "/"), buf.getvalue().encode())
    data = ingest_dataset(store, manifest, src["root"], min_images=10)
    for i in range(data["n_shards"]):
        pack_data_shard(store, data["data_hash"], i, data["n_shards"], SIZE)
    return store, data


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    store, data = _dataset(tmp_path_factory.mktemp("real"), scramble=False)
    return store, data, train_reference(store, data, REF, SIZE, RT)


@pytest.fixture(scope="module")
def scrambled(tmp_path_factory):
    store, data = _dataset(tmp_path_factory.mktemp("scrambled"), scramble=True)
    return store, data, train_reference(store, data, REF, SIZE, RT)


def _fake_shard(store: Store, combo: list[int], images: np.ndarray, start: int = 0) -> dict:
    """A shard manifest holding the given images as if generated for ``combo``."""
    objects = [store.put_object(encode_png(im), "png") for im in images]
    key = f"synthetic/test/shards/{'-'.join(map(str, combo))}-{start}.json"
    store.write_json(key, {"images": [{"key": k, "index": start + i} for i, k in enumerate(objects)],
                           "provenance": {"combo": combo}})
    return {"key": key, "n": len(objects), "combo": combo, "start": start}


def _shards_of(store: Store, data: dict, split: str) -> list[dict]:
    x, y = load_split(store, data["data_hash"], SIZE, data["n_shards"], split)
    shards = []
    for combo in sorted({tuple(r) for r in y.tolist()}):
        m = np.all(y == np.asarray(combo), axis=1)
        shards.append(_fake_shard(store, list(combo), x[m][:6]))
    return shards


def test_holdout_takes_a_share_of_every_combination_with_two_or_more_images():
    labels = np.array([[0]] * 8 + [[1]] * 2 + [[2]])
    m = holdout_mask(labels, 0.25, seed=0)
    assert m[:8].sum() == 2 and m[8:10].sum() == 1 and not m[10]
    assert (holdout_mask(labels, 0.25, seed=0) == m).all()


def test_reference_is_validated_stored_and_reloads(real):
    store, data, card = real
    assert card["trained_on"] == "val" and card["n_fit"] + card["n_stop"] == data["counts"]["val"]
    assert 1 <= card["selected_step"] <= card["steps"] <= 150
    for task in ("digit", "loops", "parity"):
        t = card["test"][task]
        assert t["usable"] and t["balanced_accuracy"] >= 0.8, (task, t)
        assert sum(t["support"].values()) == data["counts"]["test"]
    model = load_reference(store, card)
    from porcelain.train.classifier import predict

    x, y = load_split(store, data["data_hash"], SIZE, data["n_shards"], "test")
    acc = float((predict(model, x)[0] == y[:, 0]).mean())
    assert acc == pytest.approx(card["test"]["digit"]["accuracy"])


def test_faithfulness_of_real_images_is_high_and_of_mislabelled_ones_low(real):
    store, data, card = real
    shards = _shards_of(store, data, "test")
    good = measure_faithfulness(store, data, shards, card, FaithfulnessConfig(threshold=0.8), RT)
    assert good["faithfulness"]["digit"]["share"] >= 0.8 and good["passed"] is True
    f = good["faithfulness"]["digit"]
    assert 0 <= f["low"] < f["share"] < f["high"] <= 1 and f["n"] == good["n_images"]
    # the same images "generated" for the next digit: the reference disagrees
    x, y = load_split(store, data["data_hash"], SIZE, data["n_shards"], "test")
    wrong = []
    for i, combo in enumerate(sorted({tuple(r) for r in y.tolist()})):
        m = np.all(y == np.asarray(combo), axis=1)
        wrong.append(_fake_shard(store, [(combo[0] + 1) % 10, combo[1], combo[2]], x[m][:6], start=200 + 10 * i))
    bad = measure_faithfulness(store, data, wrong, card, FaithfulnessConfig(), RT)
    assert bad["faithfulness"]["digit"]["share"] <= 0.2 and bad["passed"] is False
    # set-level distance: a subset of the test split "generated" is nearer to the test split than the
    # real train split is (the floor; the reference trained on val, so neither side was fitted);
    # relabelled, each digit's images are another digit's: the per-value distances grow
    q, qb = good["set_quality"], bad["set_quality"]
    assert q["floor_pair"] == "train vs test" and "reference classifier" in q["extractor"]
    assert 0 <= q["synthetic"]["overall"]["fid"] < q["floor"]["overall"]["fid"]
    same = [d["fid"] for d in q["synthetic"]["per_value"]["digit"].values() if d["fid"] is not None]
    moved = [d["fid"] for d in qb["synthetic"]["per_value"]["digit"].values() if d["fid"] is not None]
    assert len(same) == len(moved) == 10 and np.median(moved) > 3 * np.median(same)


def test_a_reference_trained_on_scrambled_labels_is_not_measurable(scrambled):
    store, data, card = scrambled
    assert not any(card["test"][t]["usable"] for t in ("digit", "loops", "parity")), card["test"]
    faith = measure_faithfulness(store, data, _shards_of(store, data, "test"), card, FaithfulnessConfig(), RT)
    for t in ("digit", "loops", "parity"):
        assert "below the floor" in faith["faithfulness"][t]["not_measurable"]
    assert faith["passed"] is None and faith["meets_target"] == {}


def test_copies_of_training_images_are_flagged_as_memorised(real):
    store, data, _ = real
    train_x, _ = load_split(store, data["data_hash"], SIZE, data["n_shards"], "train")
    test_x, _ = load_split(store, data["data_hash"], SIZE, data["n_shards"], "test")
    copies = memorisation(train_x, train_x, test_x)
    assert copies["generated_median"] == 0.0 and copies["near_copy_share"] == 1.0
    fresh = memorisation(test_x[:100], train_x, test_x[100:])
    assert 0.5 < fresh["ratio"] < 2.0 and fresh["near_copy_share"] < 0.1


def test_chance_macro_f1_is_what_a_label_blind_predictor_scores():
    from porcelain.evaluate.stats import metric_values

    y = np.array([0] * 80 + [1] * 20)
    constant = metric_values(np.zeros(100, np.int64), y, 2, "macro_f1")
    rng = np.random.default_rng(0)
    uniform = np.mean([metric_values(rng.integers(0, 2, 100), y, 2, "macro_f1") for _ in range(300)])
    assert chance_macro_f1(y, 2) == pytest.approx(max(constant, uniform), abs=0.02)
    y10 = np.repeat(np.arange(10), 50)
    assert 0.09 < chance_macro_f1(y10, 10) < 0.11


def _report(store: Store, data: dict, runs: list[dict]) -> str:
    cfg = config_from_dict({"sweep": {"ratios": ["100:0", "90:10"], "seeds": [0]},
                            "classifier": CLS.model_dump()})
    plan = plan_generation(store, data, cfg.sweep, GenerationConfig(), [])
    summary = {"config": cfg.model_dump(mode="json"), "data": data, "plan": plan, "models": {},
               "shards": {}, "faithfulness": {}, "runs": runs}
    return store.read_bytes(build_report(store, summary)["report"]).decode()


def _sweep(store: Store, data: dict) -> list[dict]:
    # "90:10" here gets no synthetic images: the comparison machinery, not synthesis, is under test
    return [train_and_evaluate(store, data, r, s, {"alloc": [], "shards": []}, CLS, RT)
            for r in ("100:0", "90:10") for s in (0,)]


def test_a_classifier_trained_on_scrambled_labels_gets_no_verdict(scrambled):
    store, data, _ = scrambled
    runs = _sweep(store, data)
    assert {r["steps"] for r in runs} == {100}
    md = _report(store, data, runs)
    for t in ("digit", "loops", "parity"):
        assert f"Classifier did not learn `{t}`" in md
        assert f"| 90:10 | {t} |" in md
    rows = [r for r in md.split("## Does synthetic data help?")[1].split("## ")[0].splitlines() if r.startswith("| 90:10")]
    assert len(rows) == 3 and all(r.endswith("| not compared: classifier did not learn this task |") for r in rows)


def test_a_classifier_that_learned_gets_a_verdict_with_a_detectable_difference(real):
    store, data, _ = real
    runs = _sweep(store, data)
    md = _report(store, data, runs)
    assert "Classifier did not learn `digit`" not in md
    rows = [r for r in md.split("## Does synthetic data help?")[1].split("## ")[0].splitlines() if r.startswith("| 90:10")]
    # identical training (no synthetic images): zero difference, and a verdict rather than a refusal
    digit = next(r for r in rows if r.startswith("| 90:10 | digit |"))
    assert "| +0.000 [+0.000, +0.000] |" in digit and digit.endswith("| no clear difference |")
    assert not any("not compared" in r for r in rows)
    assert "## Training budget" in md and "| 100:0 | 0 |" in md


def test_a_reloaded_reference_predicts_in_the_datasets_task_order_not_the_cards_key_order(real):
    """card.json is written with sorted keys; predictions must still follow the dataset's task order
    (the sample's dynasty, kiln, glaze, type is not alphabetical: kiln and glaze were swapped)."""
    import porcelain.evaluate.reference as reference
    from porcelain.train.classifier import predict

    store, data, card = real
    x, y = load_split(store, data["data_hash"], SIZE, data["n_shards"], "test")
    order = ["parity", "digit", "loops"]  # a non-alphabetical task order
    reference._LOADED.clear()
    model = load_reference(store, {**card, "tasks": order})
    reference._LOADED.clear()
    assert list(model.task_names) == order
    pred = predict(model, x)
    for i, task in enumerate(order):
        acc = float((pred[i] == y[:, data["tasks"].index(task)]).mean())
        assert acc == pytest.approx(card["test"][task]["accuracy"]), task
