"""The equivalence scale: how many synthetic images are worth one real image (after arXiv 2508.09550).

Two learning curves of one score (e.g. macro-F1 on the real test split), each measured over seeds:

* real: ``n_real → score`` when training on ``n_real`` real images only;
* synthetic: ``n_syn → score`` when training on a fixed base of ``n_base`` real images plus
  ``n_syn`` synthetic images (``n_syn = 0`` is the base itself).

Each curve is fitted with a saturating power law (``scipy.optimize.curve_fit``, bounded):

* real: ``f(n) = a − b·n^(−c)``;
* synthetic: ``g(m) = a' − b'·(m + d)^(−c)``, the same law with the real curve's exponent ``c``,
  shifted by ``d`` (the real base acts like ``d`` images "already there"); ``a'``, ``b'``, ``d``
  are free. If synthetic images are worth real ones at a constant rate ``k``,
  ``g(m) = f(n_base + m/k) = a − b·k^c·(m + k·n_base)^(−c)``, which is exactly of this form.

When a fit fails or there are too few points (fewer than 3 sizes on a curve), the curve falls back to log-linear: ``f(n) = α + β·ln n``, ``g(m) = α' + β'·ln(n_base + m)``.

Exchange rates, in synthetic images per real image:

* ``synthetic_per_real``: over the measured range — the largest ``m`` is worth
  ``n_eff − n_base`` real images, where ``n_eff = f⁻¹(g(m))`` (the real curve inverted);
  rate ``m / (n_eff − n_base)``. ``inf`` when synthetic images do not help (``n_eff ≤ n_base``);
  ``0`` when they reach a score the real curve never does (above its asymptote ``a``).
* ``marginal_synthetic_per_real``: at the base, ``f'(n_base) / g'(0)`` — how many of the first
  synthetic images it takes to move the score as much as one more real image would.

The interval is a percentile bootstrap over seeds: each replicate resamples the seeds (the same
indices at every size: one seed's runs share its randomness) and refits both curves. With 3 seeds
it is coarse and understates seed-to-seed variance; it does not include test-set sampling noise.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit


@dataclass(frozen=True)
class Curve:
    """A fitted learning curve; ``kind`` is ``"power"`` or ``"log"``; ``shift`` is ``d`` (power) or
    ``n_base`` (log) for a synthetic curve and 0 for a real one."""

    kind: str
    params: tuple[float, ...]
    shift: float = 0.0

    def __call__(self, n: np.ndarray | float) -> np.ndarray:
        x = np.asarray(n, np.float64) + self.shift
        if self.kind == "power":
            a, b, c = self.params
            return a - b * np.power(x, -c)
        alpha, beta = self.params
        return alpha + beta * np.log(x)

    def slope(self, n: float) -> float:
        x = float(n) + self.shift
        if self.kind == "power":
            _, b, c = self.params
            return float(b * c * x ** (-c - 1.0))
        return float(self.params[1] / x)

    def inverse(self, score: float) -> float:
        """The ``n`` (before the shift) at which the curve reaches ``score``; inf above its asymptote."""
        if self.kind == "power":
            a, b, c = self.params
            if score >= a or b <= 0:
                return math.inf
            return float(((a - score) / b) ** (-1.0 / c)) - self.shift
        alpha, beta = self.params
        if beta <= 0:
            return math.inf
        return float(math.exp((score - alpha) / beta)) - self.shift


def _power(n: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    return a - b * np.power(n, -c)


def _shifted_power(c: float):
    def g(m: np.ndarray, a: float, b: float, d: float) -> np.ndarray:
        return a - b * np.power(m + d, -c)
    return g


def _log_fit(x: np.ndarray, y: np.ndarray, shift: float) -> Curve:
    beta, alpha = np.polyfit(np.log(x + shift), y, 1)
    return Curve("log", (float(alpha), float(beta)), shift)


def fit_real_curve(n: Sequence[float], score: Sequence[float], p0: tuple[float, float, float] | None = None) -> Curve:
    """Fit ``a − b·n^(−c)`` (b ≥ 0, 0.01 ≤ c ≤ 3) to real-only scores; log-linear if that fails or
    with fewer than 3 sizes. ``p0``: starting point (the bootstrap starts from the point fit)."""
    x, y = np.asarray(n, np.float64), np.asarray(score, np.float64)
    if np.any(x <= 0):
        raise ValueError("real training-set sizes must be positive")
    if len(x) >= 3:
        if p0 is None:
            c0 = 0.5
            a0 = float(y.max()) + 0.1 * float(np.ptp(y) or 0.1)
            p0 = (a0, max(a0 - float(y.min()), 1e-6) * float(x.min()) ** c0, c0)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", OptimizeWarning)
                p, _ = curve_fit(_power, x, y, p0=p0, bounds=([-np.inf, 0.0, 0.01], [np.inf, np.inf, 3.0]), maxfev=5000)
            if np.all(np.isfinite(p)):
                return Curve("power", tuple(float(v) for v in p))
        except (RuntimeError, ValueError):
            pass
    return _log_fit(x, y, 0.0)


def fit_synthetic_curve(m: Sequence[float], score: Sequence[float], n_base: float, exponent: float = 0.5,
                        p0: tuple[float, float, float] | None = None) -> Curve:
    """Fit ``a − b·(m + d)^(−c)`` (b ≥ 0, d > 0) with ``c = exponent`` (the real curve's) to
    base-plus-synthetic scores; log-linear in ``n_base + m`` if that fails or with fewer than 3 sizes.

    Sharing the exponent with the real curve (same learner, same test set) leaves 3 free
    parameters, which a handful of sizes can pin down; the asymptote ``a`` stays free, since
    synthetic data usually saturates lower than real data.
    """
    x, y = np.asarray(m, np.float64), np.asarray(score, np.float64)
    if np.any(x < 0):
        raise ValueError("synthetic counts must be >= 0")
    if len(x) >= 3:
        c = float(exponent)
        if p0 is None:
            d0 = float(n_base)
            a0 = float(y.max()) + 0.1 * float(np.ptp(y) or 0.1)
            p0 = (a0, max(a0 - float(y.min()), 1e-6) * d0 ** c, d0)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", OptimizeWarning)
                p, _ = curve_fit(_shifted_power(c), x, y, p0=p0, bounds=([-np.inf, 0.0, 1e-3], [np.inf, np.inf, np.inf]),
                                 maxfev=5000)
            if np.all(np.isfinite(p)):
                return Curve("power", (float(p[0]), float(p[1]), c), float(p[2]))
        except (RuntimeError, ValueError):
            pass
    return _log_fit(x, y, float(n_base))


def exchange_rates(real: Curve, synthetic: Curve, n_base: float, m_max: float) -> dict[str, float]:
    """``synthetic_per_real`` over ``[0, m_max]``, ``marginal_synthetic_per_real`` at the base, and
    ``real_equivalent`` (``n_eff − n_base`` for ``m_max`` synthetic images)."""
    n_eff = real.inverse(float(synthetic(m_max)))
    gain = n_eff - n_base
    if math.isinf(n_eff):
        rate = 0.0
    elif gain <= 0:
        rate = math.inf
    else:
        rate = m_max / gain
    g0 = synthetic.slope(0.0)
    marginal = real.slope(n_base) / g0 if g0 > 0 else math.inf
    return {"synthetic_per_real": float(rate), "marginal_synthetic_per_real": float(marginal),
            "real_equivalent": float(gain)}


def _table(scores: Mapping[int, Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    sizes = np.array(sorted(scores), np.float64)
    per_seed = [np.asarray(scores[int(s)], np.float64) for s in sizes]
    k = {len(v) for v in per_seed}
    if len(k) != 1:
        raise ValueError(f"every size needs the same number of seeds, got {sorted(k)}")
    return sizes, np.stack(per_seed)  # sizes × seeds


def equivalence_scale(
    real_scores: Mapping[int, Sequence[float]],
    synthetic_scores: Mapping[int, Sequence[float]],
    n_base: int,
    *,
    n_boot: int = 500,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit both curves to the seed means and report the exchange rates with bootstrap intervals.

    ``real_scores``: ``n_real → [score per seed]``; ``synthetic_scores``: ``n_syn → [score per seed]``
    on ``n_base`` real images plus ``n_syn`` synthetic ones. Seeds are resampled jointly for both
    arms when they have the same count (seed ``i`` of both arms shares its randomness), independently
    otherwise. Returns the point estimates (:func:`exchange_rates`), ``"interval"`` per rate, the
    fitted curves, and ``n_boot_failed`` (replicates with a non-finite rate, left out of the intervals).
    """
    rn, rs = _table(real_scores)
    sn, ss = _table(synthetic_scores)
    m_max = float(sn.max())
    if m_max <= 0:
        raise ValueError("the synthetic curve needs at least one size with synthetic images")
    real = fit_real_curve(rn, rs.mean(1))
    c = real.params[2] if real.kind == "power" else 0.5
    syn = fit_synthetic_curve(sn, ss.mean(1), n_base, exponent=c)
    p_real = real.params if real.kind == "power" else None
    p_syn = (syn.params[0], syn.params[1], syn.shift) if syn.kind == "power" else None
    point = exchange_rates(real, syn, n_base, m_max)
    rng = np.random.default_rng(seed)
    keys = list(point)
    boots: dict[str, list[float]] = {k: [] for k in keys}
    failed = 0
    joint = rs.shape[1] == ss.shape[1]
    # A replicate depends only on which seeds it drew (as a multiset: the fits see seed means), and a
    # few seeds allow few multisets (10 for 3 seeds): fit each one once.
    fitted: dict[tuple, dict[str, float]] = {}
    for _ in range(n_boot):
        ri = rng.integers(0, rs.shape[1], rs.shape[1])
        si = ri if joint else rng.integers(0, ss.shape[1], ss.shape[1])
        ri, si = np.sort(ri), np.sort(si)
        drawn = (tuple(ri.tolist()), tuple(si.tolist()))
        if drawn not in fitted:
            r_fit = fit_real_curve(rn, rs[:, ri].mean(1), p0=p_real)
            s_fit = fit_synthetic_curve(sn, ss[:, si].mean(1), n_base,
                                        exponent=r_fit.params[2] if r_fit.kind == "power" else 0.5, p0=p_syn)
            fitted[drawn] = exchange_rates(r_fit, s_fit, n_base, m_max)
        rates = fitted[drawn]
        if not all(math.isfinite(v) for v in rates.values()):
            failed += 1
            continue
        for k in keys:
            boots[k].append(rates[k])
    lo, hi = 50 * (1 - confidence), 50 * (1 + confidence)
    interval = {k: ((float(np.percentile(v, lo)), float(np.percentile(v, hi))) if v else (math.nan, math.nan))
                for k, v in boots.items()}
    return {**point, "interval": interval, "confidence": confidence, "n_boot": n_boot, "n_boot_failed": failed,
            "n_base": int(n_base), "n_syn_max": int(m_max), "real_curve": real, "synthetic_curve": syn}


def scale_from_runs(runs: Sequence[Mapping[str, Any]], tasks: Sequence[str], baseline_arm: str,
                    metric: str = "macro_f1", n_boot: int = 500) -> dict[str, Any]:
    """The equivalence scale per synthesizer and task from sweep runs (metrics on the real test split).

    The real curve: the real-only runs on shares of the real train images (``real_fraction < 1``)
    and the full real-only baseline. Each synthesizer's curve: the baseline (0 synthetic) and its
    ratio arms (``n_synthetic`` on the full real base). Sizes are each run's own counts (the mean
    over seeds). A synthesizer with fewer than one synthetic arm, or a curve missing a seed, is
    skipped with the reason. Returns ``{"n_base", "real_sizes", "by": {synthesizer: {task: result |
    {"skipped": why}}}}``, each result as :func:`equivalence_scale` gives it, curves as their kind.
    """
    def score(run: Mapping[str, Any], task: str) -> float:
        return float(run["metrics"]["per_task"][task][metric])

    base = [r for r in runs if (r.get("arm") or r["ratio"]) == baseline_arm]
    curve = [r for r in runs if float(r.get("real_fraction", 1.0)) < 1.0]
    out: dict[str, Any] = {"metric": metric, "by": {}}
    if not base or not curve:
        return {**out, "skipped": "no real-fraction runs (sweep.real_fractions)" if base else "no baseline"}
    n_base = int(round(np.mean([r["n_real"] for r in base])))
    groups: dict[float, list] = {}
    for r in curve:
        groups.setdefault(float(r["real_fraction"]), []).append(r)
    out.update(n_base=n_base, real_sizes=sorted(int(round(np.mean([r["n_real"] for r in g]))) for g in groups.values()))
    arms: dict[str, dict[str, list]] = {}
    for r in runs:
        if r.get("synthesizer") and float(r.get("real_fraction", 1.0)) >= 1.0 and not r.get("synthetic_task_weights"):
            arms.setdefault(r["synthesizer"], {}).setdefault(r.get("arm") or r["ratio"], []).append(r)
    for syn, by_arm in arms.items():
        out["by"][syn] = {}
        for task in tasks:
            real = {n_base: [score(r, task) for r in sorted(base, key=lambda r: r["seed"])]}
            for g in groups.values():
                real[int(round(np.mean([r["n_real"] for r in g])))] = [score(r, task) for r in sorted(g, key=lambda r: r["seed"])]
            synthetic = {0: real[n_base]}
            for g in by_arm.values():
                synthetic[int(round(np.mean([r["n_synthetic"] for r in g])))] = \
                    [score(r, task) for r in sorted(g, key=lambda r: r["seed"])]
            try:
                res = equivalence_scale(real, synthetic, n_base, n_boot=n_boot)
            except ValueError as e:
                out["by"][syn][task] = {"skipped": str(e)}
                continue
            res["real_curve"], res["synthetic_curve"] = res["real_curve"].kind, res["synthetic_curve"].kind
            out["by"][syn][task] = res
    return out
