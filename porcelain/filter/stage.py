"""Stage: filter one shard's images (the chain of ``filters:``), and plan the top-up that refills
each combination to its planned count of kept images.

The verdicts (keep + reason per image) are stored beside the shard, keyed by the shard, how many
images it holds, the filter settings, the reference classifier and the stage version; the shard
reference that comes back lists the kept images, which is all the sweep reads.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

from porcelain.config import FilterConfig, RuntimeConfig
from porcelain.data.ingest import load_split
from porcelain.filter.faithfulness import faithfulness_filter
from porcelain.filter.memorisation import memorisation_filter
from porcelain.generate.plan import Combo, ShardSpec
from porcelain.hashing import stable_hash
from porcelain.results import ShardRef
from porcelain.runtime import apply_runtime, runtime_identity
from porcelain.storage import Store
from porcelain.synthesizers import SynthesizerConfig, get
from porcelain.versions import stage_identity


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def filter_shard(store: Store, data: dict[str, Any], shard: ShardRef | dict[str, Any], reference: dict[str, Any],
                 cfg: FilterConfig, runtime: RuntimeConfig) -> ShardRef:
    """Run the chain on ``shard``'s images; return the shard reference with ``kept`` filled in."""
    from porcelain.evaluate.reference import load_reference
    from porcelain.train.classifier import predict_logits

    apply_runtime(runtime, concurrent=runtime.workers)
    shard = shard if isinstance(shard, ShardRef) else ShardRef.model_validate(shard)
    key = "filtered/" + stable_hash({"shard": shard.key, "n": shard.n, "filters": cfg.model_dump(mode="json"),
                                     "reference": reference["weights_sha256"], "stage": stage_identity("filters"),
                                     "runtime": runtime_identity(runtime)}, 24) + ".json"
    with store.lock(key):
        if not store.exists(key) or "filters" in runtime.refresh:
            store.write_json(key, _verdicts(store, data, shard, reference, cfg, runtime, load_reference, predict_logits))
    doc = store.read_json(key)
    kept = [shard.start + i for i, k in enumerate(doc["keep"]) if k]
    return shard.model_copy(update={"kept": kept, "filter_key": key})


def _verdicts(store, data, shard, reference, cfg, runtime, load_reference, predict_logits) -> dict[str, Any]:
    from porcelain.data.images import decode_image, to_array

    size, h = reference["image_size"], data["data_hash"]
    combo = tuple(shard.combo)
    manifest = store.read_json(shard.key)
    ims = sorted(manifest["images"], key=lambda im: im["index"])[: shard.n]
    x = np.stack([to_array(decode_image(store.read_bytes(im["key"])), size) for im in ims])
    steps = []
    tasks = data["tasks"]
    if cfg.faithfulness is not None:
        model = load_reference(store, reference)
        logits = predict_logits(model, x, device=runtime.device, dtype=runtime.dtype)
        probs = {t: _softmax(logits[t]) for t in tasks}
        intended = {t: np.full(len(x), combo[i], dtype=np.int64) for i, t in enumerate(tasks)}
        steps.append(("faithfulness", lambda xs, idx: faithfulness_filter(
            {t: p[idx] for t, p in probs.items()}, {t: v[idx] for t, v in intended.items()}, cfg.faithfulness)))
    if cfg.memorisation is not None:
        train, _ = load_split(store, h, size, data["n_shards"], "train")
        test, _ = load_split(store, h, size, data["n_shards"], "test")
        steps.append(("memorisation", lambda xs, idx: memorisation_filter(xs, train, test, q=cfg.memorisation).as_filter()))
    keep = np.ones(len(x), dtype=bool)
    reasons = [""] * len(x)
    failed_at = [""] * len(x)
    for name, fn in steps:  # later filters see only the survivors
        idx = np.flatnonzero(keep)
        if not len(idx):
            break
        res = fn(x[idx], idx)
        for j, i in enumerate(idx):
            if not res.keep[j]:
                keep[i] = False
                reasons[i], failed_at[i] = res.reasons[j], name
    return {"keep": keep.tolist(), "reasons": reasons, "filter": failed_at, "combo": list(combo),
            "start": shard.start, "n": int(len(x))}


def top_up(store: Store, data: dict[str, Any], syn: SynthesizerConfig, need: dict[Combo, int], shards: list[ShardRef],
           cfg: FilterConfig, shard_size: int, seed: int) -> list[dict[str, Any]]:
    """The shard specs that refill every combination short of kept images (grown shards keep their
    keys, so only their new tail is generated). Empty when every combination has enough, or made
    ``max_attempts`` × its planned images already."""
    kept: Counter = Counter()
    made: Counter = Counter()
    for s in shards:
        kept[tuple(s.combo)] += len(s.kept) if s.kept is not None else s.n
        made[tuple(s.combo)] = max(made[tuple(s.combo)], s.start + s.n)
    grown: dict[Combo, int] = {}
    for c, n in need.items():
        if n <= 0 or kept[c] >= n:
            continue
        cap = math.ceil(cfg.max_attempts * n)
        if made[c] >= cap:
            continue
        rate = kept[c] / made[c] if made[c] and kept[c] else 0.5  # nothing kept yet: double
        grown[c] = min(cap, made[c] + math.ceil((n - kept[c]) / rate))
    if not grown:
        return []
    specs: list[ShardSpec] = get(syn.kind).plan(store, data, syn, grown, shard_size, seed)
    have = {(tuple(s.combo), s.start): s.n for s in shards}
    return [s.to_dict() for s in specs if have.get((tuple(s.combo), s.start), 0) < s.count]


def filter_summary(store: Store, shards: list[ShardRef | dict[str, Any]], need: dict[Combo, int],
                   classes: dict[str, list[str]], tasks: list[str]) -> dict[str, Any]:
    """Pass rates per filter, per task value, attempts per kept image, and combinations left short."""
    per_filter: Counter = Counter()
    per_value: dict[str, Counter] = {}
    made = kept = 0
    kept_by: Counter = Counter()
    examples = []
    for s in shards:
        s = s if isinstance(s, ShardRef) else ShardRef.model_validate(s)
        if s.filter_key is None:
            continue
        doc = store.read_json(s.filter_key)
        n_keep = sum(doc["keep"])
        made += len(doc["keep"])
        kept += n_keep
        kept_by[tuple(s.combo)] += n_keep
        for t, v in zip(tasks, s.combo):
            c = per_value.setdefault(f"{t}={classes[t][v]}", Counter())
            c["made"] += len(doc["keep"])
            c["kept"] += n_keep
        for k, f, r in zip(doc["keep"], doc["filter"], doc["reasons"]):
            if not k:
                per_filter[f] += 1
                if len(examples) < 8:
                    examples.append({"combo": s.combo, "filter": f, "reason": r})
    short = [[list(c), int(kept_by[c]), int(n)] for c, n in need.items() if n > 0 and kept_by[c] < n]
    return {"made": made, "kept": kept, "dropped_by": dict(per_filter),
            "attempts_per_kept": (made / kept) if kept else None,
            "by_value": {k: {"made": v["made"], "kept": v["kept"]} for k, v in sorted(per_value.items())},
            "short": short, "examples": examples}
