"""Texture statistics: GLCM contrast and homogeneity per image, and synthetic-vs-real tables per class.

The grey-level co-occurrence matrix (GLCM) counts how often grey level ``i`` sits next to level
``j``. Here: grey = ITU-R 601 luma of the RGB image, quantised to ``levels`` (default 8) equal bins;
offsets of 1 pixel at 0°, 45°, 90° and 135° (skimage's convention: (0, 1), (−1, 1), (−1, 0),
(−1, −1) in (row, column)); symmetric and normalised per angle, as
``skimage.feature.graycomatrix(..., symmetric=True, normed=True)``. Per angle:

* contrast = Σ P(i, j) (i − j)² — 0 for a flat image, large for a fine checkerboard;
* homogeneity = Σ P(i, j) / (1 + (i − j)²) — 1 for a flat image.

The reported value is the mean over the four angles. This is a small numpy implementation (all
images at once with one ``bincount`` per angle) rather than scikit-image, which the project does
not install; the numbers are the same definition, and do not depend on whether it is installed.

Synthetic images whose texture differs from real images of their class (smoother, blotchier)
show up in :func:`texture_table` as a large two-sample Kolmogorov–Smirnov statistic
(:func:`texture_summary` per task, for the report), and :func:`texture_filter` drops single images
outside the range of real images of their value. Both depend on the image size: compare images
decoded at one size.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import ks_2samp

from porcelain.filter.chain import FilterResult

OFFSETS: tuple[tuple[int, int], ...] = ((0, 1), (-1, 1), (-1, 0), (-1, -1))
"""(row, column) offsets of 1 pixel at 0°, 45°, 90°, 135°."""


def to_gray_levels(images: np.ndarray, levels: int = 8) -> np.ndarray:
    """uint8 N×H×W×3 (or N×H×W grey) → int64 N×H×W grey levels in [0, levels)."""
    x = np.asarray(images)
    if x.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {x.dtype}")
    if x.ndim == 4:
        if x.shape[-1] != 3:
            raise ValueError(f"expected N×H×W×3 images, got {x.shape}")
        gray = np.clip(np.rint(x @ np.array([0.299, 0.587, 0.114])), 0, 255).astype(np.int64)
    elif x.ndim == 3:
        gray = x.astype(np.int64)
    else:
        raise ValueError(f"expected N×H×W×3 or N×H×W images, got {x.shape}")
    return gray * levels // 256


def glcm(images: np.ndarray, levels: int = 8) -> np.ndarray:
    """Symmetric normalised GLCMs: float64 N×A×L×L (A = the four angles of :data:`OFFSETS`)."""
    q = to_gray_levels(images, levels)
    n, h, w = q.shape
    out = np.zeros((n, len(OFFSETS), levels, levels))
    base = (np.arange(n) * levels * levels)[:, None, None]
    for a, (dr, dc) in enumerate(OFFSETS):
        r0, r1 = max(0, -dr), h - max(0, dr)
        c0, c1 = max(0, -dc), w - max(0, dc)
        src = q[:, r0:r1, c0:c1]
        dst = q[:, r0 + dr:r1 + dr, c0 + dc:c1 + dc]
        counts = np.bincount((base + src * levels + dst).ravel(), minlength=n * levels * levels)
        m = counts.reshape(n, levels, levels).astype(np.float64)
        m = m + m.transpose(0, 2, 1)
        total = m.sum((1, 2), keepdims=True)
        out[:, a] = np.divide(m, total, out=np.zeros_like(m), where=total > 0)
    return out


def glcm_features(images: np.ndarray, levels: int = 8) -> dict[str, np.ndarray]:
    """``{"contrast": (N,), "homogeneity": (N,)}``, each the mean over the four angles."""
    p = glcm(images, levels)
    i, j = np.meshgrid(np.arange(levels), np.arange(levels), indexing="ij")
    d2 = (i - j).astype(np.float64) ** 2
    return {"contrast": (p * d2).sum((2, 3)).mean(1), "homogeneity": (p / (1.0 + d2)).sum((2, 3)).mean(1)}


def texture_table(
    synthetic: Mapping[str, np.ndarray],
    synthetic_labels: Sequence[Hashable],
    real: Mapping[str, np.ndarray],
    real_labels: Sequence[Hashable],
) -> list[dict[str, Any]]:
    """One row per (class, statistic): n, mean and std of synthetic and real values, and the
    two-sample KS statistic and p-value (``scipy.stats.ks_2samp``; NaN when a side is empty).

    ``synthetic``/``real``: statistic name → per-image values (e.g. :func:`glcm_features`).
    """
    sl, rl = np.asarray(list(synthetic_labels), dtype=object), np.asarray(list(real_labels), dtype=object)
    rows: list[dict[str, Any]] = []
    classes = list(dict.fromkeys(list(rl) + list(sl)))
    for c in classes:
        for stat in synthetic:
            s = np.asarray(synthetic[stat], np.float64)[sl == c]
            r = np.asarray(real[stat], np.float64)[rl == c]
            if len(s) and len(r):
                ks = ks_2samp(s, r)
                d, p = float(ks.statistic), float(ks.pvalue)
            else:
                d = p = float("nan")
            rows.append({
                "class": c, "statistic": stat, "n_synthetic": int(len(s)), "n_real": int(len(r)),
                "synthetic_mean": float(s.mean()) if len(s) else float("nan"),
                "synthetic_std": float(s.std(ddof=1)) if len(s) > 1 else float("nan"),
                "real_mean": float(r.mean()) if len(r) else float("nan"),
                "real_std": float(r.std(ddof=1)) if len(r) > 1 else float("nan"),
                "ks": d, "ks_p": p,
            })
    return rows


STATISTICS = ("contrast", "homogeneity")
MIN_REAL = 10
"""Fewer real images of a value than this: its texture bounds come from all real images of the task."""


def _nan_none(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and np.isnan(x)) else float(x)


def texture_filter(
    generated: Mapping[str, np.ndarray],
    intended: Mapping[str, Sequence[Hashable]],
    real: Mapping[str, np.ndarray],
    real_labels: Mapping[str, Sequence[Hashable]],
    q: float,
    min_real: int = MIN_REAL,
) -> tuple[FilterResult, dict[tuple[str, Hashable], dict[str, Any]]]:
    """Drop an image whose GLCM statistic lies outside the ``[q, 1 − q]`` quantiles of the real images
    of its own value, for every task in ``intended`` and every statistic in ``generated``.

    ``generated``/``real``: statistic → per-image values (:func:`glcm_features`); ``intended``: task →
    the value each generated image was made for; ``real_labels``: task → each real image's value. A
    value with fewer than ``min_real`` real images takes the quantiles of all real images (of any
    value). Returns the verdict and, per (task, value), the bounds ``{stat: (lo, hi)}``, ``n_real`` and
    ``pooled``. A reason names every failing task and statistic:
    ``"glaze=2: contrast 0.000 outside [0.412, 2.310]"``.
    """
    if not 0 < q < 0.5:
        raise ValueError(f"q must lie in (0, 0.5), got {q}")
    stats = list(generated)
    n = len(next(iter(generated.values()))) if stats else 0
    keep = np.ones(n, bool)
    why: list[list[str]] = [[] for _ in range(n)]
    bounds: dict[tuple[str, Hashable], dict[str, Any]] = {}
    for task, values in intended.items():
        labels = np.asarray(list(real_labels[task]), dtype=object)
        values = list(values)
        if len(values) != n:
            raise ValueError(f"intended[{task!r}] has {len(values)} values for {n} images")
        for v in dict.fromkeys(values):
            mine = labels == v
            pooled = int(mine.sum()) < min_real
            sel = np.ones(len(labels), bool) if pooled else mine
            if not sel.any():
                raise ValueError("no real images to take texture bounds from")
            b: dict[str, Any] = {"n_real": int(sel.sum()), "pooled": pooled}
            for stat in stats:
                lo, hi = np.quantile(np.asarray(real[stat], np.float64)[sel], [q, 1 - q])
                b[stat] = (float(lo), float(hi))
            bounds[(task, v)] = b
        for i, v in enumerate(values):
            b = bounds[(task, v)]
            for stat in stats:
                x, (lo, hi) = float(generated[stat][i]), b[stat]
                if not lo <= x <= hi:
                    keep[i] = False
                    why[i].append(f"{task}={v}: {stat} {x:.3f} outside [{lo:.3f}, {hi:.3f}]"
                                  + (" (all real images)" if b["pooled"] else ""))
    return FilterResult(keep, tuple("; ".join(w) for w in why)), bounds


def texture_summary(
    synthetic: np.ndarray,
    synthetic_labels: np.ndarray,
    real: np.ndarray,
    real_labels: np.ndarray,
    tasks: Sequence[str],
    classes: Mapping[str, Sequence[str]],
    levels: int = 8,
) -> dict[str, Any]:
    """Per task, :func:`texture_table` rows by class name, plus a row ``"(all)"`` pooling the
    classes; NaN as None (JSON). Labels are int N×T, in ``tasks`` order."""
    s, r = glcm_features(synthetic, levels), glcm_features(real, levels)
    out: dict[str, Any] = {"levels": levels, "statistics": list(STATISTICS), "n_synthetic": int(len(synthetic)),
                           "n_real": int(len(real)), "tasks": {}}
    for t, task in enumerate(tasks):
        names = classes[task]
        rows = texture_table(s, ["(all)"] * len(synthetic), r, ["(all)"] * len(real))
        rows += texture_table(s, [names[int(v)] for v in synthetic_labels[:, t]],
                              r, [names[int(v)] for v in real_labels[:, t]])
        out["tasks"][task] = [{k: (_nan_none(v) if isinstance(v, float) else v) for k, v in row.items()}
                              for row in rows]
    return out
