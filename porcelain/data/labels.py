"""Label checks: spellings that differ only in case, and columns that cannot be classification tasks."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from porcelain.data.splits import SPLIT_ALIASES
from porcelain.errors import DataError

__all__ = ["case_variants", "check_split_lookalikes", "check_tasks_have_classes", "fold_map"]


def case_variants(labels: Iterable[str]) -> list[list[tuple[str, int]]]:
    """Groups of spellings that differ only in case, each ``[(spelling, count), …]`` most frequent first.

    Ties are broken by the spelling (sorted), so the result does not depend on row order.
    """
    counts = Counter(labels)
    groups: dict[str, list[tuple[str, int]]] = {}
    for spelling, n in counts.items():
        groups.setdefault(spelling.casefold(), []).append((spelling, n))
    out = [sorted(g, key=lambda sn: (-sn[1], sn[0])) for g in groups.values() if len(g) > 1]
    return sorted(out, key=lambda g: g[0][0])


def fold_map(groups: list[list[tuple[str, int]]]) -> dict[str, str]:
    """``{spelling: most frequent spelling}`` for every variant in ``groups`` (from :func:`case_variants`)."""
    return {spelling: group[0][0] for group in groups for spelling, _ in group[1:]}


def describe_variants(task: str, groups: list[list[tuple[str, int]]], folded: bool) -> str:
    """One sentence naming the case variants of ``task``: what happened and what to do."""
    parts = "; ".join(", ".join(f"{s!r} ({n} rows)" for s, n in g) for g in groups)
    if folded:
        into = ", ".join(repr(g[0][0]) for g in groups)
        return f"task {task!r}: labels differing only in case were merged (data.fold_case) into {into}: {parts}"
    return (f"task {task!r}: labels differing only in case count as separate classes: {parts}. "
            "If they are the same class, set data.fold_case: true (each group becomes its most frequent "
            "spelling) or correct the manifest")


def _split_hint(column: str) -> str:
    if column != "split" and column.strip().casefold() in ("split", "splits", "subset", "partition"):
        return (f" A split column must be named 'split' in lowercase (this one is {column!r}): rename it, and "
                "it gives the train/val/test split instead of becoming a task.")
    return ""


def check_split_lookalikes(manifest: str, header: list[str], values: Mapping[str, Iterable[str]]) -> None:
    """Refuse a column named like ``split`` (``Split``, ``SPLIT``, ``split `` …) whose values are all split names.

    Such a column would silently become a classification task of train/val/test.
    """
    for column in header:
        if column == "split" or column.strip().casefold() != "split":
            continue
        seen = {v.strip().lower() for v in values.get(column, []) if v.strip()}
        if seen and seen <= set(SPLIT_ALIASES):
            raise DataError(f"{manifest}: column {column!r} holds split names {sorted(seen)} but would be read as "
                            f"a classification task.{_split_hint(column)}")


def check_tasks_have_classes(manifest: str, classes_seen: Mapping[str, Iterable[str]], n_records: int) -> None:
    """A task needs at least two classes among the usable rows; raise :class:`DataError` naming the column."""
    for task, seen in classes_seen.items():
        values = sorted(set(seen))
        if len(values) >= 2:
            continue
        what = f"a single value {values[0]!r}" if values else "no value"
        raise DataError(
            f"{manifest}: column {task!r} has {what} in all {n_records} usable rows, so it cannot be a "
            "classification task (a task needs at least two classes). Remove the column, list the task "
            f"columns in data.tasks, or add rows of its other classes.{_split_hint(task)}")
