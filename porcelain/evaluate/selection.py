"""Which setting of each synthesizer kind to keep, chosen on the real **val** split.

A sweep widened along strength, guidance, filters or ratio holds many arms of one kind (``sgd_mix``
at S = 0.3, 0.5, auto; each at several ratios). Reading the best of them off the *test* table would
pick the luckiest draw; here the choice is made on val (each run's selected checkpoint's mean val
macro-F1, averaged over seeds), and the test comparison of the chosen arm is reported as it stands
in the verdict table — its interval is one of the run's corrected comparisons, so choosing does not
narrow it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def arm_of(run: Mapping[str, Any]) -> str:
    return run.get("arm") or run["ratio"]


def best_on_val(runs: list[Mapping[str, Any]], kinds: Mapping[str, str], baseline_arm: str) -> dict[str, dict[str, Any]]:
    """Per kind (``kinds``: synthesizer label → kind): the arm with the highest mean
    ``best_val_macro_f1`` over its seeds among that kind's arms (every entry, ratio and adaptive arm;
    learning-curve runs on a share of the real set excluded), with every candidate's val score and the
    real-only baseline's. Ties go to the alphabetically first arm. Kinds with no arm are left out."""
    by_arm: dict[str, list[float]] = {}
    kind_of: dict[str, str] = {}
    base: list[float] = []
    for r in runs:
        if float(r.get("real_fraction", 1.0)) < 1.0 or r.get("best_val_macro_f1") is None:
            continue
        arm = arm_of(r)
        if arm == baseline_arm:
            base.append(float(r["best_val_macro_f1"]))
        elif r.get("synthesizer") in kinds:
            by_arm.setdefault(arm, []).append(float(r["best_val_macro_f1"]))
            kind_of[arm] = kinds[r["synthesizer"]]
    out: dict[str, dict[str, Any]] = {}
    for kind in sorted(set(kind_of.values())):
        scores = {a: sum(v) / len(v) for a, v in sorted(by_arm.items()) if kind_of[a] == kind}
        best = max(sorted(scores), key=scores.__getitem__)  # max keeps the first of equals
        out[kind] = {"arm": best, "val_macro_f1": scores[best], "candidates": scores,
                     "n_seeds": len(by_arm[best]), "baseline_val_macro_f1": sum(base) / len(base) if base else None}
    return out
