"""Confidence intervals: Student-t over seeds, Wilson for proportions, and a two-level bootstrap.

Student-t (``mean_ci``, ``paired_delta_ci``)
    "mean ± CI over seeds". The t quantile comes from scipy when it is installed (it is, as a
    dependency of scikit-learn); otherwise from a dependency-free implementation: the t CDF via the
    regularised incomplete beta function (continued fraction, Numerical Recipes ``betacf``),
    inverted by bisection. Both agree to better than 1e-9 on the quantiles used here. With 3 seeds
    of a bounded score these intervals can leave [0, 1] and they ignore test-set sampling noise;
    prefer the bootstrap below for classifier comparisons.

Wilson (``wilson_interval``)
    Score interval of a binomial proportion (faithfulness rates): stays within [0, 1] and behaves
    at 0/n and n/n, unlike the normal ("Wald") interval.

Two-level bootstrap (``paired_bootstrap``, ``bootstrap_mean``)
    Each run (seed) of a classifier gives integer predictions on one shared real test split. A
    bootstrap replicate resamples the seeds with replacement *and* the test images with
    replacement; the same image indices are used for every seed and for both arms, because the
    test images are shared by all of them (their sampling noise does not average out over seeds,
    and pairing on images removes the per-image difficulty both arms share). The statistic is the
    mean over the resampled seeds of the metric on the resampled images. Metrics of all replicates
    are computed at once from confusion matrices (``np.bincount`` of ``target * C + pred``), so
    there is no Python loop over replicates. Intervals are percentile intervals, so a bounded score
    keeps its bounds: arm scores stay within [0, 1], differences within [-1, 1].

    Caveat: with very few seeds (3) the seed-level resampling understates the seed-to-seed
    variance (the bootstrap variance of a mean of n values is (n-1)/n of the usual estimate), and
    with one seed only the test images are resampled: seed-to-seed variation is then not measured
    at all.

Minimum detectable effect
    ``mde = (z_{1-alpha/2} + z_{power}) * se``: the true difference that a two-sided test at level
    alpha would detect with the given power (0.8 by default, ~2.80 * se at 95 %), given the
    bootstrap standard error of this design (test-set size and number of seeds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

import numpy as np


def _betacf(a: float, b: float, x: float, max_iter: int = 300, eps: float = 1e-15) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def _t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def _t_ppf_fallback(q: float, df: float) -> float:
    """Student-t quantile without scipy: bisection on the CDF (symmetric, so solve for q >= 0.5)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile level must lie in (0, 1), got {q}")
    if q < 0.5:
        return -_t_ppf_fallback(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < q:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def t_quantile(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom."""
    try:
        from scipy.stats import t as student_t
    except ImportError:  # pragma: no cover - scipy is present wherever scikit-learn is
        return _t_ppf_fallback(q, df)
    return float(student_t.ppf(q, df))


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the two-sided Student-t confidence interval of the mean.

    ``mean ± t_{(1+c)/2, n-1} · s / √n`` with the sample standard deviation ``s`` (ddof=1).
    n = 1 gives ``(x, nan, nan)``; identical values give a zero-width interval; NaN values propagate.
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("mean_ci needs at least one value")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    mean = float(x.mean())
    if x.size == 1:
        return mean, float("nan"), float("nan")
    half = t_quantile(0.5 + confidence / 2.0, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, mean - half, mean + half


def paired_delta_ci(
    a: Sequence[float], b: Sequence[float], confidence: float = 0.95
) -> tuple[float, float, float]:
    """CI of the mean paired difference ``a - b`` (``a[i]`` and ``b[i]`` share seed ``i``).

    Pairing removes the seed-to-seed variance shared by both arms; an interval that excludes 0
    is a difference at the given confidence.
    """
    xa = np.asarray(a, dtype=np.float64).reshape(-1)
    xb = np.asarray(b, dtype=np.float64).reshape(-1)
    if xa.shape != xb.shape:
        raise ValueError(f"paired values need equal lengths, got {xa.size} and {xb.size}")
    return mean_ci(xa - xb, confidence)


# ---------------------------------------------------------------------------- helpers


def z_quantile(q: float) -> float:
    """The ``q`` quantile of the standard normal distribution (stdlib, no scipy needed)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile level must lie in (0, 1), got {q}")
    return NormalDist().inv_cdf(q)


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")


# ---------------------------------------------------------------------------- Wilson


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float, float]:
    """``(proportion, low, high)``: the Wilson score interval of ``successes`` out of ``n``.

    ``(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)`` with ``z = z_{(1+c)/2}``, no
    continuity correction (the same as ``scipy.stats.binomtest(k, n).proportion_ci("wilson")``).
    Always within [0, 1]; at 0/n the low end is 0, at n/n the high end is 1. ``n = 0`` gives
    ``(nan, nan, nan)``.
    """
    _check_confidence(confidence)
    k, m = int(successes), int(n)
    if k != successes or m != n:
        raise ValueError(f"successes and n must be integers, got {successes!r} and {n!r}")
    if m < 0 or not 0 <= k <= max(m, 0):
        raise ValueError(f"need 0 <= successes <= n, got {k} of {m}")
    if m == 0:
        nan = float("nan")
        return nan, nan, nan
    z = z_quantile(0.5 + confidence / 2.0)
    p = k / m
    z2n = z * z / m
    centre = (p + z2n / 2.0) / (1.0 + z2n)
    half = z / (1.0 + z2n) * math.sqrt(p * (1.0 - p) / m + z2n / (4.0 * m))
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == m else min(1.0, centre + half)
    return p, low, high


# ---------------------------------------------------------------------------- vectorised metrics

METRICS = ("accuracy", "macro_f1", "minority_macro_f1", "balanced_accuracy")

_CHUNK_ELEMENTS = 1 << 22  # resampled predictions per bincount call (~32 MiB of int64)


def _as_labels(x: np.ndarray, n_classes: int, what: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        a = a.reshape(-1)
    if a.size and (not np.issubdtype(a.dtype, np.integer) or a.min() < 0 or a.max() >= n_classes):
        raise ValueError(f"{what} must be integers in [0, {n_classes})")
    return a.astype(np.int64, copy=False)


def _check_metric(metric: str, minority: Sequence[int], n_classes: int) -> np.ndarray:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    mino = np.unique(np.asarray(list(minority), dtype=np.int64))
    if mino.size and (mino.min() < 0 or mino.max() >= n_classes):
        raise ValueError(f"minority classes must lie in [0, {n_classes}), got {list(minority)}")
    if metric == "minority_macro_f1" and mino.size == 0:
        raise ValueError("minority_macro_f1 needs at least one minority class")
    return mino


def confusion_matrices(
    pred: np.ndarray, target: np.ndarray, n_classes: int, index: np.ndarray | None = None
) -> np.ndarray:
    """Confusion matrix (rows: target, columns: prediction) as int64.

    Without ``index``: shape ``(C, C)``. With ``index`` (a ``B×M`` array of row indices into
    ``pred``/``target``, e.g. bootstrap resamples): shape ``(B, C, C)``, one matrix per row of
    ``index``, computed by chunked ``np.bincount`` of ``target * C + pred`` (no loop over B).
    """
    c = int(n_classes)
    y = _as_labels(target, c, "targets")
    p = _as_labels(pred, c, "predictions")
    if p.shape != y.shape:
        raise ValueError(f"{p.size} predictions for {y.size} targets")
    return _confusion_from_codes(y * c + p, c, index)


def _confusion_from_codes(codes: np.ndarray, c: int, index: np.ndarray | None) -> np.ndarray:
    cc = c * c
    if index is None:
        return np.bincount(codes, minlength=cc).reshape(c, c)
    idx = np.asarray(index)
    if idx.ndim != 2:
        raise ValueError(f"index must be a B×M array of row indices, got shape {idx.shape}")
    b, m = idx.shape
    out = np.empty((b, cc), dtype=np.int64)
    rows = max(1, _CHUNK_ELEMENTS // max(m, 1))
    for start in range(0, b, rows):
        stop = min(b, start + rows)
        g = codes[idx[start:stop]]
        g += (np.arange(stop - start, dtype=np.int64) * cc)[:, None]
        out[start:stop] = np.bincount(g.reshape(-1), minlength=(stop - start) * cc).reshape(-1, cc)
    return out.reshape(b, c, c)


def metric_from_confusion(cm: np.ndarray, metric: str, minority: Sequence[int] = ()) -> np.ndarray:
    """A metric of one or many confusion matrices ``(..., C, C)`` (rows: target) → shape ``(...)``.

    Conventions (those of ``porcelain.evaluate.metrics`` / torchmetrics):

    * ``accuracy``: micro accuracy, correct / total (``MulticlassAccuracy(average="micro")``).
    * ``macro_f1``: per-class ``F1 = 2tp / (2tp + fp + fn)``, averaged over the classes present in
      the targets *or* the predictions (``MulticlassF1Score(average="macro")``); a class present
      only in one of them has F1 = 0 and counts.
    * ``minority_macro_f1``: mean per-class F1 over the given minority classes that are present
      (in targets or predictions); NaN when none is.
    * ``balanced_accuracy``: mean recall over the classes present in the *targets*
      (``sklearn.metrics.balanced_accuracy_score``). Note that torchmetrics'
      ``MulticlassAccuracy(average="macro")`` also counts a class that is only predicted (recall 0);
      the two agree whenever every predicted class occurs in the targets.
    """
    m = np.asarray(cm)
    c = m.shape[-1]
    mino = _check_metric(metric, minority, c)
    if m.ndim < 2 or m.shape[-2] != c:
        raise ValueError(f"confusion matrices must be (..., C, C), got shape {m.shape}")
    m = m.astype(np.float64, copy=False)
    tp = np.diagonal(m, axis1=-2, axis2=-1)
    support = m.sum(axis=-1)
    predicted = m.sum(axis=-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        if metric == "accuracy":
            return tp.sum(axis=-1) / support.sum(axis=-1)
        if metric == "balanced_accuracy":
            in_target = support > 0
            recall = np.where(in_target, tp / np.where(in_target, support, 1.0), 0.0)
            return recall.sum(axis=-1) / in_target.sum(axis=-1)
        denom = support + predicted  # = 2tp + fp + fn
        present = denom > 0
        f1 = np.where(present, 2.0 * tp / np.where(present, denom, 1.0), 0.0)
        if metric == "minority_macro_f1":
            f1, present = f1[..., mino], present[..., mino]
        return f1.sum(axis=-1) / present.sum(axis=-1)  # 0/0 -> NaN when no (minority) class is present


def metric_values(
    pred: np.ndarray,
    target: np.ndarray,
    n_classes: int,
    metric: str,
    minority: Sequence[int] = (),
    index: np.ndarray | None = None,
) -> float | np.ndarray:
    """``metric`` of integer predictions against targets; see ``metric_from_confusion``.

    Without ``index``: a float. With ``index`` (``B×M`` row indices, e.g. ``B`` bootstrap resamples
    of the test set): an array of ``B`` values, one per resample, computed at once.
    """
    _check_metric(metric, minority, int(n_classes))
    values = metric_from_confusion(confusion_matrices(pred, target, n_classes, index), metric, minority)
    return float(values) if index is None else values


# ---------------------------------------------------------------------------- two-level bootstrap


def _prepare_runs(
    arms: Sequence[Sequence[np.ndarray]], target: np.ndarray, n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Targets (N,) and codes ``target*C + pred`` of every arm and run, shape (arms, seeds, N)."""
    c = int(n_classes)
    y = _as_labels(target, c, "targets")
    if y.size == 0:
        raise ValueError("no test samples")
    n_seeds = {len(a) for a in arms}
    if len(n_seeds) != 1:
        raise ValueError(f"paired arms need the same number of runs, got {[len(a) for a in arms]}")
    if n_seeds == {0}:
        raise ValueError("need at least one run")
    codes = np.empty((len(arms), len(arms[0]), y.size), dtype=np.int64)
    for a, runs in enumerate(arms):
        for s, run in enumerate(runs):
            p = _as_labels(run, c, "predictions")
            if p.size != y.size:
                raise ValueError(f"a run has {p.size} predictions for {y.size} test targets")
            codes[a, s] = y * c + p
    return y, codes


def _two_level(
    codes: np.ndarray, n_classes: int, metric: str, minority: Sequence[int], n_boot: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Point values (arms,) and bootstrap replicates (arms, B) of the seed-mean metric."""
    if int(n_boot) != n_boot or n_boot < 2:
        raise ValueError(f"n_boot must be an integer >= 2, got {n_boot!r}")
    n_arms, n_seeds, n = codes.shape
    c = int(n_classes)
    rng = np.random.default_rng(seed)
    # seed weights: how often each seed is drawn in a replicate, divided by the number of seeds
    if n_seeds > 1:
        draws = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
        draws += (np.arange(n_boot) * n_seeds)[:, None]
        weights = np.bincount(draws.reshape(-1), minlength=n_boot * n_seeds).reshape(n_boot, n_seeds) / n_seeds
    else:
        weights = np.ones((n_boot, 1))
    # one image resample per replicate, shared by every seed and both arms
    index = rng.integers(0, n, size=(n_boot, n), dtype=np.int32 if n < 2**31 else np.int64)
    point = np.empty(n_arms)
    reps = np.empty((n_arms, n_boot))
    for a in range(n_arms):
        per_seed_point = np.empty(n_seeds)
        per_seed_reps = np.empty((n_boot, n_seeds))
        for s in range(n_seeds):
            per_seed_point[s] = metric_from_confusion(_confusion_from_codes(codes[a, s], c, None), metric, minority)
            per_seed_reps[:, s] = metric_from_confusion(_confusion_from_codes(codes[a, s], c, index), metric, minority)
        point[a] = per_seed_point.mean()
        # a seed drawn 0 times contributes nothing, even when its value is NaN
        reps[a] = np.where(weights > 0, weights * per_seed_reps, 0.0).sum(axis=1)
    return point, reps


def _percentile(reps: np.ndarray, confidence: float) -> tuple[float, float]:
    ok = reps[np.isfinite(reps)]
    if ok.size == 0:
        return float("nan"), float("nan")
    alpha = 1.0 - confidence
    low, high = np.quantile(ok, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def paired_bootstrap(
    base: Sequence[np.ndarray],
    new: Sequence[np.ndarray],
    target: np.ndarray,
    n_classes: int,
    metric: str,
    *,
    minority: Sequence[int] = (),
    n_boot: int = 2000,
    confidence: float = 0.95,
    power: float = 0.8,
    seed: int = 0,
) -> dict[str, Any]:
    """Difference ``new − base`` of a metric, with a two-level paired bootstrap interval.

    ``base[i]`` and ``new[i]`` are the integer test predictions (length N) of the real-only run and
    of the real+synthetic run with seed ``i``; ``target`` holds the N test labels. Each of the
    ``n_boot`` replicates resamples the seed pairs with replacement (not with one seed) and the
    test images with replacement (the same images for every seed and both arms), and takes the
    mean over the resampled seeds of ``metric(new) − metric(base)``.

    Returns a dict:

    * ``delta``: mean over seeds of the per-seed differences on the full test set;
    * ``low``, ``high``: percentile interval at ``confidence`` (within [-1, 1]);
    * ``se``: standard deviation of the replicates;
    * ``mde``: ``(z_{(1+c)/2} + z_{power}) · se``, the smallest true difference this design
      (test-set size, number of seeds) would detect with probability ``power``;
    * ``per_seed``: list of per-seed differences on the full test set;
    * ``base``, ``new``: ``(mean, low, high)`` of each arm from the same replicates (within [0, 1]);
    * ``n_boot``, ``n_valid`` (replicates with a finite difference: ``minority_macro_f1`` is NaN on
      a resample with no minority class present), ``n_seeds``, ``n_test``, ``confidence``,
      ``metric``.
    """
    _check_confidence(confidence)
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must lie in (0, 1), got {power}")
    _check_metric(metric, minority, int(n_classes))
    y, codes = _prepare_runs([base, new], target, n_classes)
    n_seeds = codes.shape[1]
    c = int(n_classes)
    per_seed = [
        metric_from_confusion(_confusion_from_codes(codes[1, s], c, None), metric, minority)
        - metric_from_confusion(_confusion_from_codes(codes[0, s], c, None), metric, minority)
        for s in range(n_seeds)
    ]
    point, reps = _two_level(codes, c, metric, minority, n_boot, seed)
    diff = reps[1] - reps[0]
    finite = diff[np.isfinite(diff)]
    low, high = _percentile(diff, confidence)
    se = float(finite.std(ddof=1)) if finite.size > 1 else float("nan")
    mde = (z_quantile(0.5 + confidence / 2.0) + z_quantile(power)) * se

    def arm(a: int) -> tuple[float, float, float]:
        lo, hi = _percentile(reps[a], confidence)
        return float(point[a]), lo, hi

    return {
        "delta": float(np.mean(per_seed)),
        "low": float(np.clip(low, -1.0, 1.0)),
        "high": float(np.clip(high, -1.0, 1.0)),
        "se": se,
        "mde": float(mde),
        "per_seed": [float(d) for d in per_seed],
        "base": arm(0),
        "new": arm(1),
        "n_boot": int(n_boot),
        "n_valid": int(finite.size),
        "n_seeds": int(n_seeds),
        "n_test": int(y.size),
        "confidence": float(confidence),
        "metric": metric,
    }


def bootstrap_mean(
    runs_preds: Sequence[np.ndarray],
    target: np.ndarray,
    n_classes: int,
    metric: str,
    *,
    minority: Sequence[int] = (),
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(mean, low, high)`` of one arm's score over its runs, with the two-level bootstrap.

    ``mean`` is the mean over runs of the metric on the full test set; the percentile interval
    resamples runs and test images as in ``paired_bootstrap``, so it stays within [0, 1].
    """
    _check_confidence(confidence)
    _check_metric(metric, minority, int(n_classes))
    _, codes = _prepare_runs([runs_preds], target, n_classes)
    point, reps = _two_level(codes, n_classes, metric, minority, n_boot, seed)
    low, high = _percentile(reps[0], confidence)
    return float(point[0]), low, high


# ---------------------------------------------------------------------------- verdict

VERDICTS = ("better", "worse", "no clear difference", "too wide to conclude")


def verdict(delta_result: dict[str, Any], *, min_effect: float = 0.0, max_mde: float = 0.10) -> str:
    """One of ``VERDICTS`` for a ``paired_bootstrap`` result.

    * ``"better"``: the whole interval lies above ``min_effect``;
    * ``"worse"``: the whole interval lies below ``-min_effect``;
    * otherwise ``"too wide to conclude"`` when the minimum detectable effect ``mde`` exceeds
      ``max_mde`` (default 0.10, i.e. 10 points of accuracy/F1: the run could not have told a
      difference of that size from noise), or when the interval is undefined (NaN);
    * otherwise ``"no clear difference"``: the interval includes 0 (or differences smaller than
      ``min_effect``), and differences of ``mde`` or more would likely have been detected.
    """
    if min_effect < 0:
        raise ValueError(f"min_effect must be >= 0, got {min_effect}")
    low, high = float(delta_result["low"]), float(delta_result["high"])
    mde = float(delta_result.get("mde", float("nan")))
    if math.isnan(low) or math.isnan(high):
        return "too wide to conclude"
    if low > min_effect:
        return "better"
    if high < -min_effect:
        return "worse"
    if math.isnan(mde) or mde > max_mde:
        return "too wide to conclude"
    return "no clear difference"
