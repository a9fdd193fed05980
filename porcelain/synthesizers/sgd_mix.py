"""Kind ``sgd_mix``: saliency-guided mixing refined by diffusion (SGD-Mix, arXiv 2505.11813).

For each synthetic image of a label combination: a real train image of that combination is the
source; among ``candidates`` other train images (seeded), the one whose normalised saliency map is
nearest in L2 is the target; the source's foreground (Otsu mask of its saliency) united with the
target's is kept from the source, the rest is the target's background; then img2img at ``strength``
with the source's labels harmonises the seam. The label is the source's. The refiner is the
closed-set generator by default (trained once, shared with a ``closed_set`` entry of equal
``generator:``; CPU-sized), or with ``refiner: sd_lora`` Stable Diffusion + LoRA of ``sd:`` (trained
once, shared with an ``sd_lora`` entry of equal settings), prompted with the source's labels as the
``sd_lora`` kind prompts them: its template, and with ``class_tokens`` the learned
"[v_i] [metaclass]" class tokens (:mod:`porcelain.diffusion.img2img`).

Saliency is Grad-CAM on the stored reference classifier (default) or spectral residual (no
classifier); maps are stored once per (data, reference weights, method) and reused by every run.
"""

from __future__ import annotations

import hashlib
import time
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import Field
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from porcelain.augment.masks import foreground_mask, union_mask
from porcelain.augment.mixing import choose_targets, mix
from porcelain.config import GeneratorConfig, RuntimeConfig, SamplingConfig
from porcelain.data.ingest import load_split, split_ids
from porcelain.generate.plan import ShardSpec
from porcelain.hashing import canonical_safetensors, stable_hash
from porcelain.results import FileRef, ModelRef
from porcelain.runtime import apply_runtime
from porcelain.storage import Store
from porcelain.synthesizers import get, register
from porcelain.synthesizers.base import Generated, SynthesizerConfig
from porcelain.synthesizers.drift import DriftSettings
from porcelain.synthesizers.sd_lora import image_seed
from porcelain.synthesizers.sources import AutoStrengthSettings, ImageConditioned, RefinerSettings, source_rows


class SgdMixConfig(SynthesizerConfig, AutoStrengthSettings, DriftSettings, RefinerSettings):
    """``{kind: sgd_mix, strength: 0.5, saliency: gradcam, candidates: 30, generator: {...}, sampling: {...}}``,
    or with ``refiner: sd_lora`` an ``sd: {base: ..., ...}`` block instead of ``generator``/``sampling``."""

    kind: Literal["sgd_mix"] = "sgd_mix"
    strength: Annotated[float, Field(ge=0.0, le=1.0)] | Literal["auto"] = Field(0.5, description=(
        "img2img strength S of the refinement: 0 keeps the mix as is, 1 is txt2img from noise (the mix is lost); "
        "auto: per image, the largest of auto_strengths whose result keeps its label (the reference judges)."))
    saliency: Literal["gradcam", "spectral"] = Field("gradcam", description=(
        "gradcam: Grad-CAM of the reference classifier (mean over task heads, or saliency_task); spectral: "
        "spectral-residual saliency (no classifier, cheaper, the paper's alternative)."))
    saliency_task: str | None = Field(None, description="Explain only this task's head (default: mean over tasks).")
    candidates: int = Field(30, ge=1, le=1000, description=(
        "Targets drawn per source; the nearest saliency map wins (the paper: 30–50; 1 = a random target)."))
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig, description="The closed-set refiner.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Refiner sampling (steps, guidance).")

    def prepare_identity(self) -> dict[str, Any]:
        auto = {"auto_strength": True} if self.strength == "auto" else {}  # (its prepared model holds the reference)
        return {"kind": self.kind, "refiner": self.refiner_config().prepare_identity(), "saliency": self.saliency,
                "saliency_task": self.saliency_task, **auto}

    def identity(self) -> dict[str, Any]:
        return {**self.prepare_identity(), "strength": self.strength, "candidates": self.candidates,
                **self.sampling_identity(), **self.auto_identity()}

    def image_sizes(self) -> list[int]:
        return [self.resolution]


_image_seed = image_seed  # image i's seed from (seed, i): its target draw, and its noise on the SD refiner


def _resize_maps(maps: np.ndarray, size: int) -> np.ndarray:
    if maps.shape[-1] == size:
        return maps.astype(np.float32)
    import torch

    t = torch.from_numpy(maps.astype(np.float32))[:, None]
    return torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()


SALIENCY_VERSIONS = {"gradcam": 1, "spectral": 2}
"""Bumped when a saliency method's maps change for the same images (spectral 2: mirrored, σ = 8)."""


def saliency_maps(store: Store, data: dict[str, Any], cfg: SgdMixConfig, reference: dict[str, Any] | None,
                  runtime: RuntimeConfig) -> tuple[FileRef, float]:
    """The train images' saliency maps at the refiner's resolution, stored once; (file, seconds)."""
    size = cfg.resolution
    ident = {"data": data["data_hash"], "method": cfg.saliency, "task": cfg.saliency_task, "size": size,
             "reference": reference["weights_sha256"] if cfg.saliency == "gradcam" else None,
             "algorithm": SALIENCY_VERSIONS[cfg.saliency]}
    key = f"saliency/{stable_hash(ident, 24)}.safetensors"
    with store.lock(key):
        if store.exists(key):
            blob = store.read_bytes(key)
            return FileRef(key=key, sha256=hashlib.sha256(blob).hexdigest()), float(st_load(blob)["seconds"][0])
        t0 = time.monotonic()
        if cfg.saliency == "spectral":
            from porcelain.augment.saliency import spectral_residual_maps

            images, _ = load_split(store, data["data_hash"], size, data["n_shards"], "train")
            maps = spectral_residual_maps(images)
        else:
            from porcelain.augment.saliency import gradcam_maps
            from porcelain.evaluate.reference import load_reference

            model = load_reference(store, reference)
            images, labels = load_split(store, data["data_hash"], reference["image_size"], data["n_shards"], "train")
            tasks = [cfg.saliency_task] if cfg.saliency_task else data["tasks"]
            unknown = sorted(set(tasks) - set(data["tasks"]))
            if unknown:
                raise ValueError(f"sgd_mix saliency_task {unknown[0]!r} is not a task; tasks: {data['tasks']}")
            per_task = [gradcam_maps(model, images, model.task_names.index(t), classes=labels[:, data["tasks"].index(t)],
                                     device="cpu" if runtime.device == "auto" else runtime.device) for t in tasks]
            maps = np.mean(per_task, axis=0)
        maps = _resize_maps(maps, size)
        seconds = time.monotonic() - t0
        blob = canonical_safetensors(st_save({"maps": maps.astype(np.float32),
                                              "seconds": np.asarray([seconds], np.float64)}))
        store.write_bytes(key, blob)
        return FileRef(key=key, sha256=hashlib.sha256(blob).hexdigest()), seconds


@register
class SgdMix(ImageConditioned):
    kind: ClassVar[str] = "sgd_mix"
    config: ClassVar[type[SynthesizerConfig]] = SgdMixConfig
    version: ClassVar[str] = "2"  # 2: spectral saliency mirrored at the edges, σ = 8 (new maps, new masks)
    needs: ClassVar[frozenset[str]] = frozenset({"reference"})
    libs: ClassVar[tuple[str, ...]] = ("torch", "diffusers", "numpy")

    def prepare(self, store: Store, data: dict[str, Any], cfg: SgdMixConfig, runtime: RuntimeConfig,
                context: dict[str, Any] | None = None) -> ModelRef:
        """The refiner (cached like a closed_set or sd_lora entry of its settings) and the saliency maps."""
        apply_runtime(runtime)
        refiner = self.prepare_refiner(store, data, cfg, runtime)
        reference = (context or {}).get("reference")
        maps, seconds = saliency_maps(store, data, cfg, reference, runtime)
        extra = {"resolution": cfg.resolution} if cfg.refiner == "sd_lora" else {}
        if cfg.strength == "auto":  # each image's strength is judged by the reference when it is made
            if reference is None:
                raise ValueError("sgd_mix strength auto needs the reference classifier")
            extra["reference"] = reference
        return self.model_ref(refiner, data, "saliency", maps, saliency_seconds=round(seconds, 2), **extra)

    def augment(self, store: Store, ref: ModelRef, cfg: SgdMixConfig, src: np.ndarray, *, seed: int, first_index: int,
                strength: float, runtime: RuntimeConfig) -> tuple[np.ndarray, list[dict[str, Any]], dict[str, np.ndarray]]:
        """Mix and refine the train images at rows ``src``: (images, provenance, intermediates for the audit grid)."""
        h, size = ref.meta["data_hash"], cfg.resolution
        images, labels = load_split(store, h, size, ref.meta["n_shards"], "train")
        ids = split_ids(store, h, "train")
        f = ref.files["saliency"]
        maps = st_load(store.read_verified(f.key, f.sha256))["maps"]
        targets = np.asarray([int(choose_targets(maps[[i]], maps, n_candidates=cfg.candidates,
                                                 seed=_image_seed(seed, first_index + j),
                                                 source_ids=[ids[i]], pool_ids=ids)[0])
                              for j, i in enumerate(src)], dtype=np.int64)
        masks = np.stack([union_mask(foreground_mask(maps[i]), foreground_mask(maps[t])) for i, t in zip(src, targets)])
        mixed = mix(images[src], images[targets], masks)
        prov = [{"source": ids[i], "target": ids[t], "mask_area": round(float(m.mean()), 4), "strength": strength,
                 "index": first_index + j} for j, (i, t, m) in enumerate(zip(src, targets, masks))]
        if cfg.refiner == "sd_lora":
            seeds = [_image_seed(seed, first_index + j) for j in range(len(src))]
            out, refined = self.refine_sd(store, ref, cfg, mixed, labels[src], seeds, strength=strength,
                                          runtime=runtime)
            prov = [{**p, **r} for p, r in zip(prov, refined)]
        else:
            from porcelain.generate.img2img import img2img

            model = get("closed_set")._load(store, ModelRef.model_validate(ref.meta["refiner"]))
            s = cfg.sampling
            out = img2img(model, mixed, labels[src], strength=strength, steps=s.steps, guidance=s.guidance,
                          seed=seed, first_index=first_index, batch_size=s.batch_size, device=runtime.device,
                          dtype=runtime.dtype)
        steps = {"source": images[src], "saliency": maps[src], "mask": masks, "target": images[targets],
                 "mix": mixed, "refined": out}
        return out, prov, steps

    def generate(self, store: Store, ref: ModelRef, spec: ShardSpec, cfg: SgdMixConfig,
                 runtime: RuntimeConfig) -> Generated:
        src = source_rows(store, ref.meta["data_hash"], spec)
        out, prov, _ = self.augment_any(store, ref, cfg, src, seed=spec.seed, first_index=spec.start,
                                        strength=cfg.strength, runtime=runtime)
        if cfg.refiner == "sd_lora":
            inf = cfg.sd.inference
            shard = {**self.refiner_shard(ref, cfg), "saliency": cfg.saliency, "strength": cfg.strength,
                     "steps": inf.steps, "guidance": inf.guidance, "lora_scale": inf.lora_scale}
        else:
            shard = {**self.refiner_shard(ref, cfg), "saliency": cfg.saliency, "strength": cfg.strength,
                     "steps": cfg.sampling.steps, "guidance": cfg.sampling.guidance}
        return Generated(images=list(out), provenance=prov, shard=shard)

    def describe(self, ref: ModelRef, cfg: SgdMixConfig) -> list[str]:
        lines = [f"- sources: real train images of each targeted combination; targets: the nearest of {cfg.candidates} "
                 f"candidates by {cfg.saliency} saliency (maps took {ref.meta.get('saliency_seconds')} s); union of "
                 "the two Otsu foreground masks kept from the source; label = the source's"]
        if cfg.refiner == "sd_lora":
            sd, inf = cfg.sd, cfg.sd.inference
            return [*lines, f"- refined by img2img at {cfg.strength_text()} with Stable Diffusion `{sd.base_id}` + "
                    f"LoRA ({ref.meta['steps']} training steps at {sd.resolution} px, class tokens: {sd.class_tokens}), "
                    f"prompted with the source's labels; DDIM {inf.steps} steps, guidance {inf.guidance}, LoRA scale "
                    f"{inf.lora_scale}; every image's prompt and seed are in its shard's provenance"]
        return [*lines, f"- refined by img2img at {cfg.strength_text()} with the closed-set generator "
                f"({ref.meta['steps']} steps at {cfg.generator.resolution} px), DDIM {cfg.sampling.steps} steps, "
                f"guidance {cfg.sampling.guidance}"]
