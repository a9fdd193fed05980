"""Training and inference of the multi-task classifier, with the paper's imbalance handling.

* Class weights: the effective number of samples of Cui et al. (2019), ``E_n = (1 - β^n) / (1 - β)``;
  a class with ``n`` training images gets weight ``1 / E_n = (1 - β) / (1 - β^n)``.
* A weighted sampler (``torch.utils.data.WeightedRandomSampler``) over per-image weights, and a
  class-weighted cross-entropy per task; the loss is the sum over tasks.

Everything takes in-memory arrays: images uint8 N×H×W×3, labels int64 N×T (column t indexes the
classes of task t).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import WeightedRandomSampler

from porcelain.device import autocast, choose_device, choose_dtype, grad_scaler
from porcelain.errors import NonFiniteLossError
from porcelain.models.classifier import MultiTaskClassifier, set_dropout_generator
from porcelain.progress import ProgressFn, null_progress

STAGE = "classifier training"
GPU_RESIDENT_BYTES = 1 << 30  # uint8 training sets up to 1 GiB are moved to the GPU whole


def effective_number_weights(counts: Sequence[int], beta: float = 0.999) -> torch.Tensor:
    """Per-class weights ``(1 - β) / (1 - β^n)`` normalised to sum to the number of classes.

    ``β = 0`` gives uniform weights, ``β -> 1`` inverse-frequency weights (``β = 1`` is taken as
    that limit, ``1/n``). Classes with count 0 get weight 0 (no NaN); the others share the total.
    Returns float32 of shape ``(len(counts),)``.
    """
    n = np.asarray(counts, dtype=np.float64)
    if n.ndim != 1 or n.size == 0:
        raise ValueError(f"counts must be a non-empty 1-D sequence, got shape {n.shape}")
    if np.any(n < 0) or not np.all(np.isfinite(n)):
        raise ValueError(f"counts must be finite and non-negative, got {list(counts)}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    present = n > 0
    if not present.any():
        raise ValueError("all class counts are zero: no class weights can be computed")
    w = np.zeros_like(n)
    if beta == 0.0:
        w[present] = 1.0
    elif beta == 1.0:
        w[present] = 1.0 / n[present]
    else:
        # 1 - β^n computed as -expm1(n log β): accurate when β is close to 1.
        w[present] = (1.0 - beta) / -np.expm1(n[present] * math.log(beta))
    w *= n.size / w.sum()
    return torch.from_numpy(w.astype(np.float32))


def _check_labels(labels: np.ndarray, counts: Sequence[Sequence[int]]) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an integer array N×T, got shape {labels.shape} dtype {labels.dtype}")
    if labels.shape[1] != len(counts):
        raise ValueError(f"labels have {labels.shape[1]} task columns but counts are given for {len(counts)} tasks")
    for t, c in enumerate(counts):
        col = labels[:, t]
        if col.size and (col.min() < 0 or col.max() >= len(c)):
            raise ValueError(f"task column {t}: labels must lie in [0, {len(c)}), got [{col.min()}, {col.max()}]")
        zero = [k for k in np.unique(col) if c[int(k)] == 0]
        if zero:
            raise ValueError(
                f"task column {t}: classes {zero} occur in the labels but have training count 0; "
                f"counts must be computed from the same training set"
            )
    return labels.astype(np.int64, copy=False)


def sample_weights(labels: np.ndarray, counts: Sequence[Sequence[int]], beta: float = 0.999) -> torch.Tensor:
    """Per-image weights (float64, length N) for ``WeightedRandomSampler``.

    An image's weight is the **mean over tasks** of its class's effective-number weight in that task.
    The mean (rather than the product or the maximum) keeps every task's rare classes up-weighted
    while bounding the spread of weights: a product over four tasks multiplies the ratios (a rare
    glaze that is also a rare type would be drawn thousands of times more often than a common image,
    so an epoch would repeat a handful of images), and the maximum ignores all but one task.
    """
    labels = _check_labels(labels, counts)
    per_task = [effective_number_weights(c, beta).double().numpy()[labels[:, t]] for t, c in enumerate(counts)]
    return torch.from_numpy(np.mean(per_task, axis=0))


def _augment(x: torch.Tensor, gen: torch.Generator, scale: tuple[float, float] = (0.8, 1.0),
             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Random horizontal flip + small random-resized crop, one affine resampling per batch.

    Random numbers come from the CPU generator ``gen`` so that results do not depend on the device.
    """
    n = x.shape[0]
    area = torch.empty(n).uniform_(*scale, generator=gen)
    log_r = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    r = torch.exp(log_r)
    sw = torch.sqrt(area * r).clamp(max=1.0)  # crop width / image width
    sh = torch.sqrt(area / r).clamp(max=1.0)
    tx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sw)  # crop centre, normalised coordinates
    ty = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sh)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = sw * flip
    theta[:, 0, 2] = tx
    theta[:, 1, 1] = sh
    theta[:, 1, 2] = ty
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and normalisation parameters (1-D tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _check_inputs(model: MultiTaskClassifier, images: np.ndarray, labels: np.ndarray,
                  task_names: Sequence[str], counts: Sequence[Sequence[int]]) -> np.ndarray:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be a uint8 array N×H×W×3, got {getattr(images, 'shape', None)} "
                         f"{getattr(images, 'dtype', type(images))}")
    if len(task_names) != len(counts):
        raise ValueError(f"{len(task_names)} task names but counts for {len(counts)} tasks")
    labels = _check_labels(labels, counts)
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} label rows")
    if images.shape[0] == 0:
        raise ValueError("no training images")
    for task, c in zip(task_names, counts):
        if task not in model.num_classes:
            raise ValueError(f"task {task!r} has no head in the model (heads: {', '.join(model.task_names)})")
        if model.num_classes[task] != len(c):
            raise ValueError(f"task {task!r}: the head has {model.num_classes[task]} classes, counts {len(c)}")
    return labels


def train_classifier(
    model: MultiTaskClassifier,
    images: np.ndarray,
    labels: np.ndarray,
    task_names: Sequence[str],
    *,
    counts: Sequence[Sequence[int]],
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    beta: float = 0.999,
    use_sampler: bool = True,
    class_weighted_loss: bool = True,
    augment: bool = True,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "auto",
    progress: ProgressFn = null_progress,
) -> tuple[MultiTaskClassifier, dict[str, Any]]:
    """Train ``model`` in place; return ``(model, history)`` with the model in eval mode.

    ``counts[t]`` are the class counts of task ``task_names[t]`` over the whole training set
    (they set the class weights of the loss and of the sampler). Each epoch draws N indices, with
    the weighted sampler (with replacement) or as a permutation; a last batch smaller than
    ``batch_size`` is dropped when N > batch_size (BatchNorm needs more than one image).
    Loss: sum over tasks of the cross-entropy, each with that task's effective-number class weights
    when ``class_weighted_loss``. AdamW (no decay on 1-D parameters), cosine learning rate per step.

    GPU: autocast in ``dtype`` (bf16/fp16, see :mod:`porcelain.device`), a grad scaler for fp16,
    channels-last memory; a uint8 training set up to ``GPU_RESIDENT_BYTES`` is moved to the GPU once,
    a larger one is copied per batch through pinned memory.

    Deterministic for a given ``seed`` on CPU; the global RNG state is restored afterwards.
    A NaN/inf loss raises :class:`NonFiniteLossError` at once, naming the step.

    ``history``: ``loss`` / ``task_loss[task]`` / ``lr`` per epoch, ``step_loss`` per step,
    ``steps``, ``seconds``, ``images_per_s``, ``device``, ``dtype``.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    labels = _check_inputs(model, images, labels, task_names, counts)
    dev = choose_device(device)
    cdtype = choose_dtype(dtype, dev)
    n = images.shape[0]
    bs = min(batch_size, n)
    steps_per_epoch = max(1, n // bs)
    total_steps = epochs * steps_per_epoch

    class_w = [effective_number_weights(c, beta).to(dev) if class_weighted_loss else None for c in counts]
    sampler_w = sample_weights(labels, counts, beta) if use_sampler else None

    x_all = torch.from_numpy(np.ascontiguousarray(images))
    y_all = torch.from_numpy(labels)
    pin = False
    if dev.type == "cuda":
        if x_all.numel() <= GPU_RESIDENT_BYTES:  # small uint8 datasets live on the GPU: no per-batch copies
            x_all, y_all = x_all.to(dev), y_all.to(dev)
        else:  # large ones are copied batch by batch from pinned memory
            pin = True

    history: dict[str, Any] = {"loss": [], "task_loss": {t: [] for t in task_names}, "lr": [], "step_loss": [],
                               "steps": 0, "device": str(dev), "dtype": str(cdtype).removeprefix("torch.")}
    start = time.perf_counter()
    # All randomness comes from this run's own generators, never torch's global RNG, so that runs in
    # parallel threads (a sweep) stay reproducible. (A timm backbone's own dropout or drop-path,
    # off by default, would still use the global RNG.)
    gen = torch.Generator().manual_seed(seed)  # data order and augmentation
    model.to(dev)
    set_dropout_generator(model, torch.Generator(device=dev).manual_seed(seed + 1))
    if dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    scaler = grad_scaler(dev, cdtype)
    model.train()
    step = 0
    for epoch in range(epochs):
        if sampler_w is not None:
            order = torch.tensor(list(WeightedRandomSampler(sampler_w, n, replacement=True, generator=gen)))
        else:
            order = torch.randperm(n, generator=gen)
        epoch_loss, epoch_task = 0.0, [0.0] * len(task_names)
        epoch_lr = optimizer.param_groups[0]["lr"]
        for b in range(steps_per_epoch):
            idx = order[b * bs:(b + 1) * bs]
            xb, yb = x_all[idx.to(x_all.device)], y_all[idx.to(y_all.device)]
            if pin:
                xb, yb = xb.pin_memory(), yb.pin_memory()
            x = model.preprocess(xb)
            y = yb.to(dev, non_blocking=True)
            if augment:
                x = _augment(x, gen)
            if dev.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(dev, cdtype):
                logits = model(x)
            task_losses = [
                F.cross_entropy(logits[task].float(), y[:, t], weight=class_w[t])
                for t, task in enumerate(task_names)
            ]
            stacked = torch.stack(task_losses)
            loss = stacked.sum()
            *task_values, value = torch.cat([stacked.detach(), loss.detach()[None]]).tolist()  # one sync
            step += 1
            if not math.isfinite(value):
                raise NonFiniteLossError(STAGE, step, value)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            history["step_loss"].append(value)
            epoch_loss += value
            for t, tv in enumerate(task_values):
                epoch_task[t] += tv
            progress(step, total_steps, {"epoch": epoch + 1, "loss": value})
        history["loss"].append(epoch_loss / steps_per_epoch)
        for t, task in enumerate(task_names):
            history["task_loss"][task].append(epoch_task[t] / steps_per_epoch)
        history["lr"].append(epoch_lr)
    set_dropout_generator(model, None)
    model.eval()
    seconds = time.perf_counter() - start
    history.update(steps=step, seconds=seconds, images_per_s=step * bs / max(seconds, 1e-9))
    return model, history


@torch.inference_mode()
def predict_logits(
    model: MultiTaskClassifier,
    images: np.ndarray,
    *,
    batch_size: int = 256,
    device: str = "auto",
    dtype: str = "auto",
) -> dict[str, np.ndarray]:
    """float32 logits N×C per task (in the model's task order), computed in eval mode."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be a uint8 array N×H×W×3, got {getattr(images, 'shape', None)}")
    dev = choose_device(device)
    cdtype = choose_dtype(dtype, dev)
    was_training = model.training
    model.to(dev).eval()
    out: dict[str, list[np.ndarray]] = {t: [] for t in model.task_names}
    try:
        for i in range(0, images.shape[0], batch_size):
            x = model.preprocess(images[i:i + batch_size])
            with autocast(dev, cdtype):
                logits = model(x)
            for t in model.task_names:
                out[t].append(logits[t].float().cpu().numpy())
    finally:
        model.train(was_training)
    return {t: (np.concatenate(v) if v else np.zeros((0, model.num_classes[t]), np.float32)) for t, v in out.items()}


def predict(
    model: MultiTaskClassifier,
    images: np.ndarray,
    *,
    batch_size: int = 256,
    device: str = "auto",
    dtype: str = "auto",
) -> list[np.ndarray]:
    """Predicted class index (int64, length N) per task, in the order of ``model.task_names``."""
    logits = predict_logits(model, images, batch_size=batch_size, device=device, dtype=dtype)
    return [logits[t].argmax(axis=1).astype(np.int64) for t in model.task_names]
