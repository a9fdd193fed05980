"""Targeted generation: how many synthetic images each attribute combination gets, split into shards.

Rare combinations gain most: synthetic images are poured into the rarest combinations first
("water filling"), raising the floor of the combination histogram until the budget is spent. The
allocation for a larger budget contains the allocation for a smaller one. Shards start at multiples
of ``shard_size``; every image has its own seed, derived from its combination and its index within
it, and a shard's key holds its combination, start and seed but not its count. Growing a ratio
therefore reuses every finished shard whole and *extends* the last partial shard of a combination
by just the images it lacks (identical to the ones a fresh run would make), instead of regenerating it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

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

    ``seed`` is the combination's: image ``start + i`` is made from ``(seed, start + i)``, so any
    sub-range can be made on its own. ``sources`` are the ids of the real train images an
    image-conditioned kind starts from (one per image, or empty for kinds that start from noise).
    """

    combo: Combo
    start: int
    count: int
    seed: int
    sources: tuple[str, ...] = ()

    def key(self) -> str:
        """Where the shard lives: combination, start and seed — not the count (a shard grows in place
        when a larger ratio needs more of it) nor the sources (a function of the same three)."""
        d = {"combo": list(self.combo), "start": self.start, "seed": self.seed}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:20]

    def tail(self, have: int) -> ShardSpec:
        """The part of this shard after its first ``have`` images."""
        return replace(self, start=self.start + have, count=self.count - have, sources=self.sources[have:])

    def to_dict(self) -> dict:
        d = {"combo": list(self.combo), "start": self.start, "count": self.count, "seed": self.seed}
        if self.sources:
            d["sources"] = list(self.sources)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ShardSpec:
        return cls(combo=tuple(int(v) for v in d["combo"]), start=int(d["start"]), count=int(d["count"]),
                   seed=int(d["seed"]), sources=tuple(d.get("sources", ())))


def combination_seed(base_seed: int, combo: Combo) -> int:
    """The seed of a combination's images (each image adds its index within the combination)."""
    h = hashlib.sha256(f"{base_seed}|{','.join(map(str, combo))}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def plan_shards(allocations: Sequence[dict[Combo, int]], shard_size: int, base_seed: int) -> list[ShardSpec]:
    """Shards that cover the largest allocation of every combination, from multiples of shard_size on."""
    need: dict[Combo, int] = {}
    for alloc in allocations:
        for c, n in alloc.items():
            need[c] = max(need.get(c, 0), n)
    shards = []
    for c in sorted(need):
        for start in range(0, need[c], shard_size):
            shards.append(ShardSpec(combo=c, start=start, count=min(shard_size, need[c] - start),
                                    seed=combination_seed(base_seed, c)))
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
