import pytest

from porcelain.generate.plan import (
    ShardSpec,
    allocate,
    class_counts_after,
    imbalance_ratio,
    plan_shards,
    synthetic_budget,
)
from porcelain.generate.targeting import encode_alloc, shards_for

COUNTS = {(0, 0): 100, (0, 1): 40, (1, 0): 10, (1, 1): 2}


def test_allocation_spends_the_budget_on_the_rarest_first():
    alloc = allocate(COUNTS, 20)
    assert sum(alloc.values()) == 20
    assert alloc[(0, 0)] == 0 and alloc[(0, 1)] == 0
    # the rarest combination gains most, and the floor rises evenly
    assert alloc[(1, 1)] > alloc[(1, 0)] > 0
    after = {c: COUNTS[c] + alloc[c] for c in COUNTS}
    assert abs(after[(1, 1)] - after[(1, 0)]) <= 1


@pytest.mark.parametrize("total", [0, 1, 7, 8, 50, 137, 1000])
def test_allocation_sums_and_is_monotone(total):
    a = allocate(COUNTS, total)
    b = allocate(COUNTS, total + 13)
    assert sum(a.values()) == total
    assert all(b[c] >= a[c] for c in COUNTS)


def test_budget_from_fraction():
    assert synthetic_budget(900, 0.1) == 100
    assert synthetic_budget(900, 0.0) == 0
    with pytest.raises(ValueError):
        synthetic_budget(10, 1.0)


def test_imbalance_shrinks_with_targeted_images():
    real = [[110, 42], [140, 12]]  # task 0 and task 1 class counts
    alloc = allocate(COUNTS, 60)
    after = class_counts_after(real, alloc)
    assert imbalance_ratio(after[1]) < imbalance_ratio(real[1])
    assert imbalance_ratio([5, 0, 1]) == 5.0


def test_shard_keys_do_not_depend_on_a_ratio_so_a_larger_ratio_reuses_or_extends_every_shard():
    small = allocate(COUNTS, 30)
    large = allocate(COUNTS, 90)
    only_small = plan_shards([small], 8, base_seed=1)
    both = plan_shards([small, large], 8, base_seed=1)
    assert only_small and all(s.start % 8 == 0 and 1 <= s.count <= 8 for s in both)
    # same places (keys) for every shard of the smaller plan; a last partial shard only grows
    by_key = {s.key(): s for s in both}
    assert {s.key() for s in only_small} < set(by_key)
    assert all(by_key[s.key()].count >= s.count for s in only_small)
    assert any(by_key[s.key()].count > s.count for s in only_small)  # this case does grow one
    # each combination is covered exactly
    for c, n in large.items():
        assert sum(s.count for s in both if s.combo == c) == n
    # one seed per combination: image start+i is made from (seed, start+i)
    for c in large:
        assert len({s.seed for s in both if s.combo == c}) <= 1
    spec = ShardSpec(combo=(1, 0), start=8, count=5, seed=3, sources=tuple("abcde"))
    assert ShardSpec.from_dict(spec.to_dict()) == spec
    assert spec.tail(2) == ShardSpec(combo=(1, 0), start=10, count=3, seed=3, sources=tuple("cde"))
    assert spec.key() == ShardSpec((1, 0), 8, 8, 3).key() != ShardSpec((1, 0), 8, 5, 4).key()


def test_shards_for_selects_only_what_a_ratio_reads():
    small = allocate(COUNTS, 30)
    large = allocate(COUNTS, 90)
    shards = [{**s.to_dict(), "key": s.key(), "n": s.count} for s in plan_shards([small, large], 8, 1)]
    chosen = shards_for(encode_alloc(small), shards)
    assert sum(min(s["n"], small[tuple(s["combo"])] - s["start"]) for s in chosen) == 30
    # and every image the ratio reads is in a chosen shard, none beyond
    for c, n in small.items():
        assert sum(s["n"] for s in chosen if tuple(s["combo"]) == c) >= n
    assert all(s["start"] < small[tuple(s["combo"])] for s in chosen)
    assert len(chosen) < len(shards)
