"""Adaptive per-task weight of the synthetic-image loss, from validation deltas.

For each task, ``delta`` is the val score of a run with synthetic data minus that of the
real-only run, with an interval ``(lo, hi)`` (e.g. from :func:`porcelain.evaluate.stats.paired_bootstrap`).
The rule (:func:`synthetic_loss_weights`), in order:

===========================================  ======  ===============================================
condition                                    weight  reading
===========================================  ======  ===============================================
``hi < 0``                                   0       synthetic data clearly hurts this task on val
``lo > 0`` and ``delta >= strong``           2       clearly helps, by at least ``strong``
``lo > 0``                                   1       clearly helps
``delta > 0`` (interval contains 0)          1       may help: keep the default weight
otherwise (``delta <= 0``, contains 0)       0.5     may hurt: halve it
===========================================  ======  ===============================================

Weights are chosen on val, so the test split stays untouched by the choice; a NaN delta or
interval (task not measurable) keeps the default weight 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

WEIGHTS: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)


def synthetic_loss_weight(delta: float, lo: float, hi: float, strong: float = 0.02) -> tuple[float, str]:
    """The weight in :data:`WEIGHTS` for one task, and the rule that chose it (see the module docstring)."""
    if any(math.isnan(v) for v in (delta, lo, hi)):
        return 1.0, "not measurable: default weight"
    if lo > hi:
        raise ValueError(f"interval ({lo}, {hi}) is reversed")
    if hi < 0:
        return 0.0, f"hurts on val (interval {lo:+.3f}..{hi:+.3f} below 0)"
    if lo > 0:
        if delta >= strong:
            return 2.0, f"helps on val by {delta:+.3f} >= {strong:.3f} (interval above 0)"
        return 1.0, f"helps on val by {delta:+.3f} (interval above 0)"
    if delta > 0:
        return 1.0, f"may help ({delta:+.3f}, interval contains 0)"
    return 0.5, f"may hurt ({delta:+.3f}, interval contains 0)"


def synthetic_loss_weights(
    deltas: Mapping[str, tuple[float, float, float]], strong: float = 0.02,
) -> dict[str, tuple[float, str]]:
    """``task -> (weight, reason)`` from ``task -> (delta, lo, hi)`` val deltas (synthetic − real-only)."""
    return {task: synthetic_loss_weight(*map(float, d), strong=strong) for task, d in deltas.items()}
