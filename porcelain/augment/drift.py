"""Semantic drift of image-conditioned augmentation, per strength.

An edit of a real image (SDEdit at strength ``S``, a saliency mix) should change its appearance
but not its labels. Two numbers per strength, both from data given by the caller (no model here):

* **label drift** per task: the share of augmented images whose reference-classifier prediction
  differs from the source's label (``porcelain.train.classifier.predict`` gives the predictions);
  the same share on the unedited sources is the classifier's own error, the floor to compare with;
* **pixel distance** of each augmented image to its source: the RMS difference over all pixels and
  channels, in grey levels (0–255).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["DriftRow", "drift_by_strength", "drift_table", "label_drift", "pixel_distance"]


def _as_matrix(predicted: np.ndarray | Sequence[np.ndarray], n_tasks: int) -> np.ndarray:
    """``N×T`` int64 from an ``N×T`` array or from one length-``N`` array per task (as ``predict`` returns)."""
    if isinstance(predicted, np.ndarray) and predicted.ndim == 2:
        p = predicted
    else:
        cols = [np.asarray(c) for c in predicted]
        if len(cols) != n_tasks or any(c.ndim != 1 for c in cols):
            raise ValueError(f"predictions must be N×{n_tasks} or {n_tasks} arrays of length N")
        p = np.stack(cols, axis=1) if cols else np.zeros((0, 0))
    if p.shape[1] != n_tasks:
        raise ValueError(f"predictions have {p.shape[1]} tasks, labels {n_tasks}")
    return p.astype(np.int64)


def label_drift(predicted: np.ndarray | Sequence[np.ndarray], source_labels: np.ndarray) -> np.ndarray:
    """Per task (float64 ``T``), the share of images whose predicted label differs from the source's.

    ``source_labels``: int ``N×T``; a negative label (unknown) leaves that image out of that task's
    share. A task with no known label has share NaN (not measurable, never 0).
    """
    y = np.asarray(source_labels)
    if y.ndim != 2:
        raise ValueError(f"source_labels must be N×T, got shape {y.shape}")
    p = _as_matrix(predicted, y.shape[1])
    if len(p) != len(y):
        raise ValueError(f"{len(p)} predictions for {len(y)} source labels")
    known = y >= 0
    changed = (p != y) & known
    n = known.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, changed.sum(axis=0) / np.maximum(n, 1), np.nan)


def pixel_distance(augmented: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """RMS pixel difference (float64 ``N``, grey levels) between each augmented image and its source."""
    a, s = np.asarray(augmented), np.asarray(sources)
    if a.shape != s.shape or a.ndim < 2:
        raise ValueError(f"augmented and sources differ in shape: {a.shape} vs {s.shape}")
    d = a.astype(np.float64) - s.astype(np.float64)
    return np.sqrt((d.reshape(len(d), -1) ** 2).mean(axis=1)) if len(d) else np.zeros(0)


@dataclass(frozen=True)
class DriftRow:
    """Drift at one strength: label drift per task, and the pixel distances to the sources."""

    strength: float
    label_drift: dict[str, float]
    rms_mean: float
    rms_median: float
    n: int
    rms: np.ndarray = field(repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (the per-image distances are left out)."""
        return {"strength": self.strength, "label_drift": dict(self.label_drift), "rms_mean": self.rms_mean,
                "rms_median": self.rms_median, "n": self.n}


def drift_by_strength(
    strengths: Sequence[float],
    predicted: Sequence[np.ndarray | Sequence[np.ndarray]],
    augmented: Sequence[np.ndarray],
    sources: np.ndarray,
    source_labels: np.ndarray,
    tasks: Sequence[str],
) -> list[DriftRow]:
    """One :class:`DriftRow` per strength, in the order given.

    ``predicted[k]`` and ``augmented[k]`` belong to ``strengths[k]``: the predictions on, and the
    images of, the augmented copies of ``sources`` (image ``i`` edited from source ``i``).
    """
    tasks = list(tasks)
    y = np.asarray(source_labels)
    if y.ndim != 2 or y.shape[1] != len(tasks):
        raise ValueError(f"source_labels must be N×{len(tasks)} (one column per task), got {y.shape}")
    if not len(strengths) == len(predicted) == len(augmented):
        raise ValueError(f"need one prediction set and one image set per strength: {len(strengths)} strengths, "
                         f"{len(predicted)} prediction sets, {len(augmented)} image sets")
    rows = []
    for s, pred, imgs in zip(strengths, predicted, augmented):
        share = label_drift(pred, y)
        rms = pixel_distance(imgs, sources)
        rows.append(DriftRow(
            strength=float(s), label_drift={t: float(v) for t, v in zip(tasks, share)},
            rms_mean=float(rms.mean()) if len(rms) else float("nan"),
            rms_median=float(np.median(rms)) if len(rms) else float("nan"), n=int(len(rms)), rms=rms))
    return rows


def drift_table(rows: Sequence[DriftRow]) -> Mapping[str, list[Any]]:
    """Columns for a report table: ``strength``, ``rms_mean`` and ``drift_<task>`` per task."""
    cols: dict[str, list[Any]] = {"strength": [r.strength for r in rows], "rms_mean": [r.rms_mean for r in rows]}
    for t in (rows[0].label_drift if rows else {}):
        cols[f"drift_{t}"] = [r.label_drift[t] for r in rows]
    return cols
