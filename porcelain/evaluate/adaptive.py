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
from typing import Any

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


def choose_adaptive(store: Any, data: dict[str, Any], runs: list[dict[str, Any]], synthesizer: str,
                    baseline_arm: str, image_size: int, *, n_boot: int = 1000,
                    strong: float = 0.02) -> dict[str, Any] | None:
    """Stage: the adaptive arm of one synthesizer, chosen on the real **val** split only.

    The ratio: the synthesizer's arm with the best mean val macro-F1 over seeds (each run's selected
    checkpoint). The weights: per task, :func:`synthetic_loss_weight` of the paired bootstrap
    difference of val macro-F1 between that arm and the real-only baseline (same seeds, same val
    images). ``None`` when the synthesizer has no arm or there is no val split. Test predictions are
    never read here, so the adaptive arm's test score is as honest as every fixed ratio's.
    """
    import numpy as np

    from porcelain.data.ingest import load_split

    arms: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        if r.get("synthesizer") == synthesizer and not r.get("synthetic_task_weights") \
                and float(r.get("real_fraction", 1.0)) >= 1.0:
            arms.setdefault(r.get("arm") or r["ratio"], []).append(r)
    base = {r["seed"]: r for r in runs if (r.get("arm") or r["ratio"]) == baseline_arm}
    if not arms or not base:
        return None
    tasks = data["tasks"]
    _, val_y = load_split(store, data["data_hash"], image_size, data["n_shards"], "val")
    if not len(val_y):
        return None
    val_score = {a: float(np.mean([r["best_val_macro_f1"] for r in rs])) for a, rs in arms.items()}
    arm = max(sorted(val_score), key=lambda a: val_score[a])
    chosen = sorted(arms[arm], key=lambda r: r["seed"])
    pairs = [(base[r["seed"]], r) for r in chosen if r["seed"] in base]

    def val_preds(run: dict[str, Any]) -> dict[str, np.ndarray]:
        doc = store.read_json(run["predictions"])["val"]
        return {t: np.asarray(doc[t], np.int64) for t in tasks}

    n_classes = {t: len(data["classes"][t]) for t in tasks}
    deltas, weights, reasons = val_weights(val_y, tasks, n_classes, [val_preds(a) for a, _ in pairs],
                                           [val_preds(b) for _, b in pairs], n_boot=n_boot, strong=strong)
    return {"synthesizer": synthesizer, "arm": arm, "ratio": chosen[0]["ratio"], "val_macro_f1": val_score,
            "val_deltas": deltas, "weights": weights, "reasons": reasons, "n_seeds": len(pairs)}


def val_weights(val_y: Any, tasks: list[str], n_classes: Mapping[str, int], base: list[Mapping[str, Any]],
                new: list[Mapping[str, Any]], *, n_boot: int = 1000, strong: float = 0.02,
                ) -> tuple[dict[str, dict[str, float]], dict[str, float], dict[str, str]]:
    """Per task: the paired bootstrap val macro-F1 difference ``new − base`` (``base[i]``/``new[i]``:
    seed i's val predictions per task), the weight it gives and why."""
    from porcelain.evaluate.stats import paired_bootstrap

    deltas, weights, reasons = {}, {}, {}
    for t, task in enumerate(tasks):
        d = paired_bootstrap([b[task] for b in base], [n[task] for n in new], val_y[:, t], n_classes[task],
                             "macro_f1", n_boot=n_boot)
        deltas[task] = {k: float(d[k]) for k in ("delta", "low", "high")}
        weights[task], reasons[task] = synthetic_loss_weight(d["delta"], d["low"], d["high"], strong=strong)
    return deltas, weights, reasons
