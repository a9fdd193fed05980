"""Stage: decide how many synthetic images each attribute combination gets, for every sweep ratio."""

from __future__ import annotations

from typing import Any

from porcelain.config import GenerationConfig, SweepConfig, parse_ratio
from porcelain.data.ingest import dataset_key
from porcelain.generate.plan import (
    allocate,
    class_counts_after,
    combination_counts,
    imbalance_ratio,
    synthetic_budget,
)
from porcelain.storage import Store
from porcelain.synthesizers import SynthesizerConfig, get


def encode_alloc(alloc: dict[tuple[int, ...], int]) -> list[list]:
    """JSON form of an allocation: ``[[combo, n], …]`` for combinations that get images."""
    return [[list(c), n] for c, n in sorted(alloc.items()) if n > 0]


def decode_alloc(rows: list[list]) -> dict[tuple[int, ...], int]:
    return {tuple(int(v) for v in c): int(n) for c, n in rows}


def plan_generation(store: Store, data: dict[str, Any], sweep: SweepConfig, cfg: GenerationConfig,
                    synthesizers: list[SynthesizerConfig]) -> dict[str, Any]:
    """Allocation per ratio (the same for every synthesizer), each synthesizer's shards that cover
    them all (``shards[label]``), and imbalance ratios before and after."""
    meta = store.read_json(f"{dataset_key(data['data_hash'])}/dataset.json")
    tasks, classes = meta["tasks"], meta["classes"]
    train = [[classes[t].index(r["labels"][t]) for t in tasks] for r in meta["records"] if r["split"] == "train"]
    counts = combination_counts(train)
    real_counts = data["train_counts"]
    ratios = {}
    for ratio in sweep.ratios:
        n_syn = synthetic_budget(len(train), parse_ratio(ratio))
        alloc = allocate(counts, n_syn)
        after = class_counts_after(real_counts, alloc)
        ratios[ratio] = {
            "synthetic": n_syn,
            "alloc": encode_alloc(alloc),
            "class_counts": after,
            "imbalance": {t: imbalance_ratio(after[i]) for i, t in enumerate(tasks)},
        }
    need: dict[tuple[int, ...], int] = {}
    for r in ratios.values():
        for c, n in decode_alloc(r["alloc"]).items():
            need[c] = max(need.get(c, 0), n)
    shards = {s.label: get(s.kind).plan(store, data, s, need, cfg.shard_size, cfg.seed) for s in synthesizers}
    # Targeted combinations are the rarest ones, often with no test image at all: per-combination
    # gains there cannot be measured, and the report says so.
    test = {tuple(classes[t].index(r["labels"][t]) for t in tasks) for r in meta["records"] if r["split"] == "test"}
    targeted = sorted(c for c, n in need.items() if n > 0)
    return {
        "real_train": len(train),
        "combinations": [[list(c), n] for c, n in counts.items()],
        "imbalance_before": {t: imbalance_ratio(real_counts[i]) for i, t in enumerate(tasks)},
        "ratios": ratios,
        "shards": {label: [s.to_dict() for s in specs] for label, specs in shards.items()},
        "need": encode_alloc(need),  # images per combination the largest ratio reads
        "targeted_without_test": [list(c) for c in targeted if c not in test],
    }


def shards_for(alloc_rows: list[list], shards: list[Any]) -> list[Any]:
    """The shards one ratio reads: per combination, in index order, those holding the first
    ``alloc[combo]`` images it trains on (kept images only, when the shards were filtered).

    Only these enter that ratio's cache key, so adding a larger ratio leaves smaller ones cached.
    """
    alloc = decode_alloc(alloc_rows)

    def field(s: Any, k: str) -> Any:
        return s.get(k) if isinstance(s, dict) else getattr(s, k)

    out, got = [], {}
    for s in sorted(shards, key=lambda s: (tuple(field(s, "combo")), field(s, "start"))):
        c = tuple(field(s, "combo"))
        if got.get(c, 0) >= alloc.get(c, 0):
            continue
        kept = field(s, "kept")
        got[c] = got.get(c, 0) + (field(s, "n") if kept is None else len(kept))
        out.append(s)
    return out


def synthetic_for(alloc_rows: list[list], shards: list[Any]) -> dict[str, Any]:
    """What one run trains on: ``{"alloc", "shards"}``, the allocation capped per combination by the
    images its shards hold (after filters, a combination left short after top-up gives what it kept;
    the report says which), and the shards it reads (:func:`shards_for`)."""
    def field(s: Any, k: str) -> Any:
        return s.get(k) if isinstance(s, dict) else getattr(s, k)

    have: dict[tuple[int, ...], int] = {}
    for s in shards:
        kept = field(s, "kept")
        c = tuple(field(s, "combo"))
        have[c] = have.get(c, 0) + (field(s, "n") if kept is None else len(kept))
    capped = {c: min(n, have.get(c, 0)) for c, n in decode_alloc(alloc_rows).items()}
    rows = encode_alloc(capped)
    return {"alloc": rows, "shards": shards_for(rows, shards)}
