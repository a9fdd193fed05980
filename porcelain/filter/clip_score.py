"""CLIP-score filter: keep an image when its CLIP score with its prompt (or label phrase) is high enough.

The scores themselves come from :func:`porcelain.evaluate.clip.clip_scores`. The threshold is either
absolute (a cosine similarity) or relative: the ``percentile``-th percentile of the scores of *real*
images with their own label phrases, so that "as well described by its label as the worst 5% of
real images" is the bar, whatever the CLIP model's scale. Relative thresholds can be per class
(``real_groups`` and ``groups``), since some label phrases score lower than others for every image;
``min_group`` gives groups with too few real images the percentile of all of them. The filter
stage groups by label phrase (:mod:`porcelain.filter.stage`).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

from porcelain.filter.chain import FilterResult


def relative_threshold(real_scores: np.ndarray, percentile: float = 5.0) -> float:
    """The ``percentile``-th percentile (0–100) of real images' scores with their own label phrases."""
    if not len(real_scores):
        raise ValueError("no real scores to set a relative threshold")
    return float(np.percentile(np.asarray(real_scores, np.float64), percentile))


def clip_score_filter(
    scores: np.ndarray,
    threshold: float | None = None,
    *,
    real_scores: np.ndarray | None = None,
    percentile: float = 5.0,
    groups: Sequence[Hashable] | None = None,
    real_groups: Sequence[Hashable] | None = None,
    min_group: int | None = None,
) -> tuple[FilterResult, dict[Hashable, float]]:
    """Keep ``scores >= threshold``; returns the verdict and the threshold(s) used.

    Give exactly one of ``threshold`` (absolute) and ``real_scores`` (relative, the ``percentile``-th
    percentile). With ``groups`` and ``real_groups`` (e.g. class per image) the relative threshold is
    computed per group; a generated group absent from the real ones raises, unless ``min_group`` is
    given: then a group with fewer than ``min_group`` real scores takes the percentile of all real
    scores (a percentile of two or three images is noise). The returned dict maps each group (or
    ``None`` for one global threshold) to its threshold.
    """
    s = np.asarray(scores, np.float64)
    pooled: set[Hashable] = set()  # groups that took the percentile of all real scores
    if (threshold is None) == (real_scores is None):
        raise ValueError("give either an absolute threshold or real_scores for a relative one")
    if threshold is not None:
        thr = {None: float(threshold)}
        per_image = np.full(len(s), float(threshold))
    elif groups is None:
        thr = {None: relative_threshold(real_scores, percentile)}  # type: ignore[arg-type]
        per_image = np.full(len(s), thr[None])
    else:
        if real_groups is None or len(real_groups) != len(real_scores):  # type: ignore[arg-type]
            raise ValueError("per-group thresholds need real_groups, one per real score")
        if len(groups) != len(s):
            raise ValueError(f"{len(groups)} groups for {len(s)} scores")
        real = np.asarray(real_scores, np.float64)
        rg = list(real_groups)
        thr = {}
        for g in dict.fromkeys(groups):
            mine = real[np.array([x == g for x in rg], bool)]
            if min_group is not None and len(mine) < min_group:
                thr[g] = relative_threshold(real, percentile)
                pooled.add(g)
                continue
            if not len(mine):
                raise ValueError(f"no real scores for group {g!r}")
            thr[g] = relative_threshold(mine, percentile)
        per_image = np.array([thr[g] for g in groups], np.float64)
    keep = s >= per_image
    note = [" (of all real images)" if g in pooled else "" for g in (groups if pooled else [None] * len(s))]
    reasons = tuple("" if k else f"CLIP score {v:.3f} < {t:.3f}{w}" for k, v, t, w in zip(keep, s, per_image, note))
    return FilterResult(keep, reasons), thr
