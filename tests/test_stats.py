"""Wilson intervals, vectorised metrics (against torchmetrics/sklearn) and the two-level bootstrap."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import binomtest
from sklearn.metrics import balanced_accuracy_score
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from porcelain.evaluate.metrics import evaluate_predictions
from porcelain.evaluate.stats import (
    VERDICTS,
    bootstrap_mean,
    confusion_matrices,
    mean_ci,
    metric_values,
    paired_bootstrap,
    paired_delta_ci,
    verdict,
    wilson_interval,
    z_quantile,
)

# ---------------------------------------------------------------------------- Wilson


@pytest.mark.parametrize("k,n", [(0, 10), (10, 10), (5, 10), (1, 3), (97, 100), (0, 1), (1, 1), (412, 1136)])
@pytest.mark.parametrize("confidence", [0.95, 0.9])
def test_wilson_matches_scipy(k, n, confidence):
    p, low, high = wilson_interval(k, n, confidence)
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    assert p == pytest.approx(k / n)
    assert low == pytest.approx(ci.low, abs=1e-12)
    assert high == pytest.approx(ci.high, abs=1e-12)
    assert 0.0 <= low <= p <= high <= 1.0


def test_wilson_known_values_and_edges():
    assert wilson_interval(0, 10)[1] == 0.0 and wilson_interval(10, 10)[2] == 1.0
    _, low, high = wilson_interval(5, 10)
    assert (low, high) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(ValueError):
        wilson_interval(11, 10)
    with pytest.raises(ValueError):
        wilson_interval(-1, 10)
    with pytest.raises(ValueError):
        wilson_interval(1, 10, confidence=1.0)


def test_z_quantile():
    assert z_quantile(0.975) == pytest.approx(1.959964, abs=1e-6)
    assert z_quantile(0.8) == pytest.approx(0.841621, abs=1e-6)


# ---------------------------------------------------------------------------- vectorised metrics


def _torch_metrics(pred, target, c):
    p, y = torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(target.astype(np.int64))
    return {
        "accuracy": float(MulticlassAccuracy(num_classes=c, average="micro")(p, y)),
        "macro_f1": float(MulticlassF1Score(num_classes=c, average="macro")(p, y)),
        "per_class": MulticlassF1Score(num_classes=c, average=None)(p, y).numpy().astype(np.float64),
        "macro_acc": float(MulticlassAccuracy(num_classes=c, average="macro")(p, y)),
    }


def _random_case(rng, c, n):
    """Random labels/predictions; some classes absent from targets, predictions or both."""
    absent_t = rng.choice(c, size=rng.integers(0, c // 2 + 1), replace=False)
    absent_p = rng.choice(c, size=rng.integers(0, c // 2 + 1), replace=False)
    allowed_t = np.setdiff1d(np.arange(c), absent_t)
    allowed_p = np.setdiff1d(np.arange(c), absent_p)
    target = rng.choice(allowed_t, size=n)
    guess = rng.choice(allowed_p, size=n)
    correct = (rng.random(n) < rng.uniform(0.2, 0.9)) & np.isin(target, allowed_p)
    return np.where(correct, target, guess), target


@pytest.mark.parametrize("case", range(25))
def test_metrics_match_torchmetrics(case):
    rng = np.random.default_rng(case)
    c = int(rng.integers(2, 9))
    n = int(rng.integers(1, 200))
    pred, target = _random_case(rng, c, n)
    ref = _torch_metrics(pred, target, c)
    assert metric_values(pred, target, c, "accuracy") == pytest.approx(ref["accuracy"], abs=1e-6)
    assert metric_values(pred, target, c, "macro_f1") == pytest.approx(ref["macro_f1"], abs=1e-6)
    present = (np.bincount(target, minlength=c) + np.bincount(pred, minlength=c)) > 0
    minority = [int(k) for k in rng.choice(c, size=rng.integers(1, c + 1), replace=False)]
    chosen = [k for k in minority if present[k]]
    expected = float(np.mean(ref["per_class"][chosen])) if chosen else float("nan")
    got = metric_values(pred, target, c, "minority_macro_f1", minority=minority)
    assert got == pytest.approx(expected, abs=1e-6, nan_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about classes only in the predictions
        bal = balanced_accuracy_score(target, pred)
    assert metric_values(pred, target, c, "balanced_accuracy") == pytest.approx(bal, abs=1e-9)
    if set(pred) <= set(target):  # then torchmetrics' macro accuracy is the balanced accuracy too
        assert metric_values(pred, target, c, "balanced_accuracy") == pytest.approx(ref["macro_acc"], abs=1e-6)


def test_metrics_match_evaluate_predictions():
    rng = np.random.default_rng(7)
    c, n = 5, 300
    pred, target = _random_case(rng, c, n)
    counts = [100, 60, 30, 10, 5]
    m = evaluate_predictions([pred], target[:, None], ["t"], [c], [counts])["per_task"]["t"]
    minority = m["minority_classes"]
    assert metric_values(pred, target, c, "accuracy") == pytest.approx(m["accuracy"], abs=1e-6)
    assert metric_values(pred, target, c, "macro_f1") == pytest.approx(m["macro_f1"], abs=1e-6)
    assert metric_values(pred, target, c, "minority_macro_f1", minority) == pytest.approx(
        m["minority_macro_f1"], abs=1e-6, nan_ok=True)


def test_batched_metrics_equal_one_by_one():
    rng = np.random.default_rng(3)
    c, n, b = 6, 150, 40
    pred, target = _random_case(rng, c, n)
    index = rng.integers(0, n, size=(b, n))
    cms = confusion_matrices(pred, target, c, index)
    assert cms.shape == (b, c, c) and (cms.sum(axis=(1, 2)) == n).all()
    for metric in ("accuracy", "macro_f1", "minority_macro_f1", "balanced_accuracy"):
        batch = metric_values(pred, target, c, metric, minority=[4, 5], index=index)
        one = [metric_values(pred[i], target[i], c, metric, minority=[4, 5]) for i in index]
        np.testing.assert_allclose(batch, one, rtol=0, atol=1e-12, equal_nan=True)


def test_metrics_validate_inputs():
    with pytest.raises(ValueError, match="unknown metric"):
        metric_values(np.array([0]), np.array([0]), 2, "auc")
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        metric_values(np.array([2]), np.array([0]), 2, "accuracy")
    with pytest.raises(ValueError, match="minority"):
        metric_values(np.array([0]), np.array([0]), 2, "minority_macro_f1")
    with pytest.raises(ValueError, match="predictions for"):
        metric_values(np.array([0, 1]), np.array([0]), 2, "accuracy")


# ---------------------------------------------------------------------------- bootstrap


def _runs(rng, target, c, accuracy, n_seeds):
    """Runs that are right on about ``accuracy`` of the images, else a random wrong class."""
    out = []
    for _ in range(n_seeds):
        wrong = (target + rng.integers(1, c, target.size)) % c
        out.append(np.where(rng.random(target.size) < accuracy, target, wrong))
    return out


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1", "balanced_accuracy", "minority_macro_f1"])
def test_identical_arms_give_zero(metric):
    rng = np.random.default_rng(0)
    c, n = 4, 400
    target = rng.integers(0, c, n)
    runs = _runs(rng, target, c, 0.6, 3)
    r = paired_bootstrap(runs, runs, target, c, metric, minority=[2, 3], n_boot=500)
    assert r["delta"] == 0.0 and r["low"] == 0.0 and r["high"] == 0.0 and r["se"] == 0.0
    assert r["per_seed"] == [0.0, 0.0, 0.0]
    assert r["base"] == r["new"]
    assert verdict(r) == "no clear difference"


def test_strictly_better_arm():
    rng = np.random.default_rng(1)
    c, n = 5, 1000
    target = rng.integers(0, c, n)
    base, new = [], []
    for _ in range(3):
        order = rng.permutation(n)
        b = (target + 1) % c  # wrong everywhere ...
        b[order[:500]] = target[order[:500]]  # ... except on 50 % of the images
        nw = b.copy()
        nw[order[500:700]] = target[order[500:700]]  # right on 20 % more images
        base.append(b)
        new.append(nw)
    r = paired_bootstrap(base, new, target, c, "accuracy", n_boot=1000)
    assert r["delta"] == pytest.approx(0.2)
    assert r["per_seed"] == pytest.approx([0.2, 0.2, 0.2])
    assert 0.0 < r["low"] < 0.2 < r["high"] < 0.3
    assert r["base"][0] == pytest.approx(0.5) and r["new"][0] == pytest.approx(0.7)
    assert verdict(r) == "better"
    assert verdict(r, min_effect=0.25) != "better"
    swapped = paired_bootstrap(new, base, target, c, "accuracy", n_boot=1000)
    assert swapped["delta"] == pytest.approx(-0.2) and swapped["high"] < 0
    assert verdict(swapped) == "worse"
    f1 = paired_bootstrap(base, new, target, c, "macro_f1", n_boot=1000)
    assert f1["low"] > 0


@pytest.mark.parametrize("n_seeds", [1, 3])
def test_bounded_intervals(n_seeds):
    rng = np.random.default_rng(2)
    c, n = 3, 30
    target = rng.integers(0, c, n)
    near_perfect = _runs(rng, target, c, 0.97, n_seeds)
    near_zero = _runs(rng, target, c, 0.03, n_seeds)
    for metric in ("accuracy", "macro_f1", "balanced_accuracy"):
        r = paired_bootstrap(near_zero, near_perfect, target, c, metric, n_boot=1000)
        for lo_hi in (r["base"], r["new"]):
            assert 0.0 <= lo_hi[1] <= lo_hi[2] <= 1.0
        assert -1.0 <= r["low"] <= r["delta"] <= r["high"] <= 1.0
        for runs in (near_perfect, near_zero):
            mean, low, high = bootstrap_mean(runs, target, c, metric, n_boot=1000)
            assert 0.0 <= low <= high <= 1.0


def test_deterministic_for_a_seed():
    rng = np.random.default_rng(4)
    c, n = 4, 200
    target = rng.integers(0, c, n)
    a, b = _runs(rng, target, c, 0.5, 3), _runs(rng, target, c, 0.6, 3)
    r1 = paired_bootstrap(a, b, target, c, "macro_f1", n_boot=300, seed=5)
    r2 = paired_bootstrap(a, b, target, c, "macro_f1", n_boot=300, seed=5)
    r3 = paired_bootstrap(a, b, target, c, "macro_f1", n_boot=300, seed=6)
    assert r1 == r2
    assert (r1["low"], r1["high"]) != (r3["low"], r3["high"])
    assert r1["delta"] == r3["delta"]
    assert bootstrap_mean(a, target, c, "accuracy", seed=1) == bootstrap_mean(a, target, c, "accuracy", seed=1)


def test_small_test_set_is_wider():
    rng = np.random.default_rng(5)
    c = 3
    out = {}
    for n in (20, 2000):
        target = rng.integers(0, c, n)
        out[n] = paired_bootstrap(_runs(rng, target, c, 0.6, 3), _runs(rng, target, c, 0.65, 3),
                                  target, c, "accuracy", n_boot=1000)
    assert out[20]["high"] - out[20]["low"] > 2 * (out[2000]["high"] - out[2000]["low"])
    assert out[20]["mde"] > 2 * out[2000]["mde"]
    assert out[20]["mde"] == pytest.approx((1.959964 + 0.841621) * out[20]["se"], rel=1e-5)
    assert verdict(out[20]) == "too wide to conclude"
    assert out[2000]["mde"] < 0.10


def test_seed_variation_widens_the_interval():
    """Seed-to-seed differences are part of the interval, not only test-set noise."""
    rng = np.random.default_rng(8)
    c, n = 4, 2000
    target = rng.integers(0, c, n)
    base = _runs(rng, target, c, 0.6, 3)
    steady = [np.where(rng.random(n) < 0.5, b, target) for b in base]  # +~0.2 on every seed
    wobbly = [np.where(rng.random(n) < q, b, target) for b, q in zip(base, [0.95, 0.5, 0.1])]
    r_steady = paired_bootstrap(base, steady, target, c, "accuracy", n_boot=1000)
    r_wobbly = paired_bootstrap(base, wobbly, target, c, "accuracy", n_boot=1000)
    assert r_wobbly["high"] - r_wobbly["low"] > 3 * (r_steady["high"] - r_steady["low"])


def test_coverage_single_seed():
    """Percentile interval of a paired accuracy difference covers the true one ~95 % of the time."""
    rng = np.random.default_rng(9)
    c, n, sims = 3, 300, 200
    # joint (base right, new right) probabilities: true accuracies .70 and .75, difference .05
    probs = {(1, 1): 0.60, (1, 0): 0.10, (0, 1): 0.15, (0, 0): 0.15}
    keys = list(probs)
    covered = 0
    for i in range(sims):
        target = rng.integers(0, c, n)
        kind = rng.choice(len(keys), size=n, p=list(probs.values()))
        wrong = (target + 1) % c
        base = np.where(np.array([keys[k][0] for k in kind]) == 1, target, wrong)
        new = np.where(np.array([keys[k][1] for k in kind]) == 1, target, wrong)
        r = paired_bootstrap([base], [new], target, c, "accuracy", n_boot=400, seed=i)
        covered += r["low"] <= 0.05 <= r["high"]
    assert 0.88 <= covered / sims <= 0.99


def test_minority_nan_replicates_are_dropped():
    c = 3
    target = np.array([0] * 38 + [2, 2])  # the minority class 2 is rare: some resamples lack it
    base = [target.copy()]
    new = [np.where(target == 2, 0, target)]
    r = paired_bootstrap(base, new, target, c, "minority_macro_f1", minority=[2], n_boot=2000)
    assert r["delta"] == pytest.approx(-1.0)
    assert r["n_valid"] < r["n_boot"] and r["n_valid"] > 0.8 * r["n_boot"]  # P(no class 2) = .95^40 = .13
    assert r["low"] == pytest.approx(-1.0) and r["high"] == pytest.approx(-1.0)


def test_bootstrap_validates_inputs():
    t = np.array([0, 1, 0])
    p = np.array([0, 1, 1])
    with pytest.raises(ValueError, match="same number of runs"):
        paired_bootstrap([p, p], [p], t, 2, "accuracy")
    with pytest.raises(ValueError, match="predictions for"):
        paired_bootstrap([p], [p[:2]], t, 2, "accuracy")
    with pytest.raises(ValueError, match="n_boot"):
        paired_bootstrap([p], [p], t, 2, "accuracy", n_boot=1)
    with pytest.raises(ValueError, match="unknown metric"):
        bootstrap_mean([p], t, 2, "auc")


def test_verdict_wording():
    assert set(VERDICTS) == {"better", "worse", "no clear difference", "too wide to conclude"}
    assert verdict({"low": 0.01, "high": 0.3, "mde": 0.2}) == "better"  # wide but clearly above 0
    assert verdict({"low": -0.3, "high": -0.01, "mde": 0.2}) == "worse"
    assert verdict({"low": -0.02, "high": 0.03, "mde": 0.04}) == "no clear difference"
    assert verdict({"low": -0.2, "high": 0.2, "mde": 0.3}) == "too wide to conclude"
    assert verdict({"low": -0.2, "high": 0.2, "mde": 0.3}, max_mde=0.5) == "no clear difference"
    assert verdict({"low": float("nan"), "high": float("nan"), "mde": float("nan")}) == "too wide to conclude"


def test_student_t_helpers_still_work():
    mean, low, high = mean_ci([0.1, 0.2, 0.3])
    assert mean == pytest.approx(0.2) and low < 0.2 < high
    d, lo, hi = paired_delta_ci([0.3, 0.4, 0.5], [0.1, 0.2, 0.3])
    assert d == pytest.approx(0.2) and lo == pytest.approx(0.2) and hi == pytest.approx(0.2)


def test_best_setting_per_kind_is_chosen_on_val_not_test():
    from porcelain.evaluate.selection import best_on_val

    def run(arm, syn, seed, val, test):
        return {"arm": arm, "ratio": "1:1", "synthesizer": syn, "seed": seed, "best_val_macro_f1": val,
                "macro_f1": test}

    runs = [run("100:0", None, s, 0.80, 0.80) for s in (0, 1)]
    runs += [run("mix_s03 1:1", "mix_s03", s, v, 0.99) for s, v in ((0, 0.81), (1, 0.83))]  # best on test only
    runs += [run("mix_s07 1:1", "mix_s07", s, v, 0.70) for s, v in ((0, 0.86), (1, 0.84))]  # best on val
    runs += [run("closed_set 1:1", "closed_set", s, 0.79, 0.9) for s in (0, 1)]
    runs += [{**run("real 50%", None, 0, 0.99, 0.99), "real_fraction": 0.5}]  # a learning-curve point: never chosen
    kinds = {"mix_s03": "sgd_mix", "mix_s07": "sgd_mix", "closed_set": "closed_set"}
    best = best_on_val(runs, kinds, "100:0")
    assert set(best) == {"sgd_mix", "closed_set"}
    assert best["sgd_mix"]["arm"] == "mix_s07 1:1" and best["sgd_mix"]["val_macro_f1"] == pytest.approx(0.85)
    assert best["sgd_mix"]["candidates"] == pytest.approx({"mix_s03 1:1": 0.82, "mix_s07 1:1": 0.85})
    assert best["sgd_mix"]["baseline_val_macro_f1"] == pytest.approx(0.80) and best["sgd_mix"]["n_seeds"] == 2
    assert best["closed_set"]["arm"] == "closed_set 1:1"
    # equal val scores: the first arm in alphabetical order, whatever the order of the runs
    tie = [run("b 1:1", "b", 0, 0.9, 0), run("a 1:1", "a", 0, 0.9, 0)]
    assert best_on_val(tie, {"a": "k", "b": "k"}, "100:0")["k"]["arm"] == "a 1:1"
