"""Targeted generation: how many synthetic images each attribute combination gets, split into shards.

Rare combinations gain most: synthetic images are poured into the rarest combinations first
("water filling"), raising the floor of the combination histogram until the budget is spent. The
allocation for a larger budget contains the allocation for a smaller one, and every shard holds
exactly ``shard_size`` images from a multiple of ``shard_size`` on (the last one of a combination
too), so a shard's key never depends on a ratio: growing a ratio reuses every finished shard and
only adds new ones.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

Combo = tuple[int, ...]


def synthetic_budget(n_real: int, synthetic_fraction: float) -> int:
    """Images to add so that synthetic images make ``synthetic_fraction`` of the training set."""
    if not 0 <= synthetic_fraction < 1:
        raise ValueError(f"synthetic fraction must be in [0, 1), got {synthetic_fraction}")
    return int(round(n_real * synthetic_fraction / (1 - synthetic_fraction)))


def combination_counts(labels: Iterable[Sequence[int]]) -> dict[Combo, int]:
    return dict(sorted(Counter(tuple(int(v) for v in row) for row in labels).items()))


def allocate(counts: dict[Combo, int], total: int) -> dict[Combo, int]:
    """Water-filling: give ``total`` images to the rarest combinations first.

    Every combination ends at ``max(count, level)`` for one common level; the remainder goes to the
    rarest combinations (ties broken by combination order). Deterministic and monotone in ``total``.
    """
    if total < 0:
        raise ValueError("total must be >= 0")
    combos = sorted(counts, key=lambda c: (counts[c], c))
    alloc = {c: 0 for c in counts}
    if total == 0 or not combos:
        return alloc
    level, remaining, i = counts[combos[0]], total, 0
    # Raise the floor one group at a time.
    while remaining > 0:
        while i < len(combos) and counts[combos[i]] <= level:
            i += 1
        width = i  # combinations at the floor
        next_level = counts[combos[i]] if i < len(combos) else math.inf
        room = (next_level - level) * width
        if room <= remaining:
            remaining -= int(room)
            level = int(next_level)
            continue
        rise, rest = divmod(remaining, width)
        level += rise
        for c in combos[:width]:
            alloc[c] = level - counts[c]
        for c in combos[:rest]:
            alloc[c] += 1
        return alloc
    for c in combos:
        alloc[c] = max(0, level - counts[c])
    return alloc


@dataclass(frozen=True)
class ShardSpec:
    """One unit of generation work: ``count`` images of one combination, from image ``start`` on.

    ``sources`` are the ids of the real train images an image-conditioned kind starts from (one per
    image, or empty for kinds that start from noise).
    """

    combo: Combo
    start: int
    count: int
    seed: int
    sources: tuple[str, ...] = ()

    def key(self) -> str:
        d = asdict(self)
        if not self.sources:
            d.pop("sources")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:20]

    def to_dict(self) -> dict:
        d = {"combo": list(self.combo), "start": self.start, "count": self.count, "seed": self.seed}
        if self.sources:
            d["sources"] = list(self.sources)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ShardSpec:
        return cls(combo=tuple(int(v) for v in d["combo"]), start=int(d["start"]), count=int(d["count"]),
                   seed=int(d["seed"]), sources=tuple(d.get("sources", ())))


def shard_seed(base_seed: int, combo: Combo, start: int) -> int:
    h = hashlib.sha256(f"{base_seed}|{','.join(map(str, combo))}|{start}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def plan_shards(allocations: Sequence[dict[Combo, int]], shard_size: int, base_seed: int) -> list[ShardSpec]:
    """Full shards that cover the largest allocation of every combination (boundaries at multiples of
    shard_size; the last shard may hold more images than any ratio reads)."""
    need: dict[Combo, int] = {}
    for alloc in allocations:
        for c, n in alloc.items():
            need[c] = max(need.get(c, 0), n)
    shards = []
    for c in sorted(need):
        for start in range(0, need[c], shard_size):
            shards.append(ShardSpec(combo=c, start=start, count=shard_size, seed=shard_seed(base_seed, c, start)))
    return shards


def imbalance_ratio(counts: Sequence[int]) -> float:
    """Most common class count over least common, over classes with a count > 0 (1.0 for a single such
    class); NaN when no class has one. The one definition (metrics and the plan both use it)."""
    nz = [c for c in counts if c > 0]
    return float(max(nz) / min(nz)) if nz else float("nan")


def class_counts_after(real_counts: Sequence[Sequence[int]], alloc: dict[Combo, int]) -> list[list[int]]:
    """Per-task class counts of real + synthetic images."""
    out = [list(map(int, c)) for c in real_counts]
    for combo, n in alloc.items():
        for t, v in enumerate(combo):
            out[t][v] += n
    return out
