"""Source images for image-conditioned kinds: which real train image each synthetic image starts from,
and the refiner that edits them (:class:`RefinerSettings`: the closed-set generator, or Stable
Diffusion + LoRA)."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

from porcelain.data.ingest import load_split, split_ids
from porcelain.diffusion.settings import SdLoraSettings
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


Refiner = Literal["closed_set", "sd_lora"]


class RefinerSettings(BaseModel):
    """Mixed into the configs of image-conditioned kinds (which also have ``generator:`` and ``sampling:``,
    the closed-set refiner's): which diffusion model edits the real images.

    ``refiner: closed_set`` (default): the closed-set generator of ``generator:``, trained once and
    shared with a ``closed_set`` entry of equal ``generator:``; label-conditioned, no text encoder.
    ``refiner: sd_lora``: Stable Diffusion + LoRA of ``sd:`` (the keys of an ``sd_lora`` entry: base,
    resolution, prompts, lora, adapters, class_tokens, inference), trained once and shared with an
    ``sd_lora`` entry of equal settings; its prompts (with class tokens) steer the edit.
    """

    refiner: Refiner = Field("closed_set", description=(
        "The diffusion model that edits the real images: closed_set (the generator of `generator:`) or "
        "sd_lora (Stable Diffusion + LoRA of `sd:`, which must name its `base`)."))
    sd: SdLoraSettings | None = Field(None, validate_default=True, description=(
        "With refiner: sd_lora, the Stable Diffusion + LoRA settings (those of an sd_lora entry; `base` "
        "required); img2img uses sd.inference (steps, guidance, batch_size, lora_scale)."))

    @field_validator("sd")
    @classmethod
    def _sd_with_its_refiner(cls, v: SdLoraSettings | None, info: ValidationInfo) -> SdLoraSettings | None:
        refiner = info.data.get("refiner", "closed_set")
        if refiner == "sd_lora" and (v is None or "base" not in v.model_fields_set):
            raise ValueError("refiner: sd_lora needs `sd.base`: the Stable Diffusion model to refine with (a "
                             "diffusers folder, a hub id in the local Hugging Face cache, sd21 or sd15), e.g. "
                             "`sd: {base: /models/sd21-base}` (docs/SD_LORA.md)")
        if refiner == "closed_set" and v is not None:
            raise ValueError("`sd:` is read only with `refiner: sd_lora` (the default refiner, closed_set, is "
                             "configured by `generator:` and `sampling:`)")
        return v

    @model_validator(mode="after")
    def _closed_set_keys_with_closed_set(self) -> Any:
        # Set to other than their defaults, they would be ignored: an error. (Defaults pass, so that a
        # dumped config, which holds every field, validates again.)
        if self.refiner == "sd_lora":
            for key in ("generator", "sampling"):
                if getattr(self, key) != type(self).model_fields[key].get_default(call_default_factory=True):
                    raise ValueError(f"`{key}:` configures the closed-set refiner; with `refiner: sd_lora` the "
                                     "model is `sd:` and its sampling `sd.inference` (steps, guidance, batch_size)")
        return self

    @property
    def resolution(self) -> int:
        """Side (px) of the real images the refiner edits."""
        return self.sd.resolution if self.sd is not None and self.refiner == "sd_lora" \
            else self.generator.resolution  # type: ignore[attr-defined]

    def refiner_config(self) -> Any:
        """The refiner as a synthesizer config of its own kind: its prepare trains or finds it."""
        if self.refiner == "sd_lora":
            from porcelain.synthesizers.sd_lora import SdLoraConfig

            return SdLoraConfig.model_validate(self.sd.model_dump(mode="json", exclude_unset=True))  # type: ignore[union-attr]
        from porcelain.synthesizers.closed_set import ClosedSetConfig

        return ClosedSetConfig(generator=self.generator, sampling=self.sampling)  # type: ignore[attr-defined]

    def sampling_identity(self) -> dict[str, Any]:
        """How the refiner samples (what the images depend on beyond the trained model)."""
        if self.refiner == "sd_lora":
            ident = self.refiner_config().identity()
            return {"sd_sampling": {k: ident[k] for k in ("inference", "adapter_weights", "negative_prompt",
                                                          "template")}}
        return {"sampling": self.sampling.model_dump(mode="json", exclude={"batch_size"})}  # type: ignore[attr-defined]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


class AutoStrengthSettings(BaseModel):
    """``strength: auto``: each image's strength chosen from ``auto_strengths`` (beyond SGD-Mix)."""

    auto_strengths: list[float] = Field([0.3, 0.5, 0.7, 0.9], min_length=1, description=(
        "strength: auto: the candidates; each image gets the largest at which the reference classifier still "
        "gives every task's source label at least auto_confidence (else the smallest): as much change as the "
        "label survives, per image, instead of one S for all."))
    auto_confidence: float = Field(0.5, gt=0, lt=1, description="strength: auto: the reference's required probability.")

    @field_validator("auto_strengths")
    @classmethod
    def _auto_sorted(cls, v: list[float]) -> list[float]:
        if any(not 0 < s <= 1 for s in v) or len(set(v)) != len(v):
            raise ValueError("auto_strengths must be distinct values in (0, 1]")
        return sorted(v)

    def strength_text(self) -> str:
        """How the report names the strength: ``strength 0.5``, or the auto rule."""
        if getattr(self, "strength", None) != "auto":
            return f"strength {getattr(self, 'strength')}"
        return (f"a strength per image (auto: the largest of {self.auto_strengths} whose result the reference "
                f"classifier still gives the source's labels at p ≥ {self.auto_confidence}, else the smallest)")

    def auto_identity(self) -> dict[str, Any]:
        if getattr(self, "strength", None) != "auto":
            return {}
        return {"auto_strengths": self.auto_strengths, "auto_confidence": self.auto_confidence}


class ImageConditioned(Synthesizer):
    """Shared by kinds that edit real train images with a refiner (:class:`RefinerSettings`)."""

    image_conditioned = True

    def augment_any(self, store: Store, ref: ModelRef, cfg: Any, src: np.ndarray, *, seed: int, first_index: int,
                    strength: float | str, runtime: Any) -> tuple[np.ndarray, list[dict[str, Any]], dict[str, np.ndarray]]:
        """:meth:`augment` at a fixed strength, or with ``"auto"`` each image at the largest candidate
        strength whose refined image the reference classifier still gives its source's labels (every
        task's probability ≥ ``cfg.auto_confidence``); the smallest candidate when none does. Each
        image's seed is the same at every candidate, so the choice is the only difference."""
        if strength != "auto":
            return self.augment(store, ref, cfg, src, seed=seed, first_index=first_index, strength=float(strength),
                                runtime=runtime)
        from porcelain.evaluate.reference import load_reference
        from porcelain.synthesizers.drift import _resize
        from porcelain.train.classifier import predict_logits

        reference = ref.meta.get("reference")
        if reference is None:
            raise ValueError(f"{self.kind}: strength auto needs the reference classifier in the prepared model")
        model = load_reference(store, reference)
        tasks = list(model.task_names)
        _, labels = load_split(store, ref.meta["data_hash"], cfg.resolution, ref.meta["n_shards"], "train")
        data_tasks = reference.get("tasks") or tasks
        want = labels[src][:, [data_tasks.index(t) for t in tasks]]
        tries = []
        for s in cfg.auto_strengths:
            out, prov, steps = self.augment(store, ref, cfg, src, seed=seed, first_index=first_index, strength=s,
                                            runtime=runtime)
            logits = predict_logits(model, _resize(out, reference["image_size"]), device=runtime.device,
                                    dtype=runtime.dtype)
            p = np.stack([_softmax(logits[t])[np.arange(len(src)), want[:, k]] for k, t in enumerate(tasks)], 1)
            tries.append((s, out, prov, steps, p.min(1)))
        ok = np.stack([t[4] >= cfg.auto_confidence for t in tries], 1)  # images × candidates
        pick = np.where(ok.any(1), ok.shape[1] - 1 - np.argmax(ok[:, ::-1], 1), 0)
        out = np.stack([tries[c][1][i] for i, c in enumerate(pick)])
        prov = [{**tries[c][2][i], "strength": tries[c][0], "auto_strength_kept_label": bool(ok[i, c]),
                 "auto_strength_confidence": {f"{t[0]:g}": round(float(t[4][i]), 4) for t in tries}}
                for i, c in enumerate(pick)]
        steps = {k: (np.stack([tries[c][3][k][i] for i, c in enumerate(pick)]) if k == "refined" else v)
                 for k, v in tries[0][3].items()}
        steps["refined"] = out
        return out, prov, steps

    def plan(self, store: Store, data: dict[str, Any], cfg: Any, need: dict[Combo, int], shard_size: int,
             seed: int) -> list[ShardSpec]:
        return plan_with_sources(store, data, need, shard_size, seed, cfg.resolution)

    def prepare_refiner(self, store: Store, data: dict[str, Any], cfg: Any, runtime: Any) -> ModelRef:
        """The refiner's model, prepared by its own kind (so equal settings share the training)."""
        from porcelain.synthesizers import get

        return get(cfg.refiner).prepare(store, data, cfg.refiner_config(), runtime)

    def refine_sd(self, store: Store, ref: ModelRef, cfg: Any, images: np.ndarray, labels: np.ndarray,
                  seeds: list[int], *, strength: float, guidance: Any = None, captions: list[str] | None = None,
                  label_weight: int = 1, runtime: Any) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """img2img of ``images`` (rows of ``labels``, int) with the SD refiner of ``ref``, taking turns with
        the ``sd_lora`` kind's shards on the one loaded pipeline. Provenance also names the labels."""
        from porcelain.diffusion.img2img import refine_sd_images
        from porcelain.synthesizers.sd_lora import _PIPELINE_LOCK

        tasks, classes = ref.meta["tasks"], ref.meta["classes"]
        named = [{t: classes[t][int(v)] for t, v in zip(tasks, row)} for row in np.asarray(labels).tolist()]
        with _PIPELINE_LOCK:
            out, prov = refine_sd_images(store, ref.meta["ref"], cfg.sd, images, named, seeds, strength=strength,
                                         guidance=guidance, captions=captions, label_weight=label_weight,
                                         device=runtime.device, dtype=runtime.dtype)
        return out, [{**p, "labels": lab} for p, lab in zip(prov, named)]

    def refiner_shard(self, ref: ModelRef, cfg: Any) -> dict[str, Any]:
        """Shard provenance naming the refiner's weights."""
        if cfg.refiner == "sd_lora":
            r = ref.meta["ref"]
            return {"refiner": "sd_lora", "base_hash": r["base_hash"],
                    "weights_sha256": {n: w["sha256"] for n, w in r["weights"].items()}}
        return {"refiner_sha256": ref.files["weights"].sha256}

    def model_ref(self, refiner: ModelRef, data: dict[str, Any], name: str, file: FileRef, **meta: Any) -> ModelRef:
        """The kind's reference: the refiner's files plus its own stored ``file`` (saliency maps, captions)."""
        identity = {"refiner": refiner.identity, name: file.sha256}
        return ModelRef(kind=self.kind, key=stable_hash(identity, 24), identity=identity,
                        files={**refiner.files, name: file},
                        meta={**refiner.meta, "refiner": refiner.model_dump(mode="json"), "data_hash": data["data_hash"],
                              "n_shards": data["n_shards"], **meta})
