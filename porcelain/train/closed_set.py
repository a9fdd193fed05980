"""Stage: train the closed-set generator on the train split and save it to the store."""

from __future__ import annotations

import hashlib
import time
from typing import Any


from porcelain.config import GeneratorConfig, RuntimeConfig
from porcelain.data.ingest import load_split
from porcelain.hashing import code_version, stable_hash
from porcelain.models.generator import create_generator
from porcelain.models.weights import weights_bytes
from porcelain.progress import LogProgress
from porcelain.runtime import apply_runtime
from porcelain.storage import Store
from porcelain.train.generator import train_generator


def generator_key(data_hash: str, cfg: GeneratorConfig) -> str:
    return stable_hash({"data": data_hash, "generator": cfg, "code": code_version()})


def train_closed_set(store: Store, data: dict[str, Any], cfg: GeneratorConfig, runtime: RuntimeConfig) -> dict[str, Any]:
    """Train from scratch on the real train split only; return a reference to the saved weights."""
    apply_runtime(runtime)
    key = generator_key(data["data_hash"], cfg)
    base = f"generators/{key}"
    with store.lock(base):  # a second run of the same config waits here, then reuses the result
        if store.exists(f"{base}/ref.json"):
            return store.read_json(f"{base}/ref.json")
        return _train(store, data, cfg, runtime, key, base)


def _train(store: Store, data: dict[str, Any], cfg: GeneratorConfig, runtime: RuntimeConfig, key: str,
           base: str) -> dict[str, Any]:
    images, labels = load_split(store, data["data_hash"], cfg.resolution, data["n_shards"], "train")
    num_classes = [len(data["classes"][t]) for t in data["tasks"]]
    # Seeded initialisation that leaves torch's global RNG as it was (other tasks may be using it).
    model = create_generator(cfg.preset, num_classes=num_classes, resolution=cfg.resolution, seed=cfg.seed,
                             **cfg.spec.overrides())
    start = time.monotonic()
    model, history = train_generator(
        model, images, labels, steps=cfg.train_steps, batch_size=cfg.batch_size, lr=cfg.lr,
        label_dropout=cfg.label_dropout, seed=cfg.seed, device=runtime.device, dtype=runtime.dtype,
        ema=cfg.ema, snr_gamma=cfg.snr_gamma, balance=cfg.balance, hflip=cfg.hflip,
        progress=LogProgress("closed-set generator training"),
    )
    seconds = time.monotonic() - start
    spec = model.spec.to_dict()
    blob = weights_bytes(model.state_dict(), {"data_hash": data["data_hash"], "preset": cfg.preset})
    store.write_bytes(f"{base}/model.safetensors", blob)
    losses = history.get("loss", [])
    ref = {
        "key": key,
        "weights": f"{base}/model.safetensors",
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
        "spec": spec,
        "tasks": data["tasks"],
        "classes": data["classes"],
        "train_images": int(len(images)),
        "steps": cfg.train_steps,
        "seconds": round(seconds, 1),
        "final_loss": float(sum(losses[-50:]) / max(1, len(losses[-50:]))) if losses else None,
    }
    store.write_json(f"{base}/history.json", history)
    store.write_json(f"{base}/ref.json", ref)  # written last: the generator exists once this does
    return ref
