"""Batched Stable Diffusion img2img (SDEdit) with the trained LoRA / class tokens, whose every image
depends only on its source, prompt, guidance and seed.

How it works: SDEdit is txt2img started part way. With ``steps`` DDIM steps, strength ``S`` runs the
last ``k = floor(S · steps)`` of them (diffusers' img2img convention,
:func:`porcelain.generate.img2img.denoising_steps`): each source is encoded by the VAE (the mean of
its latent distribution, no sampling), noised with ``scheduler.add_noise`` to the first of those
``k`` timesteps with its own noise, and the txt2img pipeline denoises it over the remaining ``k``
steps — the same pipeline call as :func:`porcelain.diffusion.txt2img.generate`, on a copy of the
pipeline whose DDIM scheduler keeps only the last ``k`` timesteps (DDIM computes each step's
previous timestep from ``num_inference_steps``, not from its list, so the last ``k`` steps are
exactly those of the full sampler).

* ``S = 0`` runs no step: the sources come back unchanged (an exact copy; no VAE round trip).
* ``S = 1`` starts from pure noise, discarding the source: the result equals
  :func:`~porcelain.diffusion.txt2img.generate` with the same prompts and seeds, bit for bit.
* ``0 < S < 1`` with ``floor(S · steps) = 0`` is an error (no step would run: raise ``steps``).

Why not diffusers' ``StableDiffusionImg2ImgPipeline``: at strength 1 it still starts from
``add_noise(source, noise, t_first)``, whose signal coefficient ``sqrt(alphā_t)`` is not 0 (SD's
DDIM uses ``leading`` spacing: with 25 steps ``t_first`` = 961, ``sqrt(alphā)`` ≈ 0.085; with 4
steps ``t_first`` = 751, ≈ 0.24), so S = 1 keeps a trace of the source and cannot equal txt2img;
and it draws the VAE's latent sample and then the noise from one generator per image, in the
pipeline's dtype, so its noise is not txt2img's either.

Image ``i``'s noise is :func:`~porcelain.diffusion.txt2img.initial_latents` of ``seeds[i]`` (its
own CPU generator), DDIM ``eta = 0`` adds none, so an image does not depend on the batch size or on
which other images share its call (up to the last-bit differences of batched kernels). Images
are grouped by guidance scale (SIP gives every source its own), each group run in batches of
``batch_size``, halved on CUDA out-of-memory (:func:`~porcelain.diffusion.txt2img.run_with_oom_backoff`).
The pipeline's device and dtype are used (fp32 on CPU, fp16/bf16 on CUDA: :func:`load_pipeline`).

:func:`refine_sd_images` is the entry point of the image-conditioned kinds (``sgd_mix``, ``sip``
with ``refiner: sd_lora``): prompts from labels as the ``sd_lora`` kind makes them (template,
class tokens, adapter weights), optionally followed by a caption (SIP), and per-image provenance.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from porcelain.errors import ConfigError
from porcelain.generate.img2img import denoising_steps
from porcelain.train.generator import images_to_tensor
from porcelain.storage.store import Store

from .lora import set_adapter_weights
from .settings import SdLoraSettings, parse_settings
from .txt2img import initial_latents, negative_prompts, run_with_oom_backoff

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

__all__ = ["img2img", "refine_sd_images", "sd_prompts"]


def _last_steps_view(pipe: "StableDiffusionPipeline", k: int) -> "StableDiffusionPipeline":
    """A shallow copy of ``pipe`` (same modules) whose scheduler, after ``set_timesteps(n)``, keeps the last ``k``."""
    from diffusers import DDIMScheduler

    if not isinstance(pipe.scheduler, DDIMScheduler):
        raise TypeError(f"img2img needs the DDIM scheduler load_pipeline sets, got {type(pipe.scheduler).__name__}")
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    full = sched.set_timesteps

    def set_timesteps(num_inference_steps: int, *args: Any, **kwargs: Any) -> None:
        full(num_inference_steps, *args, **kwargs)
        sched.timesteps = sched.timesteps[num_inference_steps - k:]

    sched.set_timesteps = set_timesteps  # type: ignore[method-assign]
    view = copy.copy(pipe)  # the modules are shared; the scheduler (and per-call state) is the copy's
    view.scheduler = sched
    return view


def _groups(guidance: Sequence[float]) -> list[tuple[float, list[int]]]:
    """Indices by guidance value, in order of first appearance."""
    out: dict[float, list[int]] = {}
    for i, g in enumerate(guidance):
        out.setdefault(float(g), []).append(i)
    return list(out.items())


def img2img(
    pipe: "StableDiffusionPipeline",
    images: np.ndarray,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    strength: float,
    steps: int = 25,
    guidance: float | Sequence[float] = 7.5,
    negative_prompt: str | Sequence[str] | None = None,
    batch_size: int = 8,
    lora_scale: float = 1.0,
    adapter_weights: Mapping[str, float] | None = None,
    output: Literal["uint8", "float"] = "uint8",
) -> list[np.ndarray]:
    """SDEdit each source (uint8 ``N×H×W×3``, sides multiples of the VAE factor) towards its prompt.

    ``guidance``: one scale for all, or one per image. ``lora_scale`` / ``adapter_weights`` as in
    :func:`~porcelain.diffusion.txt2img.generate`. Returns one H×W×3 image per source: uint8, or
    float32 in [0, 1] with ``output="float"``. See the module docstring for the strength convention.
    """
    n = len(prompts)
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 N×H×W×3, got {getattr(images, 'dtype', None)} "
                         f"{getattr(images, 'shape', None)}")
    if len(images) != n or len(seeds) != n:
        raise ValueError(f"need one source and one seed per prompt: {n} prompts, {len(images)} images, "
                         f"{len(seeds)} seeds")
    negatives = negative_prompts(negative_prompt, n)
    scales = [float(guidance)] * n if isinstance(guidance, (int, float)) else [float(g) for g in guidance]
    if len(scales) != n:
        raise ValueError(f"need one guidance scale per prompt: {n} prompts, {len(scales)} scales")
    k = denoising_steps(float(strength), steps)
    if n == 0 or strength == 0:
        if output == "float":
            return [im.astype(np.float32) / 255.0 for im in images]
        return [im.copy() for im in images]
    if k == 0:
        raise ValueError(f"strength {strength} with {steps} steps runs no denoising step "
                         f"(floor(strength·steps) = 0); raise steps to at least {math.ceil(1 / strength)}")
    f = pipe.vae_scale_factor
    h, w = images.shape[1:3]
    if h % f or w % f:
        raise ValueError(f"image height and width must be multiples of {f}, got {h}×{w}")
    shape = (pipe.unet.config.in_channels, h // f, w // f)
    dtype, device = pipe.unet.dtype, pipe.device
    view = _last_steps_view(pipe, k)
    sched = view.scheduler
    sched.set_timesteps(steps)
    t_start = sched.timesteps[:1].to(torch.long)
    vae = pipe.vae

    def start_latents(idx: list[int]) -> torch.Tensor:
        noise = torch.stack([initial_latents(seeds[i], shape) for i in idx])
        if k == steps:  # S = 1: pure noise, as txt2img
            return noise.to(device, dtype)
        x = images_to_tensor(images[idx]).to(device, vae.dtype)
        x0 = vae.encode(x).latent_dist.mean.float() * vae.config.scaling_factor
        noised = sched.add_noise(x0, noise.to(device), t_start.to(device).expand(len(idx)))
        return (noised / sched.init_noise_sigma).to(device, dtype)

    out: list[np.ndarray | None] = [None] * n
    for g, members in _groups(scales):
        def run(i: int, j: int, members: list[int] = members, g: float = g) -> list[np.ndarray]:
            idx = members[i:j]
            if adapter_weights:
                set_adapter_weights(pipe, adapter_weights)
            with torch.inference_mode():
                latents = start_latents(idx)
                result = view(
                    prompt=[prompts[t] for t in idx], negative_prompt=[negatives[t] for t in idx], latents=latents,
                    num_inference_steps=steps, guidance_scale=g, height=h, width=w, eta=0.0, output_type="np",
                    cross_attention_kwargs={"scale": float(lora_scale)},
                ).images
            result = np.asarray(result, dtype=np.float32)
            if output == "float":
                return [im for im in result]
            return [np.clip(np.rint(im * 255.0), 0, 255).astype(np.uint8) for im in result]

        for t, im in zip(members, run_with_oom_backoff(run, len(members), batch_size)):
            out[t] = im
    return out  # type: ignore[return-value]


def _clean_caption(caption: str) -> str:
    """A caption as one prompt part: commas (which separate the parts) and runs of spaces to one space."""
    return re.sub(r"\s+", " ", caption.replace(",", " ")).strip()


def _with_caption(phrase: str, caption: str, label_weight: int, caption_weight: int, tokenizer: Any) -> str:
    cap = _clean_caption(caption or "")
    if not cap or caption_weight == 0:
        return phrase
    for n in range(label_weight, 0, -1):
        prompt = ", ".join([phrase] * n + [cap] * caption_weight)
        if tokenizer is None or n == 1 or len(tokenizer(prompt, verbose=False).input_ids) <= tokenizer.model_max_length:
            return prompt
    raise AssertionError("unreachable")


def sd_prompts(ref: dict, cfg: SdLoraSettings, labels: list[dict[str, str]], captions: Sequence[str] | None = None,
               *, label_weight: int = 1, caption_weight: int = 1, tokenizer: Any = None,
               ) -> tuple[list[str], str, dict[str, float], str]:
    """(prompts, negative prompt, adapter weights, class-token mode) for refining images of ``labels``.

    The label phrase is the ``sd_lora`` kind's prompt of the labels, verbatim (its template, with
    the class tokens the weights were trained with: :func:`porcelain.diffusion.api.label_prompts`),
    so that the LoRA sees the prompts it was trained on. With ``captions`` (SIP), a non-empty caption
    follows, weighted by repetition: the phrase ``label_weight`` times, then the caption (commas
    turned to spaces) ``caption_weight`` times, joined by ", ". Plain diffusers pipelines read
    ``(text:1.2)`` weights as literal characters; repeating a part gives its tokens a larger share
    of the cross-attention with any text encoder. The phrase comes first, so CLIP's truncation cuts
    the caption, never the label; and with a ``tokenizer``, the phrase is repeated fewer times
    (down to once) where the repeats would push the caption past the text encoder's
    ``model_max_length`` (77 tokens for CLIP).
    """
    from .api import label_prompts

    phrases, negative, weights, mode = label_prompts(ref, cfg, labels)
    if captions is None:
        return phrases, negative, weights, mode
    if len(captions) != len(phrases):
        raise ValueError(f"{len(captions)} captions for {len(phrases)} label dicts")
    for name, w, least in (("label_weight", label_weight, 1), ("caption_weight", caption_weight, 0)):
        if isinstance(w, bool) or not isinstance(w, int) or w < least:
            raise ValueError(f"{name} must be an integer >= {least} (a repetition count), got {w!r}")
    prompts = [_with_caption(p, c, label_weight, caption_weight, tokenizer) for p, c in zip(phrases, captions)]
    return prompts, negative, weights, mode


def refine_sd_images(
    store: Store,
    ref: dict,
    cfg: SdLoraSettings,
    images: np.ndarray,
    labels: list[dict[str, str]],
    seeds: Sequence[int],
    *,
    strength: float,
    guidance: float | Sequence[float] | None = None,
    captions: Sequence[str] | None = None,
    label_weight: int = 1,
    caption_weight: int = 1,
    device: str = "auto",
    dtype: str = "auto",
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """img2img of ``images`` (uint8 ``N×R×R×3``, R = ``cfg.resolution``) with the trained weights of
    ``ref`` (a :func:`~porcelain.diffusion.api.train_sd_lora` reference), towards ``labels``.

    ``guidance`` defaults to ``cfg.inference.guidance`` (one value, or one per image); steps, batch
    size and LoRA scale are ``cfg.inference``'s. Prompts: :func:`sd_prompts` (with ``captions``, the
    label phrase ``label_weight`` times, then the caption ``caption_weight`` times). Returns (uint8
    ``N×R×R×3``, one provenance dict per image: refiner, prompt, negative prompt, strength,
    guidance, seed, steps, LoRA scale, adapter weights, class tokens, base hash).
    """
    from .api import cached_pipeline

    cfg = parse_settings(cfg)
    n = len(labels)
    if len(images) != n or len(seeds) != n:
        raise ConfigError(f"refine_sd_images: {len(images)} images, {n} label dicts, {len(seeds)} seeds")
    r = cfg.resolution
    if n and tuple(images.shape[1:]) != (r, r, 3):
        raise ConfigError(f"refine_sd_images: sources must be {r}×{r}×3 (sd.resolution), got {images.shape[1:]}")
    inf = cfg.inference
    if guidance is None:
        guidance = inf.guidance
    scales = [float(guidance)] * n if isinstance(guidance, (int, float)) else [float(g) for g in guidance]
    if n == 0:
        return np.zeros((0, r, r, 3), np.uint8), []
    pipe = cached_pipeline(store, ref, cfg, device=device, dtype=dtype)
    prompts, negative, weights, mode = sd_prompts(ref, cfg, labels, captions, label_weight=label_weight,
                                                  caption_weight=caption_weight, tokenizer=pipe.tokenizer)
    out = img2img(pipe, images, prompts, seeds, strength=strength, steps=inf.steps, guidance=scales,
                  negative_prompt=negative, batch_size=inf.batch_size, lora_scale=inf.lora_scale,
                  adapter_weights=weights)
    prov = [{"refiner": "sd_lora", "prompt": p, "negative_prompt": negative, "strength": float(strength),
             "guidance": g, "seed": int(s), "steps": inf.steps, "lora_scale": inf.lora_scale,
             "adapter_weights": dict(weights), "class_tokens": mode, "base_hash": ref["base_hash"]}
            for p, g, s in zip(prompts, scales, seeds)]
    return np.stack(out), prov
