"""Source images for image-conditioned kinds: which real train image each synthetic image starts from."""

from __future__ import annotations

from typing import Any

import numpy as np

from porcelain.data.ingest import load_split, split_ids
from porcelain.generate.plan import Combo, ShardSpec, plan_shards
from porcelain.hashing import stable_hash
from porcelain.results import FileRef, ModelRef
from porcelain.storage import Store
from porcelain.synthesizers.base import Synthesizer


def plan_with_sources(store: Store, data: dict[str, Any], need: dict[Combo, int], shard_size: int, seed: int,
                      size: int) -> list[ShardSpec]:
    """The usual shards, each image naming its source: image j of combination c starts from the j-th
    image of a seeded cycle over c's real train images (ids: their sha256), so that the source of an
    image depends on (c, j) only, and a grown shard keeps its sources."""
    ids = split_ids(store, data["data_hash"], "train")
    _, labels = load_split(store, data["data_hash"], size, data["n_shards"], "train")
    by_combo: dict[Combo, list[str]] = {}
    for sid, row in zip(ids, map(tuple, labels.tolist())):
        by_combo.setdefault(row, []).append(sid)
    out = []
    for s in plan_shards([need], shard_size, seed):
        pool = by_combo[tuple(s.combo)]
        order = np.random.default_rng(s.seed).permutation(len(pool))
        sources = tuple(pool[order[(s.start + i) % len(pool)]] for i in range(s.count))
        out.append(ShardSpec(combo=s.combo, start=s.start, count=s.count, seed=s.seed, sources=sources))
    return out


def source_rows(store: Store, data_hash: str, spec: ShardSpec) -> np.ndarray:
    """Row of each of the shard's sources in :func:`load_split`'s train arrays."""
    row = {sid: i for i, sid in enumerate(split_ids(store, data_hash, "train"))}
    return np.asarray([row[s] for s in spec.sources], dtype=np.int64)


class ImageConditioned(Synthesizer):
    """Shared by kinds that edit real train images with the closed-set generator (``cfg.generator``)."""

    image_conditioned = True

    def plan(self, store: Store, data: dict[str, Any], cfg: Any, need: dict[Combo, int], shard_size: int,
             seed: int) -> list[ShardSpec]:
        return plan_with_sources(store, data, need, shard_size, seed, cfg.generator.resolution)

    def model_ref(self, refiner: ModelRef, data: dict[str, Any], name: str, file: FileRef, **meta: Any) -> ModelRef:
        """The kind's reference: the refiner's files plus its own stored ``file`` (saliency maps, captions)."""
        identity = {"refiner": refiner.identity, name: file.sha256}
        return ModelRef(kind=self.kind, key=stable_hash(identity, 24), identity=identity,
                        files={**refiner.files, name: file},
                        meta={**refiner.meta, "refiner": refiner.model_dump(mode="json"), "data_hash": data["data_hash"],
                              "n_shards": data["n_shards"], **meta})
