"""Stage: semantic drift of an image-conditioned synthesizer — how far its images move from their
sources, and how often the reference classifier no longer sees the source's label, per strength S.

This is how a user picks S: the share of augmented images whose predicted label differs from the
source's, per task, and the RMS pixel distance to the source, for each S in ``drift_strengths``,
on a seeded sample of real train images; plus an audit grid (source, saliency, mask, target, mix,
refined) at the configured S.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from porcelain.augment.drift import label_drift, pixel_distance
from porcelain.config import RuntimeConfig
from porcelain.data.ingest import load_split
from porcelain.hashing import stable_hash
from porcelain.results import ModelRef, key_of
from porcelain.runtime import apply_runtime, runtime_identity
from porcelain.storage import Store
from porcelain.synthesizers import SynthesizerConfig, get
from porcelain.versions import stage_identity

DRIFT_SEED = 20_251_201


class DriftSettings(BaseModel):
    """Mixed into the configs of image-conditioned kinds."""

    drift_strengths: list[float] = Field([0.3, 0.5, 0.7, 0.9, 1.0], description=(
        "Strengths at which the report measures semantic drift (label changes by the reference classifier, "
        "distance to the source)."))
    drift_images: int = Field(48, ge=1, le=10_000, description="Real train images the drift is measured on.")


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1] == size:
        return images
    import torch

    t = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _gray(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32)
    a = (a - a.min()) / (a.max() - a.min() + 1e-8) if a.dtype != bool else a
    return np.repeat((a * 255).astype(np.uint8)[..., None], 3, axis=-1)


def audit_grid(steps: dict[str, np.ndarray], rows: int = 6) -> bytes:
    """PNG: one row per source, one column per named step (maps and masks in gray)."""
    from PIL import Image

    names = list(steps)
    n = min(rows, len(steps[names[0]]))
    tiles = []
    for i in range(n):
        row = [steps[k][i] if steps[k][i].ndim == 3 else _gray(steps[k][i]) for k in names]
        tiles.append(np.concatenate(row, axis=1))
    grid = np.concatenate(tiles, axis=0) if tiles else np.zeros((8, 8, 3), np.uint8)
    scale = 4
    img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def measure_drift(store: Store, data: dict[str, Any], ref: ModelRef | dict[str, Any], cfg: SynthesizerConfig,
                  reference: dict[str, Any], runtime: RuntimeConfig) -> dict[str, Any]:
    """Drift per strength for ``cfg``'s image-conditioned kind (cached in the store)."""
    from porcelain.evaluate.reference import load_reference
    from porcelain.train.classifier import predict

    apply_runtime(runtime)
    ref = ref if isinstance(ref, ModelRef) else ModelRef.model_validate(ref)
    strengths = list(getattr(cfg, "drift_strengths"))
    n_img = int(getattr(cfg, "drift_images"))
    key = "drift/" + stable_hash({"model": key_of(ref), "settings": cfg.identity(), "strengths": strengths,
                                  "n": n_img, "reference": reference["weights_sha256"],
                                  "stage": stage_identity("drift"), "runtime": runtime_identity(runtime)}, 24)
    with store.lock(key):
        if store.exists(f"{key}/drift.json") and "drift" not in runtime.refresh:
            return store.read_json(f"{key}/drift.json")
        syn = get(cfg.kind)
        size = ref.meta.get("resolution") or cfg.image_sizes()[0]
        _, labels = load_split(store, data["data_hash"], size, data["n_shards"], "train")
        rng = np.random.default_rng(DRIFT_SEED)
        src = np.sort(rng.choice(len(labels), size=min(n_img, len(labels)), replace=False)).astype(np.int64)
        model = load_reference(store, reference)
        tasks = list(model.task_names)
        y = labels[src][:, [data["tasks"].index(t) for t in tasks]]
        rows = []
        for s in strengths:
            images, _, steps = syn.augment(store, ref, cfg, src, seed=DRIFT_SEED, first_index=0, strength=s,
                                           runtime=runtime)
            pred = predict(model, _resize(images, reference["image_size"]), device=runtime.device, dtype=runtime.dtype)
            shares = label_drift(pred, y)
            dist = pixel_distance(images, steps["source"])
            rows.append({"strength": s, "drift": {t: float(v) for t, v in zip(tasks, shares)},
                         "distance_median": float(np.median(dist)), "distance_mean": float(np.mean(dist))})
        strength = getattr(cfg, "strength")
        strength = strength if strength == "auto" else float(strength)
        augment = getattr(syn, "augment_any", syn.augment)
        _, _, steps = augment(store, ref, cfg, src[:6], seed=DRIFT_SEED, first_index=0, strength=strength,
                              runtime=runtime)
        audit = store.write_bytes(f"{key}/audit.png", audit_grid(steps))
        out = {"rows": rows, "n_images": int(len(src)), "strength": strength,
               "audit": audit, "audit_columns": list(steps), "tasks": [t for t in data["tasks"] if t in tasks]}
        store.write_json(f"{key}/drift.json", out)
        return out
