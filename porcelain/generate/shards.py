"""Stage: generate one shard of synthetic images and record its provenance.

A shard's images go to content-addressed objects first; the shard manifest is written last and is
the shard's commit marker: a shard exists once its manifest does, so a killed run leaves at most
unreferenced objects and never a half shard. A rerun skips every shard whose manifest exists.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from porcelain.config import GenerationConfig, RuntimeConfig
from porcelain.data.images import decode_image, encode_png, to_array
from porcelain.generate.plan import ShardSpec
from porcelain.generate.sampling import sample_images
from porcelain.hashing import code_version, stable_hash
from porcelain.models.generator import ConditionalUNet, create_generator
from porcelain.models.weights import load_weights
from porcelain.runtime import apply_runtime
from porcelain.storage import Store


def sampling_params(cfg: GenerationConfig) -> dict[str, Any]:
    """The generation settings that change the images (batch size does not)."""
    return {"steps": cfg.steps, "guidance": cfg.guidance}


def shard_key(gen: dict[str, Any], spec: ShardSpec, cfg: GenerationConfig) -> str:
    sub = stable_hash({"weights": gen["weights_sha256"], "sampling": sampling_params(cfg), "code": code_version()})
    return f"synthetic/{sub}/shards/{spec.key()}.json"


_MODELS: dict[str, ConditionalUNet] = {}  # by weights sha256: shards of one run reuse the loaded model


def load_generator(store: Store, gen: dict[str, Any]) -> ConditionalUNet:
    """Load the generator a reference points to, checking the weights against their recorded hash."""
    sha = gen["weights_sha256"]
    if sha not in _MODELS:
        state, _ = load_weights(store.read_verified(gen["weights"], sha))
        model = create_generator(gen["spec"])
        model.load_state_dict(state)
        _MODELS.clear()
        _MODELS[sha] = model.eval()
    return _MODELS[sha]


def generate_shard(store: Store, gen: dict[str, Any], spec: dict[str, Any], cfg: GenerationConfig,
                   runtime: RuntimeConfig) -> dict[str, Any]:
    """Generate ``spec.count`` images of one attribute combination; return ``{"key", "n"}``."""
    apply_runtime(runtime, concurrent=runtime.workers)
    shard = ShardSpec.from_dict(spec)
    key = shard_key(gen, shard, cfg)
    ref = {"key": key, "n": shard.count, "combo": list(shard.combo), "start": shard.start}
    with store.lock(key):
        if not store.exists(key):
            _generate(store, gen, shard, key, cfg, runtime)
    return ref


def _generate(store: Store, gen: dict[str, Any], shard: ShardSpec, key: str, cfg: GenerationConfig,
              runtime: RuntimeConfig) -> None:
    model = load_generator(store, gen)
    labels = np.tile(np.asarray(shard.combo, dtype=np.int64), (shard.count, 1))
    images = sample_images(model, labels, steps=cfg.steps, guidance=cfg.guidance, seed=shard.seed,
                           batch_size=cfg.batch_size, device=runtime.device, dtype=runtime.dtype)
    objects = [store.put_object(encode_png(img), "png") for img in images]
    named = {t: gen["classes"][t][v] for t, v in zip(gen["tasks"], shard.combo)}
    store.write_json(key, {
        "images": [{"key": k, "index": shard.start + i} for i, k in enumerate(objects)],
        "provenance": {
            "combination": named,
            "combo": list(shard.combo),
            "seed": shard.seed,
            "start": shard.start,
            "count": shard.count,
            "model_sha256": gen["weights_sha256"],
            "generator": gen["key"],
            "steps": cfg.steps,
            "guidance": cfg.guidance,
            "code_version": code_version(),
        },
    })


def load_synthetic(store: Store, shards: list[dict[str, Any]], alloc: dict[tuple[int, ...], int],
                   size: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``alloc[combo]`` generated images of each combination, as arrays at ``size`` px."""
    by_combo: dict[tuple[int, ...], list[tuple[int, str]]] = {}
    for ref in shards:
        manifest = store.read_json(ref["key"])
        combo = tuple(manifest["provenance"]["combo"])
        by_combo.setdefault(combo, []).extend((im["index"], im["key"]) for im in manifest["images"])
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
