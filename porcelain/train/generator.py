"""Training of the closed-set generator (:mod:`porcelain.models.generator`).

DDPM noise-prediction training: an image ``x0`` is noised to ``x_t`` at a random timestep with the
spec's :class:`~diffusers.DDPMScheduler` (``add_noise``) and the model learns to predict the noise
(or the velocity, for ``prediction_type='v_prediction'``) given ``t`` and the labels. Labels are
dropped to the per-task "null" index so that the same model also serves as the unconditional
(and partly conditional) model needed by classifier-free guidance.

Deterministic in ``seed`` for a given device/dtype: every random draw (batch indices, flips, noise,
timesteps, label dropout) comes from one CPU ``torch.Generator``.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler

from porcelain.device import autocast, choose_device, choose_dtype, grad_scaler
from porcelain.errors import DataError, NonFiniteLossError
from porcelain.models.generator import (
    DEFAULT_BALANCE,
    DEFAULT_BATCH_SIZE,
    DEFAULT_EMA,
    DEFAULT_HFLIP,
    DEFAULT_LABEL_DROPOUT,
    DEFAULT_LR,
    DEFAULT_SNR_GAMMA,
    DEFAULT_TRAIN_STEPS,
    DEFAULT_WARMUP_STEPS,
    ConditionalUNet,
)
from porcelain.progress import ProgressFn, null_progress

__all__ = [
    "DEFAULT_BALANCE",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_EMA",
    "DEFAULT_HFLIP",
    "DEFAULT_LABEL_DROPOUT",
    "DEFAULT_LR",
    "DEFAULT_SNR_GAMMA",
    "DEFAULT_TRAIN_STEPS",
    "DEFAULT_WARMUP_STEPS",
    "STAGE",
    "combination_sampling_weights",
    "images_to_tensor",
    "labels_to_tensor",
    "train_generator",
]

log = logging.getLogger("porcelain")

STAGE = "closed-set generator training"
_CALIBRATION_STEPS = 20  # steps timed before a time budget decides the number of steps
_clock = time.monotonic  # replaceable in tests


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``N×H×W×3`` → float32 ``N×3×H×W`` in [-1, 1]."""
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise DataError(f"images must be N×H×W×3, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise DataError(f"images must be uint8, got {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def labels_to_tensor(
    labels: np.ndarray | torch.Tensor, num_classes: list[int], *, allow_null: bool = True
) -> torch.Tensor:
    """int ``N×T`` → int64 tensor, checking each column is in ``[0, n_t]`` (``n_t`` = null, if allowed)."""
    y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    if y.ndim != 2 or y.shape[1] != len(num_classes):
        raise DataError(f"labels must be N×{len(num_classes)}, got shape {tuple(y.shape)}")
    if y.is_floating_point():
        raise DataError(f"labels must be integers, got {y.dtype}")
    y = y.long()
    upper = torch.tensor(num_classes) + (1 if allow_null else 0)
    bad = (y < 0) | (y >= upper.to(y.device))
    if bad.any():
        i, t = (int(v) for v in bad.nonzero()[0])
        raise DataError(f"label {int(y[i, t])} at row {i}, task {t} is outside [0, {int(upper[t]) - 1}]")
    return y


def _drop_labels(y: torch.Tensor, null: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Each task's label → null with prob ``p``; additionally all labels of a row → null with prob ``p``."""
    if p <= 0:
        return y
    b, t = y.shape
    drop = torch.rand(b, t, generator=gen) < p
    drop_all = torch.rand(b, 1, generator=gen) < p
    return torch.where(drop | drop_all, null.expand(b, t), y)


def combination_sampling_weights(labels: np.ndarray, alpha: float) -> np.ndarray:
    """Per-row draw probabilities ∝ ``count(row's label combination) ** -alpha`` (sum 1, float64)."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty N×T array, got shape {labels.shape}")
    _, inverse, counts = np.unique(labels, axis=0, return_inverse=True, return_counts=True)
    w = counts[inverse.reshape(-1)].astype(np.float64) ** -float(alpha)
    return w / w.sum()


def train_generator(
    model: ConditionalUNet,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    steps: int = DEFAULT_TRAIN_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    label_dropout: float = DEFAULT_LABEL_DROPOUT,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "auto",
    progress: ProgressFn = null_progress,
    ema: float | None = DEFAULT_EMA,
    lr_schedule: str = "cosine",
    warmup_steps: int = DEFAULT_WARMUP_STEPS,
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
    hflip: bool = DEFAULT_HFLIP,
    snr_gamma: float | None = DEFAULT_SNR_GAMMA,
    balance: float = DEFAULT_BALANCE,
    time_budget_s: float | None = None,
) -> tuple[ConditionalUNet, dict[str, Any]]:
    """Train ``model`` in place on uint8 ``images`` (N×H×W×3) and int64 ``labels`` (N×T).

    Returns ``(model, history)``; the model is left in eval mode, on ``device``, and holds the EMA
    weights when ``ema`` is given (the raw weights are discarded). ``history`` has per-step
    ``loss`` and ``lr`` lists and ``seconds``, ``steps``, ``requested_steps``, ``steps_per_s``,
    ``stopped_early`` (and the settings used).

    ``lr_schedule`` is any name of :func:`diffusers.optimization.get_scheduler` (``"constant"``,
    ``"cosine"``, …). ``snr_gamma`` enables Min-SNR-gamma loss weighting (``None``, the default: plain
    MSE on the prediction target). Min-SNR gives the noisiest timesteps almost no weight (for
    v-prediction ``min(snr, γ) / (snr + 1) → snr``), and those are where the labels decide what the
    image shows: on the digits set γ=5 reached 83–90% digit faithfulness, plain MSE 100% at equal
    steps (benchmarks/generator_digits.py).

    ``balance`` (α ≥ 0) draws each training image with probability ∝ ``count(its label
    combination) ** -α`` (:func:`combination_sampling_weights`): 0 is uniform over images, 1 uniform
    over combinations. The targeted plan asks the generator for the rarest combinations, so it must
    learn them rather than the dataset's attribute correlations.

    ``hflip`` also trains on mirrored images. Off by default: a mirrored image must belong to the same
    classes, which holds for a vase photographed from the other side but not for digits or text (on
    the digits set, with flips, a generated 3 or 6 was as often its mirror image: digit faithfulness
    47% → 88% without; benchmarks/generator_digits.py).

    ``time_budget_s`` makes training fit a wall-clock budget: the speed of the first steps decides how
    many of ``steps`` fit, the LR schedule is re-planned for that many, and training also stops if the
    budget runs out anyway. The result then depends on the machine's speed (``None``: always run
    ``steps``, deterministic in ``seed``). ``history["steps"]`` is the number actually run.

    Raises :class:`~porcelain.errors.NonFiniteLossError` as soon as a loss is NaN/inf.
    """
    spec = model.spec
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    if not 0.0 <= label_dropout < 1.0:
        raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}")
    if not 0.0 <= balance <= 1.0:
        raise ValueError(f"balance must be in [0, 1], got {balance}")
    x_all = images_to_tensor(images)
    if x_all.shape[-1] != spec.resolution or x_all.shape[-2] != spec.resolution:
        raise DataError(f"images are {x_all.shape[-2]}×{x_all.shape[-1]} but the generator expects "
                        f"{spec.resolution}×{spec.resolution}")
    y_all = labels_to_tensor(labels, spec.num_classes, allow_null=True)
    if len(y_all) != len(x_all):
        raise DataError(f"{len(x_all)} images but {len(y_all)} label rows")
    n = len(x_all)
    if n == 0:
        raise DataError("no training images")

    dev = choose_device(device)
    dt = choose_dtype(dtype, dev)
    model.to(dev).train()
    x_all = x_all.to(dev)  # labels stay on the CPU, where the dropout draws are made
    null = model.null_labels(1, device=torch.device("cpu"))
    noise_sched = spec.make_train_scheduler()
    # add_noise indexes alphas_cumprod with the timesteps; keep them on the device.
    noise_sched.alphas_cumprod = noise_sched.alphas_cumprod.to(dev)

    # Min-SNR-gamma weight of each timestep (Hang et al. 2023): low- and high-noise timesteps are
    # down-weighted. Off by default (see the docstring): the high-noise ones carry the labels.
    t_weight = None
    if snr_gamma:
        a = noise_sched.alphas_cumprod.float().cpu()
        snr = a / (1.0 - a)
        t_weight = snr.clamp(max=snr_gamma) / (snr if spec.prediction_type == "epsilon" else snr + 1)
    t_weight_dev = t_weight.to(dev) if t_weight is not None else None

    draw_weights = None
    if balance > 0:
        draw_weights = torch.from_numpy(combination_sampling_weights(y_all.numpy(), balance))

    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = _lr_scheduler(lr_schedule, opt, warmup_steps, steps)
    scaler = grad_scaler(dev, dt)
    ema_params = [p.detach().clone() for p in model.parameters()] if ema else None

    history: dict[str, Any] = {"loss": [], "lr": [], "stage": STAGE}
    planned = steps  # lowered once, after calibration, when a time budget is given
    start = _clock()
    done = 0
    stopped_early = False
    for step in range(steps):
        if step >= planned:
            break
        if draw_weights is None:
            idx = torch.randint(0, n, (batch_size,), generator=gen)
        else:
            idx = torch.multinomial(draw_weights, batch_size, replacement=True, generator=gen)
        flip = torch.rand(batch_size, generator=gen) < 0.5 if hflip else None
        noise = torch.randn((batch_size, *x_all.shape[1:]), generator=gen)
        t = torch.randint(0, spec.num_train_timesteps, (batch_size,), generator=gen)
        y = _drop_labels(y_all[idx], null, label_dropout, gen)

        x0 = x_all[idx.to(dev)]
        if flip is not None and bool(flip.any()):
            x0 = torch.where(flip.to(dev)[:, None, None, None], x0.flip(-1), x0)
        noise, t, y = noise.to(dev), t.to(dev), y.to(dev)
        xt = noise_sched.add_noise(x0, noise, t)
        target = noise if spec.prediction_type == "epsilon" else noise_sched.get_velocity(x0, noise, t)

        with autocast(dev, dt):
            pred = model(xt, t, y)
        per_image = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if t_weight is not None:
            per_image = per_image * t_weight_dev[t]
        loss = per_image.mean()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLossError(STAGE, step, value)

        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(opt)
        scaler.update()
        sched.step()
        if ema_params is not None:
            decay = min(float(ema), (1.0 + step) / (10.0 + step))
            with torch.no_grad():
                for e, p in zip(ema_params, model.parameters()):
                    e.lerp_(p.detach(), 1.0 - decay)
        done = step + 1
        # A NaN that reached the weights without a NaN loss (e.g. inf gradients): fail now, not later.
        if done % 50 == 0 or done == planned:
            if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                raise NonFiniteLossError(STAGE, step, float("nan"), hint="the weights became non-finite")

        history["loss"].append(value)
        history["lr"].append(sched.get_last_lr()[0])
        if time_budget_s is not None and done < planned:
            elapsed = _clock() - start
            if done == min(_CALIBRATION_STEPS, planned - 1):
                fit = max(done + 1, int(time_budget_s * done / max(elapsed, 1e-9)))
                if fit < planned:
                    log.info("%s: %.2fs/step, so %d of %d steps fit the %.0fs budget",
                             STAGE, elapsed / done, fit, steps, time_budget_s)
                    planned = fit
                    sched = _lr_scheduler(lr_schedule, opt, warmup_steps, planned, fast_forward=done)
            elif elapsed > time_budget_s:
                stopped_early = True
                log.warning("%s: time budget %.0fs spent after %d of %d planned steps",
                            STAGE, time_budget_s, done, planned)
                planned = done
        progress(done, planned, {"loss": value})

    if ema_params is not None:
        with torch.no_grad():
            for e, p in zip(ema_params, model.parameters()):
                p.copy_(e)
    model.eval()
    seconds = _clock() - start
    history.update(seconds=seconds, steps=done, requested_steps=steps, steps_per_s=done / max(seconds, 1e-9),
                   stopped_early=stopped_early, batch_size=batch_size, lr_max=lr, ema=ema,
                   snr_gamma=snr_gamma, balance=balance, hflip=hflip,
                   seed=seed, device=str(dev), dtype=str(dt).replace("torch.", ""))
    return model, history


def _lr_scheduler(name: str, opt: torch.optim.Optimizer, warmup_steps: int, total: int, *, fast_forward: int = 0):
    """diffusers' LR schedule over ``total`` steps, advanced by ``fast_forward`` steps already taken."""
    sched = get_scheduler(name, opt, num_warmup_steps=min(warmup_steps, total // 2), num_training_steps=total)
    for _ in range(fast_forward):
        sched.step()
    return sched

