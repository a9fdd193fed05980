"""Kind ``sd_lora``: Stable Diffusion fine-tuned with LoRA on the train split, prompted with structured
attribute prompts, aimed at the rare combinations (the porcelain paper, arXiv 2601.14791).

The work is in :mod:`porcelain.diffusion` (loading, prompts, LoRA / per-task adapters / class tokens,
batched txt2img); this module only puts it behind the synthesizer seam.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any, ClassVar, Literal

from porcelain.config import RuntimeConfig
from porcelain.data.ingest import load_split
from porcelain.diffusion.settings import SdLoraSettings, training_identity
from porcelain.generate.plan import ShardSpec
from porcelain.hashing import stable_hash
from porcelain.progress import LogProgress
from porcelain.results import FileRef, ModelRef
from porcelain.runtime import apply_runtime, runtime_identity
from porcelain.storage import Store
from porcelain.synthesizers import register
from porcelain.synthesizers.base import Generated, Synthesizer, SynthesizerConfig
from porcelain.versions import stage_identity


class SdLoraConfig(SynthesizerConfig, SdLoraSettings):
    """``{kind: sd_lora, base: …, prompts: {vocabulary: sample}, lora: {…}, inference: {…}}``: the keys
    of :class:`porcelain.diffusion.settings.SdLoraSettings` (docs/SD_LORA.md)."""

    kind: Literal["sd_lora"] = "sd_lora"

    def _content(self) -> dict[str, Any]:
        """Paths replaced by content: the base model by its weights' hash, a vocabulary file by its text's."""
        from porcelain.diffusion.loading import base_model_hash, resolve_base
        from porcelain.diffusion.prompts import load_vocabulary, vocabulary_hash

        ident = training_identity(self)
        ident["base"] = base_model_hash(resolve_base(self.base_id))
        ident["prompts"] = {**ident["prompts"], "vocabulary": vocabulary_hash(load_vocabulary(self.prompts.vocabulary))}
        return ident

    def prepare_identity(self) -> dict[str, Any]:
        return {"kind": self.kind, **self._content()}

    def identity(self) -> dict[str, Any]:
        inf = self.inference.model_dump(mode="json", exclude={"batch_size", "compile"})
        return {**self.prepare_identity(), "inference": inf,
                "adapter_weights": {a.name: a.weight for a in self.adapter_specs()},
                "negative_prompt": self.prompts.negative_prompt, "template": self.prompts.template}

    def image_sizes(self) -> list[int]:
        return [self.resolution]


# One loaded pipeline serves the shards of a run, and a diffusers pipeline is not thread-safe (its
# scheduler holds the timesteps of the call in progress): shards of this kind that run side by side
# (runtime.workers > 1) take turns on it. With runtime.workers 2 on the tiny pipeline, 51 of its
# shards failed before this lock.
_PIPELINE_LOCK = threading.Lock()


def image_seed(combination_seed: int, index: int) -> int:
    """The seed of image ``index`` of a combination: independent of batch size and of shard spread."""
    h = hashlib.sha256(f"{combination_seed}|{index}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def _named(data_or_meta: dict[str, Any], combo: Any) -> dict[str, str]:
    tasks, classes = data_or_meta["tasks"], data_or_meta["classes"]
    return {t: classes[t][int(v)] for t, v in zip(tasks, combo)}


@register
class SdLora(Synthesizer):
    kind: ClassVar[str] = "sd_lora"
    config: ClassVar[type[SynthesizerConfig]] = SdLoraConfig
    version: ClassVar[str] = "2"  # 2: image i of a combination from (its seed, i)
    libs: ClassVar[tuple[str, ...]] = ("torch", "diffusers", "peft", "transformers", "numpy")

    def prepare(self, store: Store, data: dict[str, Any], cfg: SdLoraConfig, runtime: RuntimeConfig,
                context: dict[str, Any] | None = None) -> ModelRef:
        """LoRA (and class tokens) trained on the real train split; resumed from its last checkpoint."""
        from porcelain.diffusion.api import train_sd_lora

        apply_runtime(runtime)
        identity = {"data": data["data_hash"], **cfg.prepare_identity(),
                    "code": stage_identity(f"synthesizer:{self.kind}"), "runtime": runtime_identity(runtime)}
        key = f"sd_lora/{stable_hash(identity, 24)}"
        if f"synthesizer:{self.kind}" in runtime.refresh and store.exists(f"{key}/result.json"):
            store.delete(f"{key}/result.json")
        images, labels = load_split(store, data["data_hash"], cfg.resolution, data["n_shards"], "train")
        named = [_named(data, row) for row in labels.tolist()]
        ref = train_sd_lora(store, images, named, cfg, key=key, device=runtime.device, dtype=runtime.dtype,
                            progress=LogProgress("SD LoRA training"))
        return ModelRef(
            kind=self.kind, key=key, identity=identity,
            files={name: FileRef(key=w["key"], sha256=w["sha256"]) for name, w in ref["weights"].items()},
            meta={"ref": ref, "tasks": data["tasks"], "classes": data["classes"], "train_images": int(len(images)),
                  "steps": ref["steps"], "seconds": ref["seconds"], "final_loss": ref.get("final_loss")})

    def generate(self, store: Store, ref: ModelRef, spec: ShardSpec, cfg: SdLoraConfig,
                 runtime: RuntimeConfig) -> Generated:
        from porcelain.diffusion.api import generate_sd_images

        labels = [_named(ref.meta, spec.combo)] * spec.count
        seeds = [image_seed(spec.seed, spec.start + i) for i in range(spec.count)]
        with _PIPELINE_LOCK:
            images, provenance = generate_sd_images(store, ref.meta["ref"], labels, seeds, cfg,
                                                    device=runtime.device, dtype=runtime.dtype)
        return Generated(images=images, provenance=provenance, shard={
            "base_hash": ref.meta["ref"]["base_hash"], "lora_scale": cfg.inference.lora_scale,
            "steps": cfg.inference.steps, "guidance": cfg.inference.guidance})

    def describe(self, ref: ModelRef, cfg: SdLoraConfig) -> list[str]:
        m, r = ref.meta, ref.meta["ref"]
        loss = "n/a" if m.get("final_loss") is None else f"{m['final_loss']:.4f}"
        adapters = ", ".join(f"`{a.name}` ({'/'.join(a.tasks)}, weight {a.weight})" for a in cfg.adapter_specs())
        return [f"- base `{cfg.base_id}` (weights hash `{r['base_hash'][:12]}`, {r.get('prediction_type')}), LoRA "
                f"rank {cfg.lora.rank} on {', '.join(cfg.lora.target_modules)}, {m['steps']} steps on the "
                f"{m['train_images']} real train images at {cfg.resolution} px, {m['seconds']} s, final loss {loss}",
                f"- adapters: {adapters}; class tokens: {cfg.class_tokens}; prompts from vocabulary "
                f"`{cfg.prompts.vocabulary}`",
                f"- txt2img: DDIM {cfg.inference.steps} steps, guidance {cfg.inference.guidance}, LoRA scale "
                f"{cfg.inference.lora_scale}; every image's prompt is in its shard's provenance"]
