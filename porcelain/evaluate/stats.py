"""Confidence intervals over seeds (Student-t), for "mean ± CI over 3 seeds" tables.

The t quantile comes from scipy when it is installed (it is, as a dependency of scikit-learn);
otherwise from a dependency-free implementation: the t CDF via the regularised incomplete beta
function (continued fraction, Numerical Recipes ``betacf``), inverted by bisection. Both agree to
better than 1e-9 on the quantiles used here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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
