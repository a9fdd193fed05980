"""Memorisation filter: flag generated images that sit closer to a real train image than real images do.

For each generated image, the distance to its nearest real train image, in pixels and (when given)
in a feature space. The threshold of each space is calibrated on real-vs-real distances: the
``q``-th percentile (default 1%) of the nearest-train distances of real *test* images, which the
generator never saw. A generated image at or below the threshold in either space is flagged; an
exact copy (distance 0) always is, even if the threshold happens to be 0.

Pixel distances are root-mean-square differences of pixels scaled to [0, 1] (Euclidean / √D),
as :mod:`porcelain.evaluate.judging` reports them. The nearest neighbour is found with the
expansion ``|a|² + |b|² − 2a·b`` in chunks; its distance is then recomputed directly, so that an
exact copy gives exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from porcelain.filter.chain import FilterResult


def nearest_train(queries: np.ndarray, pool: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """``(distance, index)`` of each query row's nearest pool row (Euclidean, float64 distances).

    Memory: one ``chunk × len(pool)`` float32 block at a time (256 × 100k ≈ 100 MB)."""
    q = queries.reshape(len(queries), -1).astype(np.float32)
    p = pool.reshape(len(pool), -1).astype(np.float32)
    if not len(p):
        raise ValueError("the train pool is empty")
    if q.shape[1] != p.shape[1]:
        raise ValueError(f"queries have {q.shape[1]} dimensions, the pool {p.shape[1]}")
    p_sq = np.einsum("ij,ij->i", p, p)
    idx = np.empty(len(q), np.int64)
    for i in range(0, len(q), chunk):
        b = q[i:i + chunk]
        d2 = p_sq[None, :] - 2.0 * (b @ p.T)  # |b|² is constant per row: not needed for the argmin
        idx[i:i + chunk] = d2.argmin(1)
    diff = q.astype(np.float64) - p[idx].astype(np.float64)
    return np.sqrt(np.einsum("ij,ij->i", diff, diff)), idx


def pixel_distances(images: np.ndarray, train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RMS pixel distance in [0, 1] of each uint8 image to its nearest train image, and that image's index."""
    if images.shape[1:] != train.shape[1:]:
        raise ValueError(f"image shape {images.shape[1:]} differs from train {train.shape[1:]}; resize first")
    d, idx = nearest_train(images, train)
    return d / (255.0 * np.sqrt(np.prod(train.shape[1:]))), idx


def calibrate_threshold(test_to_train: np.ndarray, q: float = 1.0) -> float:
    """The ``q``-th percentile (0–100) of real test images' nearest-train distances."""
    if not len(test_to_train):
        raise ValueError("no real test distances to calibrate the threshold on")
    return float(np.percentile(test_to_train, q))


@dataclass(frozen=True)
class MemorisationResult:
    """Per generated image: flags and nearest-train distances; per space: the threshold used."""

    flagged: np.ndarray
    pixel_distance: np.ndarray
    pixel_nearest: np.ndarray
    pixel_threshold: float
    feature_distance: np.ndarray | None
    feature_nearest: np.ndarray | None
    feature_threshold: float | None
    q: float

    def as_filter(self) -> FilterResult:
        """Keep the unflagged images; reasons give the distances against the thresholds."""
        reasons = []
        for i, f in enumerate(self.flagged):
            if not f:
                reasons.append("")
                continue
            why = [f"pixel distance {self.pixel_distance[i]:.4f} to train #{self.pixel_nearest[i]} "
                   f"(threshold {self.pixel_threshold:.4f})"]
            if self.feature_distance is not None:
                why.append(f"feature distance {self.feature_distance[i]:.4f} to train #{self.feature_nearest[i]} "
                           f"(threshold {self.feature_threshold:.4f})")
            reasons.append("near copy: " + ", ".join(why))
        return FilterResult(~self.flagged, tuple(reasons))


@dataclass(frozen=True)
class Calibration:
    """The thresholds of each space, from real test-to-train distances (``feature`` None: pixels only)."""

    pixel: float
    feature: float | None
    q: float


def calibrate(train: np.ndarray, test: np.ndarray, train_features: np.ndarray | None = None,
              test_features: np.ndarray | None = None, q: float = 1.0) -> Calibration:
    """The ``q``-th percentile of real test images' nearest-train distances, in pixels and (with
    features for both sets) in the feature space. It depends on the real data only: compute it once
    and pass it to :func:`memorisation_filter` for every batch of generated images."""
    if (train_features is None) != (test_features is None):
        raise ValueError("give features for both train and test images, or for neither")
    t_pix, _ = pixel_distances(test, train)
    f_thr = None
    if train_features is not None:
        t_feat, _ = nearest_train(test_features, train_features)  # type: ignore[arg-type]
        f_thr = calibrate_threshold(t_feat, q)
    return Calibration(calibrate_threshold(t_pix, q), f_thr, float(q))


def memorisation_filter(
    generated: np.ndarray,
    train: np.ndarray,
    test: np.ndarray | None = None,
    generated_features: np.ndarray | None = None,
    train_features: np.ndarray | None = None,
    test_features: np.ndarray | None = None,
    q: float = 1.0,
    calibration: Calibration | None = None,
) -> MemorisationResult:
    """Flag near copies of train images among ``generated`` (uint8 N×H×W×C, same size as ``train``/``test``).

    Feature arrays (N×D, e.g. the reference classifier's pooled features) are optional but must be
    given for all three sets or none. ``q``: percentile of real test-to-train distances used as threshold.
    With ``calibration`` (from :func:`calibrate`, the same ``q``), ``test`` and ``test_features`` are
    not needed and the thresholds are not recomputed.
    """
    if calibration is None:
        if test is None:
            raise ValueError("give the real test images, or a calibration computed from them")
        calibration = calibrate(train, test, train_features, test_features, q)
    elif calibration.q != float(q):
        raise ValueError(f"the calibration is for q = {calibration.q}, the filter for q = {q}")
    if (generated_features is None) != (train_features is None):
        raise ValueError("give features for generated, train and test images, or for none")
    if generated_features is not None and calibration.feature is None:
        raise ValueError("features given, but the calibration has no feature threshold")
    g_pix, g_idx = pixel_distances(generated, train)
    pix_thr = calibration.pixel
    flagged = (g_pix <= pix_thr) | (g_pix == 0)
    f_dist = f_idx = None
    f_thr = None
    if generated_features is not None:
        f_dist, f_idx = nearest_train(generated_features, train_features)  # type: ignore[arg-type]
        f_thr = calibration.feature
        flagged |= (f_dist <= f_thr) | (f_dist == 0)
    return MemorisationResult(flagged, g_pix, g_idx, pix_thr, f_dist, f_idx, f_thr, float(q))
