"""Image-to-image with the closed-set generator: SDEdit (Meng et al. 2022) at a strength ``S``.

Each source image is noised to the DDIM timestep of strength ``S`` with ``scheduler.add_noise`` and
its own seeded noise, then denoised over the remaining steps with classifier-free guidance towards
the given labels — the sampler of :func:`porcelain.generate.sampling.sample_images`, started part way.

* With ``steps`` DDIM steps (``trailing`` spacing, timesteps ``T-1, T-1-T/steps, …``), strength ``S``
  runs the last ``k = floor(S · steps)`` of them (diffusers' img2img convention), starting from the
  source noised to timestep ``timesteps[steps - k]`` (≈ ``S · T - 1``).
* ``S = 0`` runs no step: the sources are returned unchanged (an exact uint8 copy).
* ``S = 1`` starts from pure noise, discarding the source: the result equals ``sample_images`` with
  the same ``seed``, ``steps`` and ``guidance`` (``add_noise`` at ``T-1`` would keep a trace of the
  source, ``sqrt(alpha_bar) ≈ 5e-5`` on the cosine schedule; the limit is defined as the sampler's).
* ``0 < S < 1`` with ``floor(S · steps) = 0`` is an error (no step would run: raise ``steps``).

Image ``i``'s noise is :func:`~porcelain.generate.sampling.image_noise` of
``(seed, first_index + i)`` — with ``first_index = 0`` the noise ``sample_images`` starts image
``i`` from — and DDIM with ``eta = 0`` adds none, so the result is deterministic in
``(model, images, labels, strength, steps, guidance, seed, first_index)`` and does not depend on
``batch_size`` (up to float rounding of batched convolutions, at most 1 grey level).

:func:`guidance_from_similarity` maps a CLIP similarity to a guidance scale for SIP (arXiv 2302.02070).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from porcelain.device import choose_device
from porcelain.generate.sampling import (
    DEFAULT_GUIDANCE,
    DEFAULT_SAMPLE_BATCH_SIZE,
    DEFAULT_SAMPLING_STEPS,
    denoise_in_batches,
    image_noise,
)
from porcelain.models.generator import ConditionalUNet
from porcelain.progress import ProgressFn, null_progress
from porcelain.train.generator import images_to_tensor, labels_to_tensor

__all__ = ["denoising_steps", "guidance_from_similarity", "img2img"]


def denoising_steps(strength: float, steps: int) -> int:
    """How many of ``steps`` DDIM steps strength ``strength`` runs: ``floor(strength · steps)``.

    A tolerance of 1e-9 absorbs float error (``0.3 · 10`` is 3, not 2).
    """
    if not 0.0 <= strength <= 1.0 or not math.isfinite(strength):
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return min(steps, int(math.floor(strength * steps + 1e-9)))


def img2img(
    model: ConditionalUNet,
    images_uint8: np.ndarray,
    labels: np.ndarray,
    *,
    strength: float,
    steps: int = DEFAULT_SAMPLING_STEPS,
    guidance: float | np.ndarray = DEFAULT_GUIDANCE,
    seed: int = 0,
    batch_size: int = DEFAULT_SAMPLE_BATCH_SIZE,
    device: str = "auto",
    dtype: str = "auto",
    first_index: int = 0,
    progress: ProgressFn = null_progress,
) -> np.ndarray:
    """SDEdit each image (uint8 ``N×H×W×3`` at the generator's resolution) towards its labels row,
    with one guidance scale for all or one per image (``guidance`` an array of length N).

    ``labels``: int ``N×T`` (value ``n_t`` leaves task ``t`` free, as in ``sample_images``).
    ``first_index``: image ``i`` of this call draws the noise of image ``first_index + i`` of the
    run ``seed``, so a run split into calls (shards, or one call per image) gives the images of one
    call. Returns uint8 ``N×H×W×3``. See the module docstring for the strength convention and limits.
    """
    spec = model.spec
    res, ch = spec.resolution, spec.in_channels
    if (not isinstance(images_uint8, np.ndarray) or images_uint8.dtype != np.uint8
            or images_uint8.shape[1:] != (res, res, ch)):
        raise ValueError(f"images must be uint8 N×{res}×{res}×{ch} (the generator's resolution), got "
                         f"{getattr(images_uint8, 'shape', None)} {getattr(images_uint8, 'dtype', None)}")
    y_all = labels_to_tensor(labels, spec.num_classes, allow_null=True)
    n = len(images_uint8)
    if len(y_all) != n:
        raise ValueError(f"{len(y_all)} label rows for {n} images")
    k = denoising_steps(float(strength), steps)
    if first_index < 0:
        raise ValueError(f"first_index must be >= 0, got {first_index}")
    if n == 0 or strength == 0:
        return images_uint8.copy()
    if k == 0:
        raise ValueError(f"strength {strength} with {steps} steps runs no denoising step "
                         f"(floor(strength·steps) = 0); raise steps to at least {math.ceil(1 / strength)}")
    dev = choose_device(device)
    scheduler = spec.make_sample_scheduler()
    scheduler.set_timesteps(steps)
    # DDIM's step computes the previous timestep from num_inference_steps, not from this list, so
    # dropping the first steps - k timesteps runs exactly the last k steps of the full sampler.
    scheduler.timesteps = scheduler.timesteps[steps - k:]
    t_start = int(scheduler.timesteps[0])
    shape = (ch, res, res)

    def start_latents(start: int, stop: int) -> torch.Tensor:
        noise = image_noise(seed, range(first_index + start, first_index + stop), shape).to(dev)
        if k == steps:  # S = 1: pure noise, as sample_images
            return noise * scheduler.init_noise_sigma
        x0 = images_to_tensor(images_uint8[start:stop]).to(dev)
        tt = torch.full((stop - start,), t_start, dtype=torch.long, device=dev)
        return scheduler.add_noise(x0, noise, tt)

    return denoise_in_batches(model, y_all, start_latents, scheduler, guidance=guidance, batch_size=batch_size,
                              device=device, dtype=dtype, progress=progress)


def guidance_from_similarity(
    sim: float | np.ndarray,
    *,
    lo: float,
    hi: float,
    w_min: float,
    w_max: float,
) -> float | np.ndarray:
    """Guidance scale for an image whose CLIP similarity to its class text is ``sim`` (SIP).

    The SIP paper gives no formula; this is a clipped linear, non-increasing map::

        w = w_max                                    for sim <= lo
        w = w_max - (w_max - w_min)(sim - lo)/(hi - lo)   for lo < sim < hi
        w = w_min                                    for sim >= hi

    Reasoning: an image CLIP already finds typical of its class (high ``sim``) needs little push
    towards the label, and a weak guidance keeps more of its own appearance (diversity); an atypical
    one (low ``sim``) gets the strongest guidance, so the edit lands on the class. ``lo < hi`` and
    ``0 <= w_min <= w_max`` are required. Scalars give a float, arrays an array of the same shape.
    """
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"need finite lo < hi, got lo={lo}, hi={hi}")
    if not (0 <= w_min <= w_max and math.isfinite(w_max)):
        raise ValueError(f"need 0 <= w_min <= w_max, got w_min={w_min}, w_max={w_max}")
    s = np.asarray(sim, dtype=np.float64)
    if np.isnan(s).any():
        raise ValueError("similarity is NaN")
    frac = np.clip((s - lo) / (hi - lo), 0.0, 1.0)
    w = w_max - (w_max - w_min) * frac
    return float(w) if w.ndim == 0 else w
