"""Batched txt2img whose every image depends only on its prompt and its seed.

Each image's starting latent is drawn on the CPU from its own ``torch.Generator`` seeded by its
seed, then moved to the device; DDIM with ``eta = 0`` adds no further noise. So an image is the same
whatever the batch size and however the images are spread over shards and workers (up to the
last-bit differences of batched kernels). On CUDA out-of-memory the batch is halved and the failed
batch retried, down to one image.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Literal, TypeVar

import numpy as np
import torch

from .lora import set_adapter_weights

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

__all__ = ["generate", "initial_latents", "run_with_oom_backoff"]

log = logging.getLogger("porcelain")
T = TypeVar("T")


def initial_latents(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The starting latent of one image: standard normal from a CPU generator seeded by ``seed``."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(seed)), dtype=torch.float32)


def negative_prompts(negative_prompt: str | Sequence[str] | None, n: int) -> list[str]:
    """One negative prompt per prompt: a single one (or none: "") repeated, or a list of ``n``."""
    if isinstance(negative_prompt, str) or negative_prompt is None:
        return [negative_prompt or ""] * n
    negatives = list(negative_prompt)
    if len(negatives) != n:
        raise ValueError(f"need one negative prompt per prompt: {n} prompts, {len(negatives)} negatives")
    return negatives


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError)


def run_with_oom_backoff(fn: Callable[[int, int], list[T]], total: int, batch_size: int) -> list[T]:
    """Call ``fn(start, stop)`` over ``[0, total)`` in batches; on out-of-memory halve the batch and retry.

    The smaller batch size is kept for the rest of the run. An out-of-memory error at batch size 1
    is raised.
    """
    out: list[T] = []
    bs, i = max(1, int(batch_size)), 0
    while i < total:
        j = min(total, i + bs)
        try:
            part = fn(i, j)
        except Exception as e:
            if not _is_oom(e) or bs == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            bs = max(1, bs // 2)
            log.warning("txt2img: out of memory at batch %d, retrying with batch %d", j - i, bs)
            continue
        if len(part) != j - i:
            raise RuntimeError(f"batch [{i}, {j}) returned {len(part)} images")
        out.extend(part)
        i = j
    return out


def generate(
    pipe: "StableDiffusionPipeline",
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    negative_prompt: str | Sequence[str] | None = None,
    steps: int = 25,
    guidance: float = 7.5,
    batch_size: int = 8,
    lora_scale: float = 1.0,
    adapter_weights: Mapping[str, float] | None = None,
    height: int | None = None,
    width: int | None = None,
    output: Literal["uint8", "float"] = "uint8",
) -> list[np.ndarray]:
    """One H×W×3 image per ``(prompt, seed)``: uint8, or float32 in [0, 1] with ``output="float"``.

    ``lora_scale`` scales every active LoRA (UNet and text encoder); ``adapter_weights``
    (``{adapter: weight}``) selects and weights the adapters, re-applied before every batch.
    ``height``/``width`` default to the UNet's native size.
    """
    n = len(prompts)
    if len(seeds) != n:
        raise ValueError(f"need one seed per prompt: {n} prompts, {len(seeds)} seeds")
    negatives = negative_prompts(negative_prompt, n)
    f = pipe.vae_scale_factor
    native = pipe.unet.config.sample_size
    native = native if isinstance(native, int) else native[0]
    h, w = height or native * f, width or native * f
    if h % f or w % f:
        raise ValueError(f"height and width must be multiples of {f}, got {h}×{w}")
    shape = (pipe.unet.config.in_channels, h // f, w // f)
    dtype = pipe.unet.dtype

    def run(i: int, j: int) -> list[np.ndarray]:
        if adapter_weights:
            set_adapter_weights(pipe, adapter_weights)
        latents = torch.stack([initial_latents(s, shape) for s in seeds[i:j]]).to(pipe.device, dtype)
        with torch.inference_mode():
            images = pipe(
                prompt=list(prompts[i:j]), negative_prompt=negatives[i:j], latents=latents,
                num_inference_steps=steps, guidance_scale=guidance, height=h, width=w, eta=0.0,
                output_type="np", cross_attention_kwargs={"scale": float(lora_scale)},
            ).images
        images = np.asarray(images, dtype=np.float32)
        if output == "float":
            return [im for im in images]
        return [np.clip(np.rint(im * 255.0), 0, 255).astype(np.uint8) for im in images]

    return run_with_oom_backoff(run, n, batch_size)
