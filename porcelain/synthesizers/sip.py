"""Kind ``sip``: captions chosen by CLIP, label + caption prompts, img2img with a CLIP-derived guidance
scale (SIP, arXiv 2302.02070).

For every real train image: BLIP captions (beam search and nucleus sampling), the caption CLIP finds
most similar to the image, the prompt ``label phrase + caption`` (the phrase from the prompt
vocabulary, repeated ``label_weight`` times), and the CLIP similarity of the image to its label
phrase. Each synthetic image is an img2img (SDEdit) of a train image of its combination at
``strength``, with guidance ``guidance_from_similarity(similarity)``: strong for images CLIP finds
atypical of their class, weak for typical ones (the paper gives no formula; see
:func:`porcelain.generate.img2img.guidance_from_similarity`). ``guidance: fixed`` uses
``sampling.guidance`` instead, for the comparison.

On the closed-set generator (CPU, the default refiner), which has no text encoder, SIP reduces to
label-conditioned SDEdit with the similarity-derived guidance: the captions and prompts are chosen
and recorded in provenance but cannot steer the image. With ``refiner: sd_lora`` (Stable Diffusion +
LoRA of ``sd:``, trained once and shared with an ``sd_lora`` entry of equal settings) the prompt
steers it: the label phrase is the ``sd_lora`` kind's prompt of the source's labels (its template,
with class tokens when trained with them), repeated ``label_weight`` times, then the chosen caption
(:func:`porcelain.diffusion.img2img.sd_prompts`); the CLIP similarity is still to the plain label
phrase of ``vocabulary``. Without ``clip``, the guidance is fixed; without ``captioner``, no captions
are made.

The guidance range (``w_min``, ``w_max``) defaults per refiner (:data:`GUIDANCE_RANGE`): the
closed-set generator was tuned at guidance ≈ 0.5, while Stable Diffusion's classifier-free guidance
is off at ≤ 1 and usually run at 5–10.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from porcelain.config import GeneratorConfig, RuntimeConfig, SamplingConfig
from porcelain.data.ingest import load_split
from porcelain.generate.plan import ShardSpec
from porcelain.hashing import stable_hash, weights_folder_identity
from porcelain.results import FileRef, ModelRef
from porcelain.runtime import apply_runtime
from porcelain.storage import Store
from porcelain.synthesizers import get, register
from porcelain.synthesizers.base import Generated, SynthesizerConfig
from porcelain.synthesizers.drift import DriftSettings
from porcelain.synthesizers.sd_lora import image_seed
from porcelain.synthesizers.sources import AutoStrengthSettings, ImageConditioned, RefinerSettings, source_rows

GUIDANCE_RANGE: dict[str, tuple[float, float]] = {"closed_set": (0.25, 1.5), "sd_lora": (4.0, 10.0)}
"""Default (w_min, w_max) of the similarity-derived guidance, per refiner (a choice; the paper gives none)."""


class SipConfig(SynthesizerConfig, AutoStrengthSettings, DriftSettings, RefinerSettings):
    """``{kind: sip, strength: 0.5, clip: local-dir:/models/clip, captioner: /models/blip, guidance: clip}``,
    or with ``refiner: sd_lora`` an ``sd: {base: ..., ...}`` block instead of ``generator``/``sampling``."""

    kind: Literal["sip"] = "sip"
    strength: Annotated[float, Field(ge=0.0, le=1.0)] | Literal["auto"] = Field(0.5, description=(
        "img2img strength (noise rate) of the edit; auto: per image, the largest of auto_strengths whose result "
        "the reference classifier still gives the source's labels (as sgd_mix's strength auto)."))
    clip: str | None = Field(None, description="open_clip weights: 'local-dir:/folder' (open_clip_config.json + "
                             "one .safetensors). Needed for CLIP caption choice and similarity guidance.")
    captioner: str | None = Field(None, description="BLIP folder or HF cache id (offline), e.g. "
                                  "Salesforce/blip-image-captioning-base; none: no captions.")
    n_beam: int = Field(3, ge=0, le=16, description="Captions per image by beam search (safer).")
    n_sample: int = Field(2, ge=0, le=16, description="Captions per image by nucleus sampling (more varied).")
    vocabulary: str = Field("sample", description="Prompt vocabulary of the label phrase (as sd_lora's prompts).")
    label_weight: int = Field(2, ge=1, le=8, description="Times the label phrase is repeated in the prompt.")
    guidance: Literal["clip", "fixed"] = Field("clip", description=(
        "clip: guidance from each source's CLIP similarity to its label phrase; fixed: sampling.guidance "
        "(sd.inference.guidance with refiner: sd_lora)."))
    w_min: float | None = Field(None, ge=0, le=20, description=(
        "Guidance of the most typical sources (default per refiner: 0.25 closed_set, 4 sd_lora)."))
    w_max: float | None = Field(None, ge=0, le=20, description=(
        "Guidance of the least typical sources (default per refiner: 1.5 closed_set, 10 sd_lora)."))
    sim_lo: float | None = Field(None, description="Similarity at or below which guidance is w_max "
                                 "(default: the 10th percentile of the train images' similarities).")
    sim_hi: float | None = Field(None, description="Similarity at or above which guidance is w_min "
                                 "(default: the 90th percentile).")
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig, description="The closed-set model edited with.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)

    @property
    def guidance_range(self) -> tuple[float, float]:
        """(w_min, w_max): as set, else :data:`GUIDANCE_RANGE` of the refiner."""
        lo, hi = GUIDANCE_RANGE[self.refiner]
        return (lo if self.w_min is None else self.w_min), (hi if self.w_max is None else self.w_max)

    @property
    def fixed_guidance(self) -> float:
        """The guidance of ``guidance: fixed`` (and of sources without a similarity)."""
        return self.sd.inference.guidance if self.refiner == "sd_lora" else self.sampling.guidance  # type: ignore[union-attr]

    @model_validator(mode="after")
    def _range(self) -> "SipConfig":
        lo, hi = self.guidance_range
        if lo > hi:
            raise ValueError(f"w_min ({lo}) must not exceed w_max ({hi})")
        return self

    def prepare_identity(self) -> dict[str, Any]:
        from porcelain.diffusion.prompts import load_vocabulary, vocabulary_hash

        auto = {"auto_strength": True} if self.strength == "auto" else {}  # (its prepared model holds the reference)
        return {"kind": self.kind, "refiner": self.refiner_config().prepare_identity(),
                "clip": weights_folder_identity(self.clip), "captioner": weights_folder_identity(self.captioner), "n_beam": self.n_beam,
                "n_sample": self.n_sample, "vocabulary": vocabulary_hash(load_vocabulary(self.vocabulary)),
                "label_weight": self.label_weight, **auto}

    def identity(self) -> dict[str, Any]:
        w_min, w_max = self.guidance_range
        return {**self.prepare_identity(), **self.model_dump(mode="json", include={
            "strength", "guidance", "sim_lo", "sim_hi"}), "w_min": w_min, "w_max": w_max, **self.sampling_identity(),
            **self.auto_identity()}

    def image_sizes(self) -> list[int]:
        return [self.resolution]


def describe_train_images(store: Store, data: dict[str, Any], cfg: SipConfig, runtime: RuntimeConfig) -> FileRef:
    """Per train image: captions, the CLIP-chosen caption, the prompt and the CLIP similarity to the
    label phrase; stored once per (data, CLIP, captioner, settings)."""
    from porcelain.data.ingest import split_ids
    from porcelain.diffusion.prompts import load_vocabulary, prompt_for

    key = f"captions/{stable_hash({'data': data['data_hash'], **cfg.prepare_identity()}, 24)}.json"
    with store.lock(key):
        if not store.exists(key):
            images, labels = load_split(store, data["data_hash"], cfg.resolution, data["n_shards"], "train")
            ids = split_ids(store, data["data_hash"], "train")
            vocab = load_vocabulary(cfg.vocabulary)
            phrases = [prompt_for({t: data["classes"][t][v] for t, v in zip(data["tasks"], row)}, vocab)
                       for row in labels.tolist()]
            captions: list[list[str]] = [[] for _ in ids]
            if cfg.captioner and cfg.n_beam + cfg.n_sample:
                from porcelain.augment.captions import caption_images, load_captioner

                captioner = load_captioner(cfg.captioner, device=runtime.device)
                captions = caption_images(captioner, images, n_beam=cfg.n_beam, n_sample=cfg.n_sample)
            chosen, sims = ["" for _ in ids], [float("nan") for _ in ids]
            if cfg.clip:
                from porcelain.augment.captions import choose_caption
                from porcelain.evaluate.clip import clip_scores, image_text_similarity_matrix, load_clip

                model, pre, tok = load_clip(cfg.clip)
                sims = [float(s) for s in clip_scores(model, pre, tok, images, phrases)]
                for i, caps in enumerate(captions):
                    if caps:
                        chosen[i], _ = choose_caption(images[i], caps, lambda im, cs: image_text_similarity_matrix(
                            model, pre, tok, im[None], list(cs))[0])
            elif captions:
                chosen = [c[0] if c else "" for c in captions]
            from porcelain.augment.captions import sip_prompt

            rows = {sid: {"phrase": ph, "captions": caps, "caption": ch, "similarity": sim,
                          "prompt": sip_prompt(ph, ch, label_weight=cfg.label_weight) if ch else ph}
                    for sid, ph, caps, ch, sim in zip(ids, phrases, captions, chosen, sims)}
            store.write_json(key, rows)
    blob = store.read_bytes(key)
    return FileRef(key=key, sha256=hashlib.sha256(blob).hexdigest())


@register
class Sip(ImageConditioned):
    kind: ClassVar[str] = "sip"
    config: ClassVar[type[SynthesizerConfig]] = SipConfig
    version: ClassVar[str] = "2"  # 2: closed-set edits batched with a guidance per image (were one call per image)
    libs: ClassVar[tuple[str, ...]] = ("torch", "diffusers", "transformers", "open_clip_torch", "numpy")

    def needs_for(self, cfg: SipConfig) -> frozenset[str]:
        """The reference classifier only for ``strength: auto`` (it judges each image's strength)."""
        return frozenset({"reference"}) if cfg.strength == "auto" else frozenset()

    def prepare(self, store: Store, data: dict[str, Any], cfg: SipConfig, runtime: RuntimeConfig,
                context: dict[str, Any] | None = None) -> ModelRef:
        apply_runtime(runtime)
        refiner = self.prepare_refiner(store, data, cfg, runtime)
        described = describe_train_images(store, data, cfg, runtime)
        sims = np.array([r["similarity"] for r in store.read_json(described.key).values()], dtype=float)
        finite = sims[np.isfinite(sims)]
        lo = cfg.sim_lo if cfg.sim_lo is not None else (float(np.percentile(finite, 10)) if finite.size else None)
        hi = cfg.sim_hi if cfg.sim_hi is not None else (float(np.percentile(finite, 90)) if finite.size else None)
        if lo is not None and hi is not None and hi <= lo:
            hi = lo + 1e-6
        extra = {"resolution": cfg.resolution} if cfg.refiner == "sd_lora" else {}
        if cfg.strength == "auto":
            reference = (context or {}).get("reference")
            if reference is None:
                raise ValueError("sip strength auto needs the reference classifier")
            extra["reference"] = reference
        return self.model_ref(refiner, data, "captions", described, sim_lo=lo, sim_hi=hi, **extra)

    def augment(self, store: Store, ref: ModelRef, cfg: SipConfig, src: np.ndarray, *, seed: int, first_index: int,
                strength: float, runtime: RuntimeConfig) -> tuple[np.ndarray, list[dict[str, Any]], dict[str, np.ndarray]]:
        """Edit the train images at rows ``src``: (images, provenance, intermediates for the audit grid)."""
        from porcelain.data.ingest import split_ids
        from porcelain.generate.img2img import guidance_from_similarity, img2img

        h = ref.meta["data_hash"]
        images, labels = load_split(store, h, cfg.resolution, ref.meta["n_shards"], "train")
        ids = split_ids(store, h, "train")
        f = ref.files["captions"]
        rows = json.loads(store.read_verified(f.key, f.sha256))
        w_min, w_max = cfg.guidance_range

        def scale(r: dict[str, Any]) -> float:
            if cfg.guidance == "clip" and ref.meta["sim_lo"] is not None and np.isfinite(r["similarity"]):
                return float(guidance_from_similarity(r["similarity"], lo=ref.meta["sim_lo"], hi=ref.meta["sim_hi"],
                                                      w_min=w_min, w_max=w_max))
            return cfg.fixed_guidance

        if cfg.refiner == "sd_lora":
            chosen = [rows[ids[i]] for i in src]
            seeds = [image_seed(seed, first_index + j) for j in range(len(src))]
            out_a, refined = self.refine_sd(store, ref, cfg, images[src], labels[src], seeds, strength=strength,
                                            guidance=[scale(r) for r in chosen],
                                            captions=[r["caption"] for r in chosen], label_weight=cfg.label_weight,
                                            runtime=runtime)
            prov = [{"source": ids[i], **p, "caption": r["caption"], "similarity": r["similarity"],
                     "index": first_index + j}
                    for j, (i, r, p) in enumerate(zip(src, chosen, refined))]
            return out_a, prov, {"source": images[src], "refined": out_a}
        model = get("closed_set")._load(store, ModelRef.model_validate(ref.meta["refiner"]))
        s = cfg.sampling
        chosen = [rows[ids[i]] for i in src]
        w = np.array([scale(r) for r in chosen], np.float64)  # one guidance per image, in one batched call
        out = img2img(model, images[src], labels[src], strength=strength, steps=s.steps, guidance=w, seed=seed,
                      first_index=first_index, batch_size=s.batch_size, device=runtime.device, dtype=runtime.dtype)
        prov = [{"source": ids[i], "prompt": r["prompt"], "caption": r["caption"], "similarity": r["similarity"],
                 "guidance": round(float(g), 4), "strength": strength, "index": first_index + j}
                for j, (i, r, g) in enumerate(zip(src, chosen, w))]
        return out, prov, {"source": images[src], "refined": out}

    def generate(self, store: Store, ref: ModelRef, spec: ShardSpec, cfg: SipConfig, runtime: RuntimeConfig) -> Generated:
        src = source_rows(store, ref.meta["data_hash"], spec)
        out, prov, _ = self.augment_any(store, ref, cfg, src, seed=spec.seed, first_index=spec.start,
                                        strength=cfg.strength, runtime=runtime)
        steps = cfg.sd.inference.steps if cfg.refiner == "sd_lora" else cfg.sampling.steps
        return Generated(images=list(out), provenance=prov, shard={**self.refiner_shard(ref, cfg),
                                                                   "strength": cfg.strength, "steps": steps,
                                                                   "guidance_rule": cfg.guidance})

    def describe(self, ref: ModelRef, cfg: SipConfig) -> list[str]:
        w_min, w_max = cfg.guidance_range
        rule = (f"from each source's CLIP similarity to its label phrase, linear from w={w_max} at "
                f"{ref.meta['sim_lo']} down to w={w_min} at {ref.meta['sim_hi']}"
                if cfg.guidance == "clip" and ref.meta.get("sim_lo") is not None else f"fixed at {cfg.fixed_guidance}")
        if cfg.refiner == "sd_lora":
            sd = cfg.sd
            return [f"- img2img of real train images of each targeted combination at {cfg.strength_text()} with "
                    f"Stable Diffusion `{sd.base_id}` + LoRA ({sd.resolution} px, DDIM {sd.inference.steps} steps, "
                    f"LoRA scale {sd.inference.lora_scale}); guidance {rule}",
                    f"- prompt: the source's label phrase (the sd_lora prompt, class tokens: {sd.class_tokens}) "
                    f"{cfg.label_weight}× (fewer where the caption would not fit CLIP's 77 tokens), then the caption "
                    "CLIP chose "
                    f"({'BLIP ' + cfg.captioner if cfg.captioner else 'no captioner: the phrase alone'}); every "
                    "image's prompt, guidance and seed are in its shard's provenance"]
        return [f"- img2img of real train images of each targeted combination at {cfg.strength_text()} with the "
                f"closed-set generator ({cfg.generator.resolution} px); guidance {rule}",
                "- on the closed-set generator (no text encoder) SIP is label-conditioned SDEdit: captions "
                f"({'BLIP ' + cfg.captioner if cfg.captioner else 'none'}) and prompts are chosen by CLIP and recorded "
                "in provenance but do not steer the image"]
