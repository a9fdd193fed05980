"""Sampling from the closed-set generator: DDIM with classifier-free guidance.

``pred = pred_c + w * (pred_c - pred_u)`` on the model's output (the velocity for the default
v-prediction; the same affine combination as ``eps = eps_c + w (eps_c - eps_u)``, since eps is
affine in v for a given x_t). ``w = 0`` is the plain conditional model; larger ``w`` pushes samples
harder towards their labels, until the images break. The best ``w`` depends on how the model was
trained. The default (``DEFAULT_GUIDANCE``, from ``GenerationConfig.guidance``) is 0.5, measured with the
library's default generator on the digits set (benchmarks/generator_digits.py): digit faithfulness
w=0.5 100%, 1.0 95%, 1.5 86%, 2.5 46%: past ~1 strokes thicken into other digits. The demo's
generator, trained with Min-SNR weighting on the 32 px sample, wanted more: w in 1–2.5 gave its most
faithful images, w = 0.5 lost ~5 points on dynasty and w = 5 broke the images; the demo pins 1.5.
A label equal to its task's class count is "null": that task is left free (the model was trained
with per-task label dropout), so one can condition on e.g. glaze only.

The result is deterministic in ``(model, labels, seed, steps, guidance)`` and independent of
``batch_size``: each image's starting noise comes from its own generator seeded by
``(seed, image index)``, and DDIM with ``eta = 0`` adds no further noise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch

from porcelain.device import autocast, choose_device, choose_dtype
from porcelain.models.generator import (
    DEFAULT_GUIDANCE,
    DEFAULT_SAMPLE_BATCH_SIZE,
    DEFAULT_SAMPLING_STEPS,
    ConditionalUNet,
)
from porcelain.progress import ProgressFn, null_progress
from porcelain.train.generator import labels_to_tensor

__all__ = [
    "DEFAULT_GUIDANCE",
    "DEFAULT_SAMPLE_BATCH_SIZE",
    "DEFAULT_SAMPLING_STEPS",
    "image_noise",
    "run_with_oom_backoff",
    "sample_images",
]

log = logging.getLogger("porcelain")


T = TypeVar("T")


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError)


def run_with_oom_backoff(
    fn: Callable[[int, int], T],
    total: int,
    batch_size: int,
    *,
    is_oom: Callable[[BaseException], bool] = _is_oom,
    logger: logging.Logger | None = None,
) -> list[T]:
    """Call ``fn(start, stop)`` over ``[0, total)`` in chunks of ``batch_size``; return the results in order.

    When a call runs out of (CUDA) memory, the batch size is halved and the same chunk retried;
    the smaller size is kept for the rest of the run. At batch size 1 the error is re-raised.
    ``is_oom`` decides what counts as out-of-memory (tests inject a fake one).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    logger = logger or log
    results: list[T] = []
    start = 0
    while start < total:
        stop = min(start + batch_size, total)
        try:
            results.append(fn(start, stop))
        except BaseException as exc:  # noqa: BLE001 - filtered by is_oom, re-raised otherwise
            if not is_oom(exc) or batch_size == 1:
                raise
            batch_size = max(1, batch_size // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            logger.warning("out of memory on a batch of %d images; retrying with batch size %d",
                           stop - start, batch_size)
            continue
        start = stop
    return results


def _image_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for image ``index`` of a run with ``seed``."""
    state = np.random.SeedSequence([int(seed) % (1 << 64), int(index)]).generate_state(1, np.uint64)
    return int(state[0]) & ((1 << 63) - 1)


def image_noise(seed: int, indices: range | list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """The starting noise of the given images (CPU float32, ``len(indices) × shape``)."""
    out = torch.empty((len(indices), *shape))
    for k, i in enumerate(indices):
        gen = torch.Generator(device="cpu").manual_seed(_image_seed(seed, i))
        out[k] = torch.randn(shape, generator=gen)
    return out


@torch.no_grad()
def _denoise(model: ConditionalUNet, x: torch.Tensor, y: torch.Tensor, scheduler, guidance: float | np.ndarray,
             dev: torch.device, dt: torch.dtype) -> torch.Tensor:
    """``guidance``: one scale, or one per image (a batch of SIP edits, each at its own scale)."""
    null = model.null_labels(len(y), device=dev)
    per_image = np.ndim(guidance) > 0
    w = torch.as_tensor(np.asarray(guidance, np.float32), device=dev).view(-1, 1, 1, 1) if per_image else float(guidance)
    for t in scheduler.timesteps:
        tt = torch.full((len(x),), int(t), device=dev, dtype=torch.long)
        with autocast(dev, dt):
            if not per_image and w == 0:
                pred = model(x, tt, y).float()
            else:
                both = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, null])).float()
                pred_c, pred_u = both.chunk(2)
                pred = pred_c + w * (pred_c - pred_u)
        x = scheduler.step(pred, t, x, eta=0.0).prev_sample
    return x


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float ``N×3×H×W`` in [-1, 1] → uint8 ``N×H×W×3``."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def sample_images(
    model: ConditionalUNet,
    labels: np.ndarray,
    *,
    steps: int = DEFAULT_SAMPLING_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    seed: int = 0,
    batch_size: int = DEFAULT_SAMPLE_BATCH_SIZE,
    device: str = "auto",
    dtype: str = "auto",
    progress: ProgressFn = null_progress,
    first_index: int = 0,
) -> np.ndarray:
    """Generate one image per row of ``labels`` (int64 ``N×T``; value ``n_t`` = task ``t`` left free).

    Row ``i`` is image number ``first_index + i`` of the run seeded ``seed``: its noise depends on that
    number only, so images ``[k, n)`` made later equal those of one call for ``[0, n)`` (a shard can
    grow without changing what it already holds). Returns uint8 ``N×H×W×3``. On CUDA out-of-memory
    the batch size is halved and retried.
    """
    spec = model.spec
    y_all = labels_to_tensor(labels, spec.num_classes, allow_null=True)
    n = len(y_all)
    res = spec.resolution
    if n == 0:
        return np.zeros((0, res, res, spec.in_channels), dtype=np.uint8)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    dev = choose_device(device)
    scheduler = spec.make_sample_scheduler()
    scheduler.set_timesteps(steps)
    shape = (spec.in_channels, res, res)

    def start_latents(start: int, stop: int) -> torch.Tensor:
        return image_noise(seed, range(first_index + start, first_index + stop), shape).to(dev) * scheduler.init_noise_sigma

    return denoise_in_batches(model, y_all, start_latents, scheduler, guidance=guidance, batch_size=batch_size,
                              device=device, dtype=dtype, progress=progress)


def denoise_in_batches(
    model: ConditionalUNet,
    y_all: torch.Tensor,
    start_latents: Callable[[int, int], torch.Tensor],
    scheduler,
    *,
    guidance: float | np.ndarray,
    batch_size: int,
    device: str = "auto",
    dtype: str = "auto",
    progress: ProgressFn = null_progress,
) -> np.ndarray:
    """Denoise images ``[start, stop)`` from ``start_latents(start, stop)`` with ``scheduler``'s
    timesteps, batch by batch (halving the batch on out-of-memory), in eval mode; uint8 ``N×H×W×3``.
    Shared by txt2img (:func:`sample_images`) and img2img (:mod:`porcelain.generate.img2img`).
    ``guidance``: one scale, or an array with one per image."""
    n = len(y_all)
    if np.ndim(guidance) > 0 and len(guidance) != n:
        raise ValueError(f"{len(guidance)} guidance scales for {n} images")
    dev = choose_device(device)
    dt = choose_dtype(dtype, dev)
    was_training = model.training
    model.to(dev).eval()
    produced = 0

    def chunk(start: int, stop: int) -> np.ndarray:
        nonlocal produced
        x = start_latents(start, stop)
        w = np.asarray(guidance, np.float64)[start:stop] if np.ndim(guidance) > 0 else float(guidance)
        out = to_uint8(_denoise(model, x, y_all[start:stop].to(dev), scheduler, w, dev, dt))
        produced += stop - start
        progress(produced, n, {"batch_size": stop - start})
        return out

    try:
        parts = run_with_oom_backoff(chunk, n, batch_size)
    finally:
        model.train(was_training)
    return np.concatenate(parts, axis=0)
