"""Foreground masks from saliency maps: min-max normalisation, Otsu's threshold, union of masks.

Used by the saliency-guided mixing of SGD-Mix (arXiv 2505.11813): a saliency map (Grad-CAM or
spectral residual, :mod:`porcelain.augment.saliency`) is normalised to [0, 1] and split into
foreground and background by Otsu's threshold (Otsu 1979: the threshold that maximises the
between-class variance of the map's histogram). Pure numpy; no scikit-image needed.

Conventions:

* the foreground is ``map > threshold`` (strictly above, as in scikit-image);
* a constant map has no foreground: there is nothing salient in it (its mask is all ``False``);
* ``(H, W)`` maps give one mask, ``(N, H, W)`` stacks give one mask per map.
"""

from __future__ import annotations

import numpy as np

__all__ = ["foreground_mask", "normalize_map", "otsu_threshold", "union_mask"]

OTSU_BINS = 256
"""Histogram bins of :func:`otsu_threshold` (as scikit-image's default)."""


def normalize_map(saliency: np.ndarray) -> np.ndarray:
    """Min-max normalise one map (``H×W``) or each map of a stack (``N×H×W``) to float32 [0, 1].

    A constant map becomes all zeros. Non-finite values are an error (a broken map should not
    silently become a mask).
    """
    m = np.asarray(saliency, dtype=np.float64)
    if m.ndim not in (2, 3):
        raise ValueError(f"expected a map H×W or a stack N×H×W, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError("saliency map contains NaN or inf")
    flat = m.reshape(-1, m.shape[-2] * m.shape[-1]) if m.ndim == 3 else m.reshape(1, -1)
    lo = flat.min(axis=1, keepdims=True) if flat.size else np.zeros((len(flat), 1))
    span = (flat.max(axis=1, keepdims=True) - lo) if flat.size else np.ones((len(flat), 1))
    out = np.where(span > 0, (flat - lo) / np.where(span > 0, span, 1.0), 0.0)
    return out.reshape(m.shape).astype(np.float32)


def otsu_threshold(saliency: np.ndarray, *, bins: int = OTSU_BINS) -> float:
    """Otsu's threshold of one map (any shape; all its values are pooled).

    The values are binned into ``bins`` equal bins over ``[min, max]``; the threshold is the upper
    edge of the last bin of the background class that maximises ``w0 · w1 · (mu0 - mu1)²``
    (the first such split on ties). The foreground is ``map > threshold``. A constant map returns
    its value (so its foreground is empty).
    """
    v = np.asarray(saliency, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("otsu_threshold of an empty map")
    if not np.isfinite(v).all():
        raise ValueError("saliency map contains NaN or inf")
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return lo
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2
    p = counts / counts.sum()
    w0 = np.cumsum(p)[:-1]  # background = bins 0..k, for k = 0..bins-2
    m0 = np.cumsum(p * centers)[:-1]
    total = float((p * centers).sum())
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = np.where((w0 > 0) & (w1 > 0), (total * w0 - m0) ** 2 / (w0 * w1), -1.0)
    k = int(np.argmax(between))  # first maximum
    return float(edges[k + 1])


def foreground_mask(saliency: np.ndarray, *, bins: int = OTSU_BINS) -> np.ndarray:
    """Boolean foreground of one map (``H×W``) or of each map of a stack (``N×H×W``).

    Each map is min-max normalised (:func:`normalize_map`) and thresholded at its own Otsu
    threshold (:func:`otsu_threshold`); a constant map gives an all-``False`` mask.
    """
    m = normalize_map(saliency)
    if m.ndim == 2:
        return m > otsu_threshold(m, bins=bins)
    return np.stack([mi > otsu_threshold(mi, bins=bins) for mi in m]) if len(m) else m.astype(bool)


def union_mask(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pixelwise OR of two boolean masks of the same shape (e.g. a source's and a target's foreground)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
    if a.dtype != bool or b.dtype != bool:
        raise ValueError(f"masks must be boolean, got {a.dtype} and {b.dtype}")
    return np.logical_or(a, b)
