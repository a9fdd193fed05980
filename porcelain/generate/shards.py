"""Stage: generate one shard of synthetic images and record its provenance.

A shard's images go to content-addressed objects first; the shard manifest is written last and is
the shard's commit marker: a shard exists once its manifest does, so a killed run leaves at most
unreferenced objects and never a half shard. A rerun skips every shard whose manifest holds the
images asked for; a shard asked for more (a larger ratio) is extended by the missing images only,
which equal those a fresh run would make (every image has its own seed).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from porcelain.config import RuntimeConfig
from porcelain.data.images import decode_image, encode_png, to_array
from porcelain.generate.plan import ShardSpec
from porcelain.hashing import code_version, stable_hash
from porcelain.results import ModelRef, ShardRef, key_of
from porcelain.runtime import apply_runtime, runtime_identity
from porcelain.storage import Store
from porcelain.synthesizers import SynthesizerConfig, get
from porcelain.versions import stage_identity


def shard_key(ref: ModelRef, spec: ShardSpec, cfg: SynthesizerConfig, runtime: RuntimeConfig) -> str:
    """``synthetic/<model and sampling identity>/shards/<spec>.json``: from content, never from paths.

    The prefix holds the prepared model's content key, the kind's sampling settings, the kind's and
    the writer's stage versions and the numeric runtime; the name holds the shard's combination,
    start and seed (not its count: a shard grows in place).
    """
    sub = stable_hash({"model": key_of(ref), "settings": cfg.identity(), "runtime": runtime_identity(runtime),
                       "kind": stage_identity(f"synthesizer:{cfg.kind}"), "writer": stage_identity("shards")}, 20)
    return f"synthetic/{sub}/shards/{spec.key()}.json"


def generate_shard(store: Store, ref: ModelRef | dict[str, Any], spec: dict[str, Any] | ShardSpec,
                   cfg: SynthesizerConfig, runtime: RuntimeConfig) -> ShardRef:
    """Make one shard with ``cfg.kind``'s synthesizer and store it; skip it if it exists.

    The one writer for every kind: images go to content-addressed objects first, the manifest (with
    per-image and per-shard provenance) last, under a lock.
    """
    apply_runtime(runtime, concurrent=runtime.workers)
    ref = ref if isinstance(ref, ModelRef) else ModelRef.model_validate(ref)
    shard = spec if isinstance(spec, ShardSpec) else ShardSpec.from_dict(spec)
    key = shard_key(ref, shard, cfg, runtime)
    with store.lock(key):
        have: list[dict[str, Any]] = []
        if store.exists(key) and "shards" not in runtime.refresh:
            have = store.read_json(key)["images"]
        if len(have) < shard.count:  # new, or grown by a larger ratio: make only the missing tail
            _write(store, ref, shard, key, cfg, runtime, have)
    return ShardRef(key=key, n=shard.count, combo=list(shard.combo), start=shard.start, synthesizer=cfg.label)


def _write(store: Store, ref: ModelRef, full: ShardSpec, key: str, cfg: SynthesizerConfig,
           runtime: RuntimeConfig, have: list[dict[str, Any]]) -> None:
    shard = full.tail(len(have))
    out = get(cfg.kind).generate(store, ref, shard, cfg, runtime)
    if len(out.images) != shard.count:
        raise RuntimeError(f"synthesizer {cfg.kind} made {len(out.images)} images for a shard of {shard.count}")
    if out.provenance and len(out.provenance) != shard.count:
        raise RuntimeError(f"synthesizer {cfg.kind} gave {len(out.provenance)} provenance records for {shard.count} images")
    objects = [store.put_object(encode_png(np.asarray(img, dtype=np.uint8)), "png") for img in out.images]
    classes, tasks = ref.meta.get("classes"), ref.meta.get("tasks")
    named = {t: classes[t][v] for t, v in zip(tasks, shard.combo)} if classes and tasks else {}
    per_image = out.provenance or [{} for _ in objects]
    store.write_json(key, {  # the manifest, last: the shard holds these images once it is written
        "images": have + [{"key": k, "index": shard.start + i, **({"provenance": p} if p else {})}
                          for i, (k, p) in enumerate(zip(objects, per_image))],
        "provenance": {
            "synthesizer": cfg.kind, "settings": cfg.identity(), "combination": named, "combo": list(full.combo),
            "seed": full.seed, "start": full.start, "count": full.count, "sources": list(full.sources),
            "model": key_of(ref), **out.shard, "runtime": runtime_identity(runtime), "code_version": code_version(),
        },
    })


def load_synthetic(store: Store, shards: list[ShardRef | dict[str, Any]], alloc: dict[tuple[int, ...], int],
                   size: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``alloc[combo]`` generated images of each combination, as arrays at ``size`` px."""
    by_combo: dict[tuple[int, ...], list[tuple[int, str]]] = {}
    for ref in shards:
        ref = ref if isinstance(ref, ShardRef) else ShardRef.model_validate({"synthesizer": "", **ref})
        manifest = store.read_json(ref.key)
        combo = tuple(manifest["provenance"]["combo"])
        kept = None if ref.kept is None else set(ref.kept)  # filtered shards: only the kept images
        by_combo.setdefault(combo, []).extend((im["index"], im["key"]) for im in manifest["images"]
                                              if kept is None or im["index"] in kept)
    images, labels = [], []
    for combo, n in sorted(alloc.items()):
        if n <= 0:
            continue
        have = sorted(by_combo.get(combo, []))
        if len(have) < n:
            raise RuntimeError(f"combination {combo} needs {n} synthetic images but its shards hold {len(have)}")
        for _, obj in have[:n]:
            images.append(to_array(decode_image(store.read_bytes(obj)), size))
            labels.append(combo)
    if not images:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros((0, 0), np.int64)
    return np.stack(images), np.asarray(labels, dtype=np.int64)
