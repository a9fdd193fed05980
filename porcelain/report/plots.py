"""Report figures (matplotlib, no display): sample grid, imbalance before/after, macro-F1 per ratio,
filter score histograms and a captioned image grid (rejected images)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _bare(ax):
    """An image panel: no ticks, no frame."""
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)
    return ax


def sample_grid(rows: Sequence[tuple[str, Sequence[np.ndarray], Sequence[np.ndarray]]], per_side: int) -> bytes:
    """One row per combination: ``per_side`` real images, then ``per_side`` generated ones."""
    n = max(1, len(rows))
    fig, axes = plt.subplots(n, 2 * per_side, figsize=(2 * per_side * 0.9 + 3.2, n * 0.95 + 0.4), squeeze=False)
    for r, (label, real, syn) in enumerate(rows):
        for c in range(2 * per_side):
            ax = _bare(axes[r][c])
            # Real images are right-aligned against the generated ones: rare combinations have fewer
            # real images than slots, and left-aligned they left a wide empty band between the two.
            src = real if c < per_side else syn
            i = c - (per_side - min(len(real), per_side)) if c < per_side else c - per_side
            if 0 <= i < len(src):
                ax.imshow(src[i], interpolation="nearest")
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    if rows:
        axes[0][per_side - 1].set_title("real", fontsize=8, loc="right")
        axes[0][per_side].set_title("generated", fontsize=8, loc="left")
    fig.subplots_adjust(wspace=0.05, hspace=0.08)
    return _png(fig)


def imbalance_bars(tasks: Sequence[str], before: dict[str, float], after: dict[str, dict[str, float]]) -> bytes:
    """Imbalance ratio (most/least common class) per task, before and at each sweep ratio."""
    series = [("real only", before)] + [(f"with synthetic {r}", v) for r, v in after.items()]
    x = np.arange(len(tasks))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(1.6 * len(tasks) + 2, 3.2))
    for i, (name, vals) in enumerate(series):
        ax.bar(x + i * width, [vals[t] for t in tasks], width, label=name)
    ax.set_xticks(x + width * (len(series) - 1) / 2, tasks)
    ax.set_ylabel("imbalance ratio (max/min class)")
    ax.legend(fontsize=7)
    return _png(fig)


def metric_by_ratio(tasks: Sequence[str], ratios: Sequence[str],
                    stats: dict[str, dict[str, tuple[float, float, float]]], metric: str) -> bytes:
    """``stats[ratio][task] = (mean, low, high)``: a line per task with confidence-interval error bars."""
    fig, ax = plt.subplots(figsize=(1.4 * len(ratios) + 3, 3.4))
    x = np.arange(len(ratios))
    for t in tasks:
        m = np.array([stats[r][t][0] for r in ratios])
        lo = np.array([stats[r][t][1] for r in ratios])
        hi = np.array([stats[r][t][2] for r in ratios])
        err = np.vstack([np.nan_to_num(m - lo), np.nan_to_num(hi - m)])
        ax.errorbar(x, m, yerr=err, marker="o", capsize=3, label=t)
    ax.set_xticks(x, [f"{r}" for r in ratios])
    ax.set_xlabel("real:synthetic")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
    return _png(fig)


def score_histograms(panels: Sequence[tuple[str, Sequence[float], Sequence[float], Sequence[float]]]) -> bytes:
    """One histogram per ``(title, passed, dropped, thresholds)``: the scores of the images that
    reached a filter step, passed and dropped stacked, thresholds as dashed lines (at most 3 drawn;
    more are per-group thresholds, shown by their range)."""
    n = max(1, len(panels))
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, passed, dropped, thresholds) in zip(axes.flat, panels):
        values = np.asarray(list(passed) + list(dropped), np.float64)
        if len(values):
            bins = np.histogram_bin_edges(values, bins=min(30, max(5, len(values) // 3)))
            ax.hist([np.asarray(passed, np.float64), np.asarray(dropped, np.float64)], bins=bins, stacked=True,
                    color=["#4c9a5b", "#c4504a"], label=[f"passed ({len(passed)})", f"dropped ({len(dropped)})"])
        lines = sorted(thresholds)
        if len(lines) > 3:
            lines = [lines[0], lines[-1]]
        for i, t in enumerate(lines):
            ax.axvline(t, color="k", linestyle="--", linewidth=1,
                       label=("threshold" if len(thresholds) <= 3 else "threshold range") if i == 0 else None)
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return _png(fig)


def image_grid(items: Sequence[tuple[np.ndarray, str]], cols: int = 6) -> bytes:
    """Images with a caption under each (a few short lines), ``cols`` per row."""
    n = max(1, len(items))
    cols = min(cols, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.flat:
        _bare(ax)
    for ax, (image, caption) in zip(axes.flat, items):
        ax.imshow(image, interpolation="nearest")
        ax.set_xlabel(caption, fontsize=5.5, linespacing=1.1)
    fig.tight_layout()
    return _png(fig)
