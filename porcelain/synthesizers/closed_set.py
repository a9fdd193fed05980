"""Kind ``closed_set``: an attribute-conditional diffusion model trained from scratch on the train
split only (closed-set augmentation, arXiv 2508.09550), sampled with classifier-free guidance.

The model is :mod:`porcelain.models.generator` (a diffusers ``UNet2DModel`` with one label embedding
per task), trained by :mod:`porcelain.train.generator` and sampled by :mod:`porcelain.generate.sampling`.
"""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from porcelain.config import GeneratorConfig, RuntimeConfig, SamplingConfig
from porcelain.data.ingest import load_split
from porcelain.generate.plan import ShardSpec
from porcelain.hashing import stable_hash
from porcelain.models.weights import load_weights, weights_bytes
from porcelain.progress import LogProgress
from porcelain.results import FileRef, ModelRef, key_of
from porcelain.runtime import apply_runtime, runtime_identity
from porcelain.storage import Store
from porcelain.synthesizers import register
from porcelain.synthesizers.base import Generated, Synthesizer, SynthesizerConfig
from porcelain.versions import stage_identity

if TYPE_CHECKING:
    from porcelain.models.generator import ConditionalUNet
# diffusers (behind the generator, its training and sampling) is imported where it is used, so that
# reading a config, or a rerun whose every task is cached, does not load it


class ClosedSetConfig(SynthesizerConfig):
    """``{kind: closed_set, generator: {...}, sampling: {steps, guidance, batch_size}}``."""

    kind: Literal["closed_set"] = "closed_set"
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)

    def prepare_identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "generator": self.generator.model_dump(mode="json")}

    def identity(self) -> dict[str, Any]:
        # batch size changes how many images are sampled at once, never which ones
        return {**self.prepare_identity(), "sampling": self.sampling.model_dump(mode="json", exclude={"batch_size"})}

    def image_sizes(self) -> list[int]:
        return [self.generator.resolution]


_MODELS: dict[str, "ConditionalUNet"] = {}  # by weights sha256: the shards of one run reuse the loaded model


@register
class ClosedSet(Synthesizer):
    kind: ClassVar[str] = "closed_set"
    config: ClassVar[type[SynthesizerConfig]] = ClosedSetConfig
    version: ClassVar[str] = "2"  # 2: image i of a combination from (its seed, i)
    libs: ClassVar[tuple[str, ...]] = ("torch", "diffusers", "numpy")

    def prepare(self, store: Store, data: dict[str, Any], cfg: ClosedSetConfig, runtime: RuntimeConfig,
                context: dict[str, Any] | None = None) -> ModelRef:
        """Train on the real train split (or reuse the stored model of the same identity)."""
        apply_runtime(runtime)
        identity = {"data": data["data_hash"], **cfg.prepare_identity(), "code": stage_identity(f"synthesizer:{self.kind}"),
                    "runtime": runtime_identity(runtime)}
        key = stable_hash(identity, 24)
        base = f"generators/{key}"
        with store.lock(base):  # a second run of the same config waits here, then reuses the result
            if store.exists(f"{base}/ref.json") \
                    and f"synthesizer:{self.kind}" not in runtime.refresh:
                return ModelRef.model_validate(store.read_json(f"{base}/ref.json"))
            return self._train(store, data, cfg.generator, runtime, key, base, identity)

    def _train(self, store: Store, data: dict[str, Any], cfg: GeneratorConfig, runtime: RuntimeConfig, key: str,
               base: str, identity: dict[str, Any]) -> ModelRef:
        from porcelain.models.generator import create_generator
        from porcelain.train.generator import train_generator

        images, labels = load_split(store, data["data_hash"], cfg.resolution, data["n_shards"], "train")
        num_classes = [len(data["classes"][t]) for t in data["tasks"]]
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
        blob = weights_bytes(model.state_dict(), {"data_hash": data["data_hash"], "preset": cfg.preset})
        # Weights live under their own content hash; the reference, written last, names them. Two
        # trainings that differ in the last bit (any GPU) leave two weight files and one consistent ref.
        weights = store.put_object(blob, "safetensors", prefix="weights")
        losses = history.get("loss", [])
        store.write_json(f"{base}/history.json", history)
        ref = ModelRef(
            kind=self.kind, key=key, identity=identity,
            files={"weights": FileRef(key=weights, sha256=hashlib.sha256(blob).hexdigest())},
            meta={"spec": model.spec.to_dict(), "tasks": data["tasks"], "classes": data["classes"],
                  "train_images": int(len(images)), "steps": cfg.train_steps, "seconds": round(seconds, 1),
                  "resolution": cfg.resolution, "preset": cfg.preset,
                  "final_loss": float(sum(losses[-50:]) / max(1, len(losses[-50:]))) if losses else None})
        store.write_json(f"{base}/ref.json", ref.model_dump(mode="json"))  # last: the generator exists once this does
        return ref

    def _load(self, store: Store, ref: ModelRef) -> "ConditionalUNet":
        from porcelain.models.generator import create_generator

        f = ref.files["weights"]
        if f.sha256 not in _MODELS:
            state, _ = load_weights(store.read_verified(f.key, f.sha256))
            model = create_generator(ref.meta["spec"])
            model.load_state_dict(state)
            _MODELS.clear()
            _MODELS[f.sha256] = model.eval()
        return _MODELS[f.sha256]

    def generate(self, store: Store, ref: ModelRef, spec: ShardSpec, cfg: ClosedSetConfig,
                 runtime: RuntimeConfig) -> Generated:
        from porcelain.generate.sampling import sample_images

        model = self._load(store, ref)
        labels = np.tile(np.asarray(spec.combo, dtype=np.int64), (spec.count, 1))
        s = cfg.sampling
        images = sample_images(model, labels, steps=s.steps, guidance=s.guidance, seed=spec.seed,
                               first_index=spec.start, batch_size=s.batch_size, device=runtime.device,
                               dtype=runtime.dtype)
        return Generated(images=list(images), shard={
            "model_sha256": ref.files["weights"].sha256, "generator": key_of(ref),
            "steps": s.steps, "guidance": s.guidance})

    def describe(self, ref: ModelRef, cfg: ClosedSetConfig) -> list[str]:
        m, g = ref.meta, cfg.generator
        loss = "n/a" if m.get("final_loss") is None else f"{m['final_loss']:.4f}"
        return [f"- trained from scratch on the {m['train_images']} real train images only: preset `{g.preset}`, "
                f"{m['steps']} steps at {g.resolution} px, {m['seconds']} s, final loss {loss}",
                f"- sampling: DDIM {cfg.sampling.steps} steps, guidance w={cfg.sampling.guidance}; weights sha256 "
                f"`{ref.files['weights'].sha256[:16]}`"]
