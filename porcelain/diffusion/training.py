"""The training loop: textual inversion (optional), then one LoRA per adapter, resumable exactly.

Training runs in *phases* counted on one global step axis: ``textual_inversion`` (``ti.steps``
steps, when ``class_tokens`` is ``textual_inversion``), then one phase of ``lora.train_steps`` per
adapter. All adapters (and class tokens) are added to the pipeline before the first step, so a
checkpoint written at any step fits a freshly loaded pipeline.

Each step draws its batch indices, VAE latent sample, noise and timesteps from a CPU generator
seeded by ``(seed, step)``: the run is a pure function of the settings, data and base weights, and a
run resumed from a checkpoint at step ``c`` continues exactly as the uninterrupted run did (the
checkpoint holds all trainable tensors and the optimizer state; see
:mod:`porcelain.diffusion.checkpoint`).

Loss: MSE between the UNet output and the noise (``epsilon``) or the velocity (``v_prediction``),
as the base scheduler's ``prediction_type`` says. Only the tensors being trained have
``requires_grad``. On CUDA: autocast in the pipeline's half dtype, fp32 trainable tensors, a
gradient scaler for fp16 and gradient checkpointing of the UNet (``lora.gradient_checkpointing``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F

from porcelain.device import autocast, grad_scaler
from porcelain.errors import NonFiniteLossError
from porcelain.hashing import stable_hash
from porcelain.storage.store import Store

from . import lora as lora_ops
from . import textual_inversion as ti_ops
from .checkpoint import Checkpoint, read_checkpoint, write_checkpoint
from .prompts import Vocabulary, class_token, descriptor, prompt_for, template_fields
from .settings import AdapterSpec, SdLoraSettings

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

__all__ = ["Phase", "TrainResult", "encode_images", "inference_template", "plan_phases", "train_pipeline",
           "training_prompts", "ti_tokens"]

log = logging.getLogger("porcelain")

ProgressFn = Callable[[int, int, dict], None]


@dataclass(frozen=True)
class Phase:
    """One stretch of training on the global step axis: ``[start, start + steps)``."""

    name: str
    kind: Literal["textual_inversion", "lora"]
    start: int
    steps: int
    adapter: AdapterSpec | None = None

    @property
    def end(self) -> int:
        return self.start + self.steps


@dataclass
class TrainResult:
    """Trained tensors: ``lora[adapter] = state``, ``ti[token] = vector``, plus per-step losses."""

    lora: dict[str, dict[str, torch.Tensor]]
    ti: dict[str, torch.Tensor]
    steps: int
    resumed_from: int
    losses: list[float] = field(default_factory=list)


def plan_phases(cfg: SdLoraSettings) -> list[Phase]:
    """The phases of a run, in order."""
    phases: list[Phase] = []
    start = 0
    if cfg.class_tokens == "textual_inversion":
        phases.append(Phase("textual_inversion", "textual_inversion", 0, cfg.textual_inversion.steps))
        start = cfg.textual_inversion.steps
    for a in cfg.adapter_specs():
        phases.append(Phase(a.name, "lora", start, cfg.lora.train_steps, a))
        start += cfg.lora.train_steps
    return phases


def inference_template(cfg: SdLoraSettings, vocab: Vocabulary) -> str:
    """The prompt template used at inference (and by the default adapter): the override or the vocabulary's."""
    return cfg.prompts.template or vocab.template


def _adapter_template(cfg: SdLoraSettings, vocab: Vocabulary, adapter: AdapterSpec | None) -> str:
    if adapter is not None and adapter.name in vocab.templates:
        return vocab.templates[adapter.name]
    return inference_template(cfg, vocab)


def training_prompts(cfg: SdLoraSettings, vocab: Vocabulary, labels: Sequence[dict[str, str]],
                     phase: Phase) -> list[str]:
    """One prompt per training image for ``phase`` (the adapter's template; class tokens as configured)."""
    template = _adapter_template(cfg, vocab, phase.adapter)
    mode = cfg.class_tokens
    return [prompt_for(lab, vocab, template=template, class_tokens=mode) for lab in labels]


def ti_tokens(cfg: SdLoraSettings, vocab: Vocabulary, labels: Sequence[dict[str, str]]) -> dict[str, str]:
    """``{class token: descriptor}`` for every label value that a training prompt names."""
    tasks: list[str] = []
    for a in cfg.adapter_specs():
        for t in template_fields(_adapter_template(cfg, vocab, a)):
            if t not in tasks:
                tasks.append(t)
    out: dict[str, str] = {}
    for lab in labels:
        for t in tasks:
            if t in lab:
                out[class_token(t, lab[t])] = descriptor(vocab, t, lab[t])
    return out


def encode_images(pipe: "StableDiffusionPipeline", images: np.ndarray, resolution: int,
                  batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE posterior of each image (uint8 NHWC, resized to ``resolution``), fp32."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 N×H×W×3, got {images.dtype} {images.shape}")
    vae = pipe.vae
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).permute(0, 3, 1, 2).float() / 255
            if x.shape[-2:] != (resolution, resolution):
                x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", antialias=True,
                                  align_corners=False).clamp(0, 1)
            x = (x * 2 - 1).to(vae.device, vae.dtype)
            dist = vae.encode(x).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(int(stable_hash(["sd-lora-step", seed, step]), 16) % (2**63))


def _tokenize(pipe: "StableDiffusionPipeline", prompts: Sequence[str]) -> torch.Tensor:
    tok = pipe.tokenizer
    return tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


class _PhaseState:
    """What a phase trains: parameters, optimizer, prompt ids and (frozen text encoder) cached states."""

    def __init__(self, pipe: "StableDiffusionPipeline", cfg: SdLoraSettings, phase: Phase,
                 prompts: list[str], ti_ids: list[int]):
        self.phase = phase
        self.ti_ids = ti_ids
        dev = pipe.device
        for comp in (pipe.unet, pipe.text_encoder, pipe.vae):
            comp.requires_grad_(False)
        if phase.kind == "textual_inversion":
            self.rows: ti_ops.TrainableRows | None = ti_ops.TrainableRows(pipe, ti_ids)
            self.params = {"text_encoder.class_token_rows": self.rows.param}
            self.train_text = True
            lr, wd = cfg.textual_inversion.lr, 0.0
        else:
            name = phase.name
            pipe.unet.set_adapter(name)
            if cfg.lora.train_text_encoder:
                pipe.text_encoder.set_adapter(name)
            params = lora_ops.lora_parameters(pipe, name)
            for p in params.values():
                p.data = p.data.float()
                p.requires_grad_(True)
            self.params = dict(sorted(params.items()))
            self.rows = None
            self.train_text = cfg.lora.train_text_encoder
            lr, wd = cfg.lora.lr, 1e-2
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=lr, weight_decay=wd)
        # Unique prompts, encoded once when the text encoder is frozen in this phase.
        uniq = sorted(set(prompts))
        where = {p: i for i, p in enumerate(uniq)}
        self.prompt_index = torch.tensor([where[p] for p in prompts])
        self.ids = _tokenize(pipe, uniq).to(dev)
        self.cached: torch.Tensor | None = None
        if not self.train_text:
            with torch.no_grad():
                self.cached = torch.cat([pipe.text_encoder(self.ids[i : i + 64])[0]
                                         for i in range(0, len(uniq), 64)])

    def after_step(self) -> None:
        if self.rows is not None:
            self.rows.commit()

    def close(self) -> None:
        if self.rows is not None:
            self.rows.close()
            self.rows = None

    def text_states(self, pipe: "StableDiffusionPipeline", idx: torch.Tensor) -> torch.Tensor:
        rows = self.prompt_index[idx].to(self.ids.device)
        if self.cached is not None:
            return self.cached[rows]
        return pipe.text_encoder(self.ids[rows])[0]


def _gradient_checkpointing(cfg: SdLoraSettings, device: torch.device) -> bool:
    gc = cfg.lora.gradient_checkpointing
    return device.type == "cuda" if gc == "auto" else bool(gc)


def train_pipeline(
    pipe: "StableDiffusionPipeline",
    images: np.ndarray,
    labels: Sequence[dict[str, str]],
    cfg: SdLoraSettings,
    vocab: Vocabulary,
    *,
    store: Store | None = None,
    key: str | None = None,
    identity: str = "",
    progress: ProgressFn | None = None,
) -> TrainResult:
    """Add class tokens and adapters to ``pipe`` and train them (resuming from ``{key}/checkpoint``).

    ``pipe`` is modified in place: afterwards it carries the trained adapters (the last one active)
    and class tokens. With a ``store`` and ``key``, a checkpoint is written every
    ``lora.checkpoint_every`` steps and a checkpoint whose ``identity`` matches is resumed from;
    one with another identity (other settings, data or base) is ignored and overwritten.
    """
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need as many label dicts as images (>0), got {len(labels)} for {len(images)} images")
    device = pipe.device
    compute_dtype = pipe.unet.dtype
    phases = plan_phases(cfg)
    total = phases[-1].end
    labels = [dict(lab) for lab in labels]

    # Structure first (identical in a fresh and in a resumed run): class tokens, then adapters.
    tokens: list[str] = []
    ti_ids: list[int] = []
    if cfg.class_tokens == "textual_inversion":
        init = ti_tokens(cfg, vocab, labels)
        tokens = sorted(init)
        ti_ids = ti_ops.add_class_tokens(pipe, init)
    for a in cfg.adapter_specs():
        lora_ops.add_lora(pipe, a.name, cfg.lora, seed=cfg.seed)
    if _gradient_checkpointing(cfg, device):
        pipe.unet.enable_gradient_checkpointing()
        if cfg.lora.train_text_encoder or tokens:
            pipe.text_encoder.gradient_checkpointing_enable()

    mean, std = encode_images(pipe, images, cfg.resolution)
    scaling = float(pipe.vae.config.scaling_factor)
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction = noise_sched.config.prediction_type
    if prediction not in ("epsilon", "v_prediction"):
        raise ValueError(f"unsupported prediction_type {prediction!r} of the base scheduler")
    n_train_t = int(noise_sched.config.num_train_timesteps)

    # Resume.
    start, opt_state = 0, None
    ck = read_checkpoint(store, key) if store is not None and key else None
    if ck is not None and ck.identity == identity and 0 < ck.step < total:
        for name, state in ck.lora.items():
            lora_ops.set_lora_state(pipe, name, state)
        if ck.ti:
            weight = pipe.text_encoder.get_input_embeddings().weight
            with torch.no_grad():
                for t, i in zip(tokens, ti_ops.token_ids(pipe, tokens)):
                    weight[i] = ck.ti[t].to(weight.device, weight.dtype)
        if "torch" in ck.rng:
            torch.set_rng_state(ck.rng["torch"])
        if "cuda" in ck.rng and device.type == "cuda":
            torch.cuda.set_rng_state(ck.rng["cuda"], device)
        start = ck.step
        resume_phase = next(p for p in phases if p.start <= start < p.end)
        if ck.phase == resume_phase.name and start > resume_phase.start:
            opt_state = ck.optimizer
        log.info("SD LoRA: resuming %s from step %d/%d (phase %s)", key, start, total, resume_phase.name)
    elif ck is not None:
        log.warning("SD LoRA: ignoring the checkpoint under %s (step %d; %s)", key, ck.step,
                    "other settings/data/base" if ck.identity != identity else "nothing left to resume")

    pipe.unet.train()
    losses: list[float] = []
    state: _PhaseState | None = None
    scaler = grad_scaler(device, compute_dtype)
    try:
        for step in range(start, total):
            phase = next(p for p in phases if p.start <= step < p.end)
            if state is None or state.phase is not phase:
                if state is not None:
                    state.close()
                state = _PhaseState(pipe, cfg, phase, training_prompts(cfg, vocab, labels, phase), ti_ids)
                if opt_state is not None:
                    state.optimizer.load_state_dict(opt_state)
                    opt_state = None
            gen = _step_generator(cfg.seed, step)
            bs = cfg.lora.batch_size
            idx = torch.randint(len(labels), (bs,), generator=gen)
            eps_vae = torch.randn(mean[idx].shape, generator=gen)
            latents = (mean[idx].cpu() + std[idx].cpu() * eps_vae) * scaling
            noise = torch.randn(latents.shape, generator=gen)
            t = torch.randint(0, n_train_t, (bs,), generator=gen)
            latents, noise, t = latents.to(device), noise.to(device), t.to(device)
            noisy = noise_sched.add_noise(latents, noise, t)
            target = noise if prediction == "epsilon" else noise_sched.get_velocity(latents, noise, t)
            with autocast(device, compute_dtype):
                enc = state.text_states(pipe, idx)
                pred = pipe.unet(noisy.to(compute_dtype), t, enc.to(compute_dtype), return_dict=False)[0]
            loss = F.mse_loss(pred.float(), target.float())
            value = float(loss.detach())
            if not math.isfinite(value):
                raise NonFiniteLossError(f"sd_lora/{phase.name}", step, value)
            scaler.scale(loss).backward()
            params = list(state.params.values())
            scaler.unscale_(state.optimizer)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(state.optimizer)
            scaler.update()
            state.optimizer.zero_grad(set_to_none=True)
            state.after_step()
            losses.append(value)
            done = step + 1
            if store is not None and key and done % cfg.lora.checkpoint_every == 0 and done < total:
                _save(store, key, pipe, cfg, tokens, phase, done, identity, state)
            if progress is not None:
                progress(done, total, {"phase": phase.name, "loss": value})
    finally:
        if state is not None:
            state.close()
    pipe.unet.eval()
    for comp in (pipe.unet, pipe.text_encoder, pipe.vae):
        comp.requires_grad_(False)
    lora_states = {a.name: lora_ops.lora_state_dict(pipe, a.name) for a in cfg.adapter_specs()}
    ti_state = ti_ops.embeddings_state(pipe, tokens) if tokens else {}
    return TrainResult(lora=lora_states, ti=ti_state, steps=total, resumed_from=start, losses=losses)


def _save(store: Store, key: str, pipe: "StableDiffusionPipeline", cfg: SdLoraSettings, tokens: list[str],
          phase: Phase, step: int, identity: str, state: _PhaseState) -> None:
    rng = {"torch": torch.get_rng_state()}
    if pipe.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(pipe.device)
    ck = Checkpoint(
        step=step, phase=phase.name, identity=identity,
        lora={a.name: lora_ops.lora_state_dict(pipe, a.name) for a in cfg.adapter_specs()},
        ti=ti_ops.embeddings_state(pipe, tokens) if tokens else {},
        optimizer=state.optimizer.state_dict(), rng=rng,
    )
    write_checkpoint(store, key, ck)
