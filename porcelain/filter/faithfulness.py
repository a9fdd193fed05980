"""Faithfulness filter: keep an image when the reference classifier agrees with what it was generated to be.

An image passes when, for every task, the reference classifier's probability of the value the
image was generated for is at least that task's threshold τ. Tasks may be left out of
``thresholds`` (e.g. a task whose reference is not accurate enough to judge): they are not checked.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from porcelain.filter.chain import FilterResult


def faithfulness_filter(
    probs: Mapping[str, np.ndarray],
    intended: Mapping[str, np.ndarray],
    thresholds: float | Mapping[str, float],
) -> FilterResult:
    """Keep mask and reasons from per-task softmax outputs.

    ``probs[task]``: float N×C probabilities from the reference classifier; ``intended[task]``: int
    length-N values the images were generated for; ``thresholds``: one τ for all tasks in ``probs``,
    or τ per task (only those tasks are checked). The reason of a dropped image names every failing
    task: ``"kiln: p(2)=0.31 < 0.50, predicted 1 (0.60)"``.
    """
    taus = ({t: float(thresholds) for t in probs} if not isinstance(thresholds, Mapping)
            else {t: float(v) for t, v in thresholds.items()})
    unknown = sorted(set(taus) - set(probs))
    if unknown:
        raise ValueError(f"thresholds for tasks without probabilities: {unknown}")
    n = None
    failures: list[list[str]] = []
    keep: np.ndarray | None = None
    for task, tau in taus.items():
        p = np.asarray(probs[task], dtype=np.float64)
        y = np.asarray(intended[task], dtype=np.int64)
        if p.ndim != 2 or y.shape != (len(p),):
            raise ValueError(f"{task}: probabilities must be N×C and intended values length N, "
                             f"got {p.shape} and {y.shape}")
        if n is None:
            n = len(p)
            keep = np.ones(n, bool)
            failures = [[] for _ in range(n)]
        elif len(p) != n:
            raise ValueError(f"{task}: {len(p)} images, other tasks have {n}")
        if len(y) and (y.min() < 0 or y.max() >= p.shape[1]):
            raise ValueError(f"{task}: intended values must lie in [0, {p.shape[1]})")
        p_int = p[np.arange(len(p)), y]
        ok = p_int >= tau
        keep &= ok  # type: ignore[operator]
        pred = p.argmax(1)
        for i in np.flatnonzero(~ok):
            failures[i].append(f"{task}: p({y[i]})={p_int[i]:.2f} < {tau:.2f}, predicted {pred[i]} ({p[i, pred[i]]:.2f})")
    if keep is None:
        raise ValueError("no task to check: give thresholds for at least one task")
    return FilterResult(keep, tuple("; ".join(f) for f in failures))
