"""Classification metrics per task (torchmetrics), with the minority-class view the paper reports.

Classes absent from both the predictions and the targets of the evaluated set
----------------------------------------------------------------------------
Their F1 is undefined (0/0). ``torchmetrics.MulticlassF1Score(average="macro")`` **leaves them out
of the macro average** (it averages over classes with ``tp + fp + fn > 0``); this equals
``sklearn.metrics.f1_score(average="macro", labels=<classes present in targets or preds>)``.
In ``per_class_f1`` (``average=None``) they appear as 0.0 and are listed in ``absent_classes`` so
that a reader can tell them apart from classes that were present and all wrong. The minority
macro-F1 follows the same rule: the mean of the per-class F1 over the minority classes that are
present; NaN when none is present. A class present only in the predictions (a false alarm) or only
in the targets (all missed) counts, with F1 = 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from porcelain.generate.plan import imbalance_ratio


def minority_classes(counts: Sequence[int]) -> list[int]:
    """Classes whose training count is at most the median training count of the task (never empty).

    With an even number of classes the median is the mean of the two middle counts (``np.median``).
    When all counts are equal, every class is a minority class.
    """
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 1 or c.size == 0:
        raise ValueError(f"counts must be a non-empty 1-D sequence, got {counts!r}")
    chosen = [int(k) for k in np.flatnonzero(c <= np.median(c))]
    return chosen or [int(np.argmin(c))]



def _task_metrics(pred: np.ndarray, target: np.ndarray, n_classes: int, train_counts: Sequence[int]) -> dict[str, Any]:
    p = torch.from_numpy(np.asarray(pred, dtype=np.int64))
    y = torch.from_numpy(np.asarray(target, dtype=np.int64))
    acc = MulticlassAccuracy(num_classes=n_classes, average="micro")(p, y)
    macro = MulticlassF1Score(num_classes=n_classes, average="macro")(p, y)
    per_class = MulticlassF1Score(num_classes=n_classes, average=None)(p, y)
    support = np.bincount(target, minlength=n_classes)
    predicted = np.bincount(pred, minlength=n_classes)
    present = (support + predicted) > 0
    minority = minority_classes(train_counts)
    minority_present = [k for k in minority if present[k]]
    per_class_list = [float(v) for v in per_class]
    minority_f1 = float(np.mean([per_class_list[k] for k in minority_present])) if minority_present else float("nan")
    return {
        "n": int(target.size),
        "accuracy": float(acc),
        "macro_f1": float(macro),
        "per_class_f1": per_class_list,
        "minority_classes": minority,
        "minority_macro_f1": minority_f1,
        "support": [int(s) for s in support],
        "absent_classes": [int(k) for k in np.flatnonzero(~present)],
        "train_counts": [int(c) for c in train_counts],
        "imbalance_ratio": imbalance_ratio(train_counts),
    }


def evaluate_predictions(
    preds: Sequence[np.ndarray],
    labels: np.ndarray,
    task_names: Sequence[str],
    num_classes: Sequence[int],
    train_counts: Sequence[Sequence[int]],
) -> dict[str, Any]:
    """Metrics of predicted class indices against labels (N×T), task by task.

    ``preds[t]``, ``labels[:, t]``, ``num_classes[t]`` and ``train_counts[t]`` all refer to
    ``task_names[t]``. Returns ``{"per_task": {task: {...}}, "mean": {...}}``: per task ``n``,
    ``accuracy`` (micro), ``macro_f1``, ``per_class_f1``, ``minority_classes``,
    ``minority_macro_f1``, ``support`` (test count per class), ``absent_classes``,
    ``train_counts``, ``imbalance_ratio``; ``mean`` averages accuracy, macro-F1 and minority
    macro-F1 over tasks (NaN-aware for the latter).
    """
    labels = np.asarray(labels)
    t_count = len(task_names)
    if labels.ndim != 2 or labels.shape[1] != t_count:
        raise ValueError(f"labels must be N×{t_count}, got shape {labels.shape}")
    if not (len(preds) == len(num_classes) == len(train_counts) == t_count):
        raise ValueError(
            f"{t_count} tasks but {len(preds)} prediction arrays, {len(num_classes)} class counts, "
            f"{len(train_counts)} training count lists"
        )
    if labels.shape[0] == 0:
        raise ValueError("no samples to evaluate")
    per_task: dict[str, dict[str, Any]] = {}
    for t, task in enumerate(task_names):
        pred = np.asarray(preds[t]).reshape(-1)
        target = labels[:, t]
        c = int(num_classes[t])
        if pred.shape[0] != target.shape[0]:
            raise ValueError(f"task {task!r}: {pred.shape[0]} predictions for {target.shape[0]} labels")
        if len(train_counts[t]) != c:
            raise ValueError(f"task {task!r}: {len(train_counts[t])} training counts for {c} classes")
        for what, arr in (("predictions", pred), ("labels", target)):
            if not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() >= c:
                raise ValueError(f"task {task!r}: {what} must be integers in [0, {c})")
        per_task[task] = _task_metrics(pred, target, c, train_counts[t])
    minority = [m["minority_macro_f1"] for m in per_task.values()]
    mean = {
        "accuracy": float(np.mean([m["accuracy"] for m in per_task.values()])),
        "macro_f1": float(np.mean([m["macro_f1"] for m in per_task.values()])),
        "minority_macro_f1": float(np.nanmean(minority)) if not all(np.isnan(minority)) else float("nan"),
    }
    return {"per_task": per_task, "mean": mean}
