"""Metrics (hand-computed and against scikit-learn), minority classes and confidence intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from porcelain.evaluate.metrics import evaluate_predictions, imbalance_ratio, minority_classes
from porcelain.evaluate.stats import _t_ppf_fallback, mean_ci, paired_delta_ci, t_quantile

# ---------------------------------------------------------------------------- metrics


def test_hand_computed_single_task():
    labels = np.array([[0], [0], [1], [1], [2], [2]])
    preds = [np.array([0, 1, 1, 1, 0, 2])]
    # class 0: tp1 fp1 fn1 -> F1 .5; class 1: tp2 fp1 fn0 -> P 2/3, R 1, F1 .8;
    # class 2: tp1 fp0 fn1 -> P 1, R .5, F1 2/3; class 3 absent from preds and targets.
    out = evaluate_predictions(preds, labels, ["glaze"], [4], [[50, 20, 5, 1]])
    m = out["per_task"]["glaze"]
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class_f1"] == pytest.approx([0.5, 0.8, 2 / 3, 0.0])
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)  # the absent class is left out
    assert m["absent_classes"] == [3]
    assert m["support"] == [2, 2, 2, 0]
    # training counts [50, 20, 5, 1]: median 12.5 -> minority classes 2 and 3; 3 is absent here.
    assert m["minority_classes"] == [2, 3]
    assert m["minority_macro_f1"] == pytest.approx(2 / 3)
    assert m["imbalance_ratio"] == pytest.approx(50.0)
    assert out["mean"]["accuracy"] == pytest.approx(4 / 6)


def test_matches_sklearn_on_random_multitask_data():
    rng = np.random.default_rng(0)
    n, num_classes = 300, [4, 5, 3]
    labels = np.stack([rng.integers(0, c, n) for c in num_classes], axis=1)
    # predictions right ~60% of the time, never predicting the last class of task 1
    preds = [np.where(rng.random(n) < 0.6, labels[:, t], rng.integers(0, c - (t == 1), n))
             for t, c in enumerate(num_classes)]
    counts = [[100, 50, 30, 10], [80, 60, 40, 20, 5], [10, 10, 10]]
    out = evaluate_predictions(preds, labels, ["a", "b", "c"], num_classes, counts)
    for t, task in enumerate(["a", "b", "c"]):
        m = out["per_task"][task]
        y, p = labels[:, t], preds[t]
        present = np.union1d(y, p)
        assert m["accuracy"] == pytest.approx(accuracy_score(y, p))
        assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro", labels=present))
        per = f1_score(y, p, average=None, labels=np.arange(num_classes[t]), zero_division=0)
        assert m["per_class_f1"] == pytest.approx(per.tolist())
        minority = m["minority_classes"]
        assert m["minority_macro_f1"] == pytest.approx(f1_score(y, p, average="macro", labels=minority,
                                                                zero_division=0))
    assert out["per_task"]["c"]["minority_classes"] == [0, 1, 2]  # balanced: every class
    assert out["mean"]["macro_f1"] == pytest.approx(np.mean([m["macro_f1"] for m in out["per_task"].values()]))


def test_minority_macro_f1_nan_when_no_minority_class_present():
    labels = np.array([[0], [0], [1]])
    out = evaluate_predictions([np.array([0, 1, 1])], labels, ["type"], [4], [[20, 10, 1, 1]])
    m = out["per_task"]["type"]
    assert m["minority_classes"] == [2, 3] and m["absent_classes"] == [2, 3]
    assert math.isnan(m["minority_macro_f1"])
    assert math.isnan(out["mean"]["minority_macro_f1"])


def test_evaluate_validates_inputs():
    labels = np.array([[0], [1]])
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        evaluate_predictions([np.array([0, 2])], labels, ["t"], [2], [[1, 1]])
    with pytest.raises(ValueError, match="predictions for"):
        evaluate_predictions([np.array([0])], labels, ["t"], [2], [[1, 1]])
    with pytest.raises(ValueError, match="tasks but"):
        evaluate_predictions([np.array([0, 1])], labels, ["t"], [2, 3], [[1, 1]])


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ([100, 50, 10, 5], [2, 3]),  # median 30
        ([9, 1, 5], [1, 2]),  # median 5 (inclusive)
        ([10, 10, 10], [0, 1, 2]),
        ([7], [0]),
        ([0, 100, 3], [0, 2]),
    ],
)
def test_minority_classes(counts, expected):
    assert minority_classes(counts) == expected


def test_imbalance_ratio():
    assert imbalance_ratio([100, 10, 0, 5]) == pytest.approx(20.0)
    assert imbalance_ratio([4]) == 1.0
    import math
    assert math.isnan(imbalance_ratio([0, 0])) and math.isnan(imbalance_ratio([]))  # one definition, one answer
    from porcelain.generate import plan
    assert plan.imbalance_ratio is imbalance_ratio


# ---------------------------------------------------------------------------- confidence intervals

# Two-sided 95% t critical values from standard tables.
T_975 = {1: 12.7062, 2: 4.3027, 4: 2.7764, 5: 2.5706, 9: 2.2622, 10: 2.2281, 30: 2.0423, 120: 1.9799}


@pytest.mark.parametrize(("df", "t"), sorted(T_975.items()))
def test_t_quantile_against_tables(df, t):
    assert t_quantile(0.975, df) == pytest.approx(t, abs=1e-4)
    assert _t_ppf_fallback(0.975, df) == pytest.approx(t, abs=1e-4)


def test_fallback_matches_scipy_everywhere():
    for df in (1, 2, 3, 7, 29, 200):
        for q in (0.6, 0.9, 0.95, 0.995, 0.9995, 0.05):
            assert _t_ppf_fallback(q, df) == pytest.approx(t_quantile(q, df), rel=1e-8)
    assert _t_ppf_fallback(0.995, 4) == pytest.approx(4.6041, abs=1e-4)


def test_mean_ci_known_values():
    mean, low, high = mean_ci([1.0, 2.0, 3.0])  # mean 2, s = 1, n = 3
    half = 4.302653 / math.sqrt(3)
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - half, 2.0 + half), abs=1e-5)
    mean, low, high = mean_ci([0.5, 0.7, 0.6, 0.9, 0.8], confidence=0.99)  # s = sqrt(.025), t(.995, 4)
    half = 4.604095 * math.sqrt(0.025) / math.sqrt(5)
    assert (mean, low, high) == pytest.approx((0.7, 0.7 - half, 0.7 + half), abs=1e-5)
    assert mean_ci([0.3, 0.3, 0.3]) == pytest.approx((0.3, 0.3, 0.3))


def test_mean_ci_edge_cases():
    mean, low, high = mean_ci([0.42])
    assert mean == 0.42 and math.isnan(low) and math.isnan(high)
    with pytest.raises(ValueError):
        mean_ci([])
    with pytest.raises(ValueError):
        mean_ci([1.0, 2.0], confidence=1.5)


def test_paired_delta_ci():
    a, b = [0.80, 0.82, 0.85], [0.70, 0.71, 0.76]  # deltas .10, .11, .09: mean .1, s .01
    mean, low, high = paired_delta_ci(a, b)
    half = 4.302653 * 0.01 / math.sqrt(3)
    assert (mean, low, high) == pytest.approx((0.1, 0.1 - half, 0.1 + half), abs=1e-6)
    assert low > 0  # paired: a consistent gain is significant even though the arms overlap
    with pytest.raises(ValueError, match="equal lengths"):
        paired_delta_ci([1.0, 2.0], [1.0])
