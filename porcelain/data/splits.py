"""Splits: the seeded stratified train/val/test split, split-name aliases, and sharding of records."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from porcelain.data.records import SPLITS, Record
from porcelain.errors import ConfigError

__all__ = ["SPLITS", "SPLIT_ALIASES", "check_fractions", "shard", "stratified_split"]

SPLIT_ALIASES: dict[str, str] = {"train": "train", "training": "train", "val": "val", "valid": "val",
                                 "validation": "val", "dev": "val", "test": "test", "testing": "test"}
"""Accepted spellings of the split values (lower-cased before lookup)."""


def _rank(seed: int, ident: str) -> str:
    return hashlib.sha256(f"{seed}\x00{ident}".encode()).hexdigest()


def _largest_remainder(exact: dict[Any, float], capacity: dict[Any, int], seed: int) -> dict[Any, int]:
    """Integer quotas ≤ capacity whose total is ``round(sum(exact))`` (Hamilton's method)."""
    quota = {k: min(int(np.floor(v)), capacity[k]) for k, v in exact.items()}
    target = int(np.floor(sum(exact.values()) + 0.5))
    order = sorted(exact, key=lambda k: (-(exact[k] - np.floor(exact[k])), _rank(seed, repr(k))))
    missing = target - sum(quota.values())
    for k in order:
        if missing <= 0:
            break
        if quota[k] < capacity[k]:
            quota[k] += 1
            missing -= 1
    return quota


def stratified_split(keys: Sequence[tuple[str, ...]], ids: Sequence[str], *, val_fraction: float = 0.15,
                     test_fraction: float = 0.2, seed: int = 0) -> list[str]:
    """A seeded split (``"train"``/``"val"``/``"test"`` per item), stratified by ``keys``.

    Items are grouped by key (the full label tuple). Groups of 1–2 items go to train entirely, so
    that rare classes are learnable. In larger groups every split gets about its fraction, at least
    one item stays in train, and the per-group roundings are chosen (largest remainder) so that the
    totals match the fractions of the eligible items. Within a group, items are ordered by a seeded
    hash of their id: the result depends on ``(keys, ids, seed)`` and not on the order of the items.
    ``ids`` should be unique (image sha256).
    """
    if len(keys) != len(ids):
        raise ValueError("keys and ids must have the same length")
    check_fractions(val_fraction, test_fraction)
    groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        groups[tuple(k)].append(i)
    out = ["train"] * len(keys)
    eligible = {k: sorted(idx, key=lambda i: _rank(seed, ids[i])) for k, idx in groups.items() if len(idx) >= 3}
    if not eligible:
        return out
    n = {k: len(v) for k, v in eligible.items()}
    test = _largest_remainder({k: n[k] * test_fraction for k in eligible}, {k: n[k] - 1 for k in eligible}, seed)
    val = _largest_remainder({k: n[k] * val_fraction for k in eligible},
                             {k: n[k] - 1 - test[k] for k in eligible}, seed + 1)
    for k, idx in eligible.items():
        for pos, i in enumerate(idx):
            out[i] = "test" if pos < test[k] else "val" if pos < test[k] + val[k] else "train"
    return out


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in "
                          "[0, 1) and add up to less than 1")


def shard(records: Sequence[Record], shard_size: int) -> list[list[Record]]:
    """Split records into lists of at most ``shard_size``, in sha256 order (deterministic in content)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    ordered = sorted(records, key=lambda r: (r.sha256, r.image))
    return [ordered[i: i + shard_size] for i in range(0, len(ordered), shard_size)]
