"""A filter chain over generated images, its pass rates, and the top-up plan that keeps ratios honest.

Each filter step is ``(name, fn)``; ``fn(indices)`` judges the images at ``indices`` (those that
survived the earlier steps) and returns a :class:`FilterResult` for them. Steps run in order, so
an expensive filter (CLIP) only sees what cheap ones (faithfulness) kept. :func:`run_chain`
returns the combined keep mask, the first failing step and its reason per image, and per step
how many images reached it and passed, overall, per attribute combination and per task value.

Filtering drops images unevenly across combinations; a run that asked for ``ratio × real`` images
of a combination would then train on fewer. :func:`top_up_plan` says how many more to generate
per combination, from the observed yield (kept / attempts), within a cap on attempts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class FilterResult:
    """Verdict of one filter on ``n`` images: ``keep`` (bool, length n) and a reason per image
    (``""`` where kept)."""

    keep: np.ndarray
    reasons: tuple[str, ...]

    def __post_init__(self) -> None:
        keep = np.asarray(self.keep, dtype=bool)
        if keep.ndim != 1 or len(keep) != len(self.reasons):
            raise ValueError(f"keep ({keep.shape}) and reasons ({len(self.reasons)}) must be 1-D of equal length")
        object.__setattr__(self, "keep", keep)


FilterFn = Callable[[np.ndarray], FilterResult]


@dataclass(frozen=True)
class PassCounts:
    """Images that reached a step and how many of them passed."""

    reached: int
    passed: int

    @property
    def rate(self) -> float:
        """passed / reached (NaN when none reached the step)."""
        return self.passed / self.reached if self.reached else float("nan")


@dataclass
class ChainResult:
    """Outcome of :func:`run_chain`."""

    keep: np.ndarray
    """Combined keep mask (kept by every step)."""
    failed_at: np.ndarray
    """Index of the first step that dropped the image; -1 where kept."""
    reasons: list[str]
    """``"step: reason"`` of the first failing step; ``""`` where kept."""
    steps: list[str]
    causes: list[str] = field(default_factory=list)
    """The failing step's own reason (without the step's name); ``""`` where kept."""
    overall: dict[str, PassCounts] = field(default_factory=dict)
    per_combo: dict[str, dict[Hashable, PassCounts]] = field(default_factory=dict)
    per_class: dict[str, dict[str, dict[Hashable, PassCounts]]] = field(default_factory=dict)
    """step -> task -> value -> counts."""

    def counts_json(self) -> dict[str, dict[str, Any]]:
        """The pass counts as JSON: per step ``reached``/``passed``, ``per_combo`` as ``[combo, reached,
        passed]`` rows (tuples as lists) and ``per_value`` as task -> str(value) -> ``[reached, passed]``."""
        out: dict[str, dict[str, Any]] = {}
        for name in self.steps:
            o = self.overall[name]
            out[name] = {
                "reached": o.reached, "passed": o.passed,
                "per_combo": [[list(c) if isinstance(c, tuple) else c, k.reached, k.passed]
                              for c, k in self.per_combo[name].items()],
                "per_value": {t: {str(v): [k.reached, k.passed] for v, k in vals.items()}
                              for t, vals in self.per_class[name].items()}}
        return out

    def kept_per_combo(self, combos: Sequence[Hashable]) -> dict[Hashable, int]:
        """How many images of each combination the whole chain kept (0 for combinations with none kept)."""
        out: dict[Hashable, int] = {c: 0 for c in combos}
        for c, k in zip(combos, self.keep):
            out[c] += int(k)
        return out


def _counts(groups: Sequence[Hashable], reached: np.ndarray, passed: np.ndarray) -> dict[Hashable, PassCounts]:
    out: dict[Hashable, list[int]] = {}
    for g, r, p in zip(groups, reached, passed):
        c = out.setdefault(g, [0, 0])
        c[0] += int(r)
        c[1] += int(p)
    return {g: PassCounts(r, p) for g, (r, p) in out.items()}


def run_chain(
    steps: Sequence[tuple[str, FilterFn]],
    combos: Sequence[Hashable],
    labels: Mapping[str, Sequence[Hashable]] | None = None,
) -> ChainResult:
    """Apply ``steps`` in order to ``len(combos)`` images; each sees only the survivors of the earlier ones.

    ``combos``: the attribute combination of each image (e.g. a tuple of task values);
    ``labels``: task -> value per image, for pass rates per task value (optional).
    """
    n = len(combos)
    names = [name for name, _ in steps]
    if len(set(names)) != len(names):
        raise ValueError(f"filter names must be distinct, got {names}")
    labels = {t: list(v) for t, v in (labels or {}).items()}
    for t, v in labels.items():
        if len(v) != n:
            raise ValueError(f"labels[{t!r}] has {len(v)} entries for {n} images")
    keep = np.ones(n, bool)
    failed_at = np.full(n, -1, np.int64)
    reasons = [""] * n
    result = ChainResult(keep, failed_at, reasons, names, [""] * n)
    for s, (name, fn) in enumerate(steps):
        idx = np.flatnonzero(keep)
        verdict = fn(idx) if len(idx) else FilterResult(np.zeros(0, bool), ())
        if len(verdict.keep) != len(idx):
            raise ValueError(f"filter {name!r} returned {len(verdict.keep)} verdicts for {len(idx)} images")
        reached = keep.copy()
        passed = np.zeros(n, bool)
        passed[idx] = verdict.keep
        for i, k, why in zip(idx, verdict.keep, verdict.reasons):
            if not k:
                failed_at[i] = s
                reasons[i] = f"{name}: {why}" if why else name
                result.causes[i] = why
        keep &= passed
        result.overall[name] = PassCounts(int(reached.sum()), int(passed.sum()))
        result.per_combo[name] = _counts(combos, reached, passed)
        result.per_class[name] = {t: _counts(v, reached, passed) for t, v in labels.items()}
    return result


@dataclass(frozen=True)
class TopUp:
    """Plan for one combination."""

    more: int
    """Images to generate next (0 when the planned count is met or attempts are exhausted)."""
    attempts_per_kept: float
    """attempts / kept so far (inf when none kept)."""
    expected_kept: int
    """kept + what ``more`` is expected to yield at the observed rate (capped at the planned count)."""
    capped: bool
    """True when ``max_attempts`` stopped the plan short of the expected need."""


def top_up_plan(
    kept_per_combo: Mapping[Hashable, int],
    planned_per_combo: Mapping[Hashable, int],
    attempts: Mapping[Hashable, int],
    max_attempts: int | Mapping[Hashable, int],
) -> dict[Hashable, TopUp]:
    """How many more images to generate per combination so that each reaches its planned count after filtering.

    Rule: ``yield = kept / attempts`` for the combination (attempts = images generated so far);
    ``more = ceil((planned - kept) / yield)``. With nothing kept yet the yield is unknown and the
    plan doubles the attempts (``more = attempts``, at least the shortfall). Total attempts never
    exceed ``max_attempts`` (per combination, or one number for all); ``capped`` marks where that
    bound bit. Keeping the filtered count at the plan keeps a ratio of synthetic to real meaning
    what it says.
    """
    out: dict[Hashable, TopUp] = {}
    for combo, planned in planned_per_combo.items():
        kept = int(kept_per_combo.get(combo, 0))
        tried = int(attempts.get(combo, 0))
        cap = int(max_attempts[combo] if isinstance(max_attempts, Mapping) else max_attempts)
        if kept > tried:
            raise ValueError(f"{combo!r}: {kept} kept out of {tried} attempts")
        need = max(int(planned) - kept, 0)
        per_kept = tried / kept if kept else float("inf")
        if need == 0:
            out[combo] = TopUp(0, per_kept, kept, False)
            continue
        if kept:
            want = math.ceil(need * tried / kept)
        else:
            want = max(tried, need)
        more = max(min(want, cap - tried), 0)
        expected = kept + (int(more * kept / tried) if kept else 0)
        out[combo] = TopUp(more, per_kept, min(expected, int(planned)), more < want)
    return out
