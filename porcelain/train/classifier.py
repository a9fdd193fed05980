"""Training and inference of the multi-task classifier, with the paper's imbalance handling.

* Budget in optimizer steps (:func:`train_classifier` ``steps``), the same whatever the number of
  images, so that adding synthetic images changes the data and nothing else; :func:`steps_for` turns
  epochs into steps. Linear warmup then cosine learning rate over the steps.
* Class weights: the effective number of samples of Cui et al. (2019), ``E_n = (1 - β^n) / (1 - β)``;
  a class with ``n`` training images gets weight ``1 / E_n = (1 - β) / (1 - β^n)``.
* Optionally a weighted sampler over per-image weights (:func:`sample_weights`), and a class-weighted
  cross-entropy per task; the loss is the sum over tasks. Measured on the digits set, the weighted
  loss alone is the default (benchmarks/RESULTS.md, "Classifier on digits").
* Model selection: with a val split, the checkpoint with the best mean macro-F1 over tasks.

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
    return labels.astype(np.int64, copy=False)


def weighting_counts(labels: np.ndarray, counts: Sequence[Sequence[int]]) -> list[list[int]]:
    """The counts that set the class weights: ``counts``, except that a class which occurs in ``labels``
    but has count 0 takes the **smallest positive count of its task**, so it gets the weight of the
    rarest counted class (never weight 0 or a crash).

    ``counts`` need not be computed from ``labels``: the sweep passes the *real* training counts while
    the training set also holds synthetic images, so that the real:synthetic ratio does not change the
    loss weighting. Synthetic images target classes that have real images, so the rule is a safeguard.
    A task whose counts are all 0 counts every class that occurs in ``labels`` once (uniform weights).
    """
    labels = _check_labels(labels, counts)
    out = []
    for t, c in enumerate(counts):
        c = [int(v) for v in c]
        positive = [v for v in c if v > 0]
        fill = min(positive) if positive else 1
        for k in np.unique(labels[:, t]):
            if c[int(k)] == 0:
                c[int(k)] = fill
        out.append(c)
    return out


def sample_weights(labels: np.ndarray, counts: Sequence[Sequence[int]], beta: float = 0.999) -> torch.Tensor:
    """Per-image weights (float64, length N) for a weighted sampler (``torch.multinomial``).

    An image's weight is the **mean over tasks** of its class's effective-number weight in that task
    (classes with count 0 that occur in ``labels``: see :func:`weighting_counts`).
    The mean (rather than the product or the maximum) keeps every task's rare classes up-weighted
    while bounding the spread of weights: a product over four tasks multiplies the ratios (a rare
    glaze that is also a rare type would be drawn thousands of times more often than a common image,
    so an epoch would repeat a handful of images), and the maximum ignores all but one task.
    """
    labels = _check_labels(labels, counts)
    counts = weighting_counts(labels, counts)
    per_task = [effective_number_weights(c, beta).double().numpy()[labels[:, t]] for t, c in enumerate(counts)]
    return torch.from_numpy(np.mean(per_task, axis=0))


def _augment(x: torch.Tensor, gen: torch.Generator, scale: tuple[float, float] = (0.8, 1.0),
             ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = True) -> torch.Tensor:
    """Random horizontal flip (when ``hflip``) + small random-resized crop, one affine resampling per batch.

    Random numbers come from the CPU generator ``gen`` so that results do not depend on the device
    (the same numbers are drawn with and without ``hflip``).
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
    if not hflip:
        flip = torch.ones(n)
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


def _check_images(images: Any, what: str = "images") -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{what} must be a uint8 array N×H×W×3, got {getattr(images, 'shape', None)} "
                         f"{getattr(images, 'dtype', type(images))}")


def _check_inputs(model: MultiTaskClassifier, images: np.ndarray, labels: np.ndarray,
                  task_names: Sequence[str], counts: Sequence[Sequence[int]]) -> np.ndarray:
    _check_images(images)
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


def steps_for(epochs: float, n_images: int, batch_size: int = 64, min_steps: int = 1) -> int:
    """Optimizer steps that show each of ``n_images`` images about ``epochs`` times at ``batch_size``,
    and at least ``min_steps``: ``max(min_steps, ceil(epochs · n_images / batch_size))``.

    For users who think in epochs. Note that a budget computed from the size of a training set that
    includes synthetic images grows with the synthetic share; compute it from the real images (or
    fix ``steps``) so that every point of a ratio sweep trains for the same number of steps.
    """
    if epochs <= 0 or n_images < 1 or batch_size < 1 or min_steps < 0:
        raise ValueError(f"need epochs > 0, n_images >= 1, batch_size >= 1, min_steps >= 0; "
                         f"got {epochs}, {n_images}, {batch_size}, {min_steps}")
    return max(int(min_steps), math.ceil(epochs * n_images / batch_size))


def macro_f1(pred: np.ndarray, target: np.ndarray, n_classes: int) -> float:
    """Macro-F1 as ``torchmetrics.MulticlassF1Score(average="macro")`` computes it, vectorised in numpy:
    the mean of the per-class F1 over classes present in the targets or the predictions."""
    pred = np.asarray(pred, dtype=np.int64)
    target = np.asarray(target, dtype=np.int64)
    cm = np.bincount(target * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(0) + cm.sum(1)  # 2tp + fp + fn
    present = denom > 0
    if not present.any():
        return 0.0
    return float(np.mean(2 * tp[present] / denom[present]))


def evaluate_macro_f1(model: MultiTaskClassifier, images: np.ndarray, labels: np.ndarray,
                      task_names: Sequence[str], *, batch_size: int = 256, device: str = "auto",
                      dtype: str = "auto") -> dict[str, float]:
    """Macro-F1 per task of ``model`` on ``(images, labels)`` (label column t is task ``task_names[t]``)."""
    logits = predict_logits(model, images, batch_size=batch_size, device=device, dtype=dtype)
    return {task: macro_f1(logits[task].argmax(axis=1), labels[:, t], model.num_classes[task])
            for t, task in enumerate(task_names)}


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from 1 to 0 at ``total`` (step counted from 0)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class _IndexStream:
    """Batch indices drawn continuously, independent of the training-set size.

    Weighted: each batch is ``batch_size`` independent draws with replacement, probability ∝ weight.
    Unweighted: consecutive slices of a stream of random permutations (a batch may span two of them),
    so every image is shown equally often.
    """

    def __init__(self, n: int, batch_size: int, weights: torch.Tensor | None, gen: torch.Generator):
        self.n, self.bs, self.weights, self.gen = n, batch_size, weights, gen
        self.buffer = torch.empty(0, dtype=torch.int64)

    def next(self) -> torch.Tensor:
        if self.weights is not None:
            return torch.multinomial(self.weights, self.bs, replacement=True, generator=self.gen)
        while self.buffer.numel() < self.bs:
            self.buffer = torch.cat([self.buffer, torch.randperm(self.n, generator=self.gen)])
        idx, self.buffer = self.buffer[:self.bs], self.buffer[self.bs:]
        return idx


def weighted_task_loss(logits: torch.Tensor, target: torch.Tensor, class_weight: torch.Tensor | None,
                       sample_weight: torch.Tensor, smoothing: torch.Tensor | None = None) -> torch.Tensor:
    """One head's cross-entropy with a weight per image: ``Σ wᵢ·cᵢ·ℓᵢ / Σ wᵢ·cᵢ`` (``cᵢ`` the class
    weight of image i's label). All ``wᵢ = 1`` is PyTorch's class-weighted mean; ``wᵢ = 0`` leaves
    image i out of this head exactly; a batch with no weight left gives 0. ``smoothing[i] = ε``
    smooths image i's target: ``ℓᵢ = (1 − ε)·CE + ε·mean over classes of −log p``."""
    per = F.cross_entropy(logits, target, reduction="none")
    if smoothing is not None:
        eps = smoothing.to(per.dtype)
        per = (1 - eps) * per - eps * torch.log_softmax(logits, dim=-1).mean(dim=-1)
    cw = class_weight[target] if class_weight is not None else torch.ones_like(per)
    w = sample_weight.to(per.dtype) * cw
    return (w * per).sum() / w.sum().clamp_min(1e-12)


def train_classifier(
    model: MultiTaskClassifier,
    images: np.ndarray,
    labels: np.ndarray,
    task_names: Sequence[str],
    *,
    counts: Sequence[Sequence[int]],
    steps: int | None = None,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    beta: float = 0.999,
    use_sampler: bool = False,
    class_weighted_loss: bool = True,
    augment: bool = True,
    hflip: bool = False,
    warmup_steps: int | None = None,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "auto",
    val: tuple[np.ndarray, np.ndarray] | None = None,
    eval_every: int | None = None,
    patience: int | None = None,
    epochs: int | None = None,
    progress: ProgressFn = null_progress,
    sample_task_weights: np.ndarray | None = None,
    sample_label_smoothing: np.ndarray | None = None,
) -> tuple[MultiTaskClassifier, dict[str, Any]]:
    """Train ``model`` in place for ``steps`` optimizer steps; return ``(model, history)`` in eval mode.

    **Budget in steps.** Batches of ``batch_size`` are drawn continuously until ``steps`` steps are
    done, whatever the number of images: runs with more (synthetic) images train exactly as many
    steps. With ``use_sampler`` each batch is drawn with replacement, image probability ∝
    :func:`sample_weights`; otherwise from a stream of random permutations. (``epochs`` is the
    deprecated budget of earlier versions: ``steps = steps_for(epochs, N, batch_size)``; give one.)

    **Class weights.** ``counts[t]`` are the class counts of task ``task_names[t]`` that set the
    effective-number class weights of the loss and of the sampler. They need not come from
    ``labels``: pass the real training counts when synthetic images are mixed in, so that the ratio
    does not change the weighting. A class that occurs in ``labels`` with count 0 gets the weight of
    the task's rarest counted class (:func:`weighting_counts`).
    Loss: sum over tasks of the cross-entropy, each with that task's effective-number class weights
    when ``class_weighted_loss``. AdamW (no decay on 1-D parameters); learning rate: linear warmup
    over ``warmup_steps`` (default 3% of ``steps``), then cosine to 0 at ``steps``.
    ``augment``: random-resized crop (area 0.8–1) and, when ``hflip``, horizontal flips: only for
    images whose labels survive mirroring (vessels, glazes); never for digits or text (on digits,
    flips cost 0.08 digit macro-F1).

    **Model selection.** With ``val = (images, labels)`` (real images only), the mean over tasks of
    the macro-F1 on val is computed every ``eval_every`` steps (default ``ceil(steps / 20)``) and at
    the last step; the best state (first of ties) is kept on the CPU and restored at the end.
    ``patience``: stop after that many evaluations in a row without improvement (``None``: never).

    Channels-last memory on CPU and GPU. GPU: autocast in ``dtype`` (bf16/fp16, see
    :mod:`porcelain.device`), a grad scaler for fp16; a uint8 training set up to
    ``GPU_RESIDENT_BYTES`` is moved to the GPU once, a larger one is copied per batch through pinned memory.

    Deterministic for a given ``seed`` on CPU; torch's global RNG is not used.
    A NaN/inf loss raises :class:`NonFiniteLossError` at once, naming the step.

    ``history``: ``steps`` (steps done), ``budget`` (steps asked), ``stopped_early``,
    ``selected_step`` (the step whose weights the model holds), ``best_val_macro_f1`` (``None``
    without val), ``val_curve`` (``[{"step", "mean_macro_f1", "per_task": {task: f1}}]``),
    ``step_loss`` / ``lr_per_step`` per step; ``loss`` / ``task_loss[task]`` / ``lr`` as means over
    windows of ``log_every`` steps ending at ``loss_steps``; ``batch_size``, ``warmup_steps``,
    ``eval_every``, ``seconds``, ``images_per_s``, ``device``, ``dtype``.
    """
    labels = _check_inputs(model, images, labels, task_names, counts)
    n = images.shape[0]
    if steps is None and epochs is None:
        raise ValueError("give the training budget as steps= (optimizer steps)")
    if steps is not None and epochs is not None:
        raise ValueError("give steps= or the deprecated epochs=, not both")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if steps is None:
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        steps = steps_for(epochs, n, min(batch_size, n))
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if eval_every is not None and eval_every < 1:
        raise ValueError(f"eval_every must be >= 1, got {eval_every}")
    if patience is not None and patience < 1:
        raise ValueError(f"patience must be >= 1 (evaluations), got {patience}")
    warmup = round(0.03 * steps) if warmup_steps is None else int(warmup_steps)
    if not 0 <= warmup < steps:
        raise ValueError(f"warmup_steps must lie in [0, steps), got {warmup} for {steps} steps")
    if val is not None:
        val_x, val_y = val
        _check_images(val_x, "val images")
        val_y = _check_labels(val_y, counts)
        if len(val_x) != len(val_y) or len(val_x) == 0:
            raise ValueError(f"val needs as many label rows as images (and at least one), got "
                             f"{len(val_x)} and {len(val_y)}")
    every = eval_every or max(1, math.ceil(steps / 20))
    dev = choose_device(device)
    cdtype = choose_dtype(dtype, dev)
    bs = batch_size  # constant whatever N: batches may repeat images when N < batch_size

    w_counts = weighting_counts(labels, counts)
    class_w = [effective_number_weights(c, beta).to(dev) if class_weighted_loss else None for c in w_counts]
    sampler_w = sample_weights(labels, counts, beta) if use_sampler else None

    x_all = torch.from_numpy(np.ascontiguousarray(images))
    y_all = torch.from_numpy(labels)
    w_all = None
    if sample_task_weights is not None:  # e.g. the adaptive sweep arm: synthetic images' loss per task head
        w_np = np.asarray(sample_task_weights, np.float32)
        if w_np.shape != (len(labels), len(task_names)) or not np.isfinite(w_np).all() or (w_np < 0).any():
            raise ValueError(f"sample_task_weights must be finite, >= 0 and N×T = {(len(labels), len(task_names))}, "
                             f"got {w_np.shape}")
        w_all = torch.from_numpy(w_np).to(dev)
    eps_all = None
    if sample_label_smoothing is not None:  # e.g. synthetic images' soft targets
        eps_np = np.asarray(sample_label_smoothing, np.float32)
        if eps_np.shape != (len(labels),) or not ((eps_np >= 0) & (eps_np < 1)).all():
            raise ValueError(f"sample_label_smoothing must be N = {len(labels)} values in [0, 1), got {eps_np.shape}")
        eps_all = torch.from_numpy(eps_np).to(dev)
        if w_all is None:
            w_all = torch.ones((len(labels), len(task_names)), device=dev)
    pin = False
    if dev.type == "cuda":
        if x_all.numel() <= GPU_RESIDENT_BYTES:  # small uint8 datasets live on the GPU: no per-batch copies
            x_all, y_all = x_all.to(dev), y_all.to(dev)
        else:  # large ones are copied batch by batch from pinned memory
            pin = True

    history: dict[str, Any] = {
        "loss": [], "task_loss": {t: [] for t in task_names}, "lr": [], "loss_steps": [], "log_every": every,
        "step_loss": [], "lr_per_step": [], "steps": 0, "budget": int(steps), "batch_size": bs,
        "warmup_steps": warmup, "eval_every": every if val is not None else None, "patience": patience,
        "val_curve": [], "selected_step": None, "best_val_macro_f1": None, "stopped_early": False,
        "device": str(dev), "dtype": str(cdtype).removeprefix("torch."),
    }
    start = time.perf_counter()
    # All randomness comes from this run's own generators, never torch's global RNG, so that runs in
    # parallel threads (a sweep) stay reproducible. (A timm backbone's own dropout or drop-path,
    # off by default, would still use the global RNG.)
    gen = torch.Generator().manual_seed(seed)  # data order and augmentation
    stream = _IndexStream(n, bs, sampler_w, gen)
    model.to(dev)
    set_dropout_generator(model, torch.Generator(device=dev).manual_seed(seed + 1))
    channels_last = dev.type in ("cuda", "cpu")  # CPU: 1.4x faster for small_cnn, neutral for MobileNetV3
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, steps, warmup))
    scaler = grad_scaler(dev, cdtype)
    best_state: dict[str, torch.Tensor] | None = None
    best_score, since_best = -math.inf, 0
    window_loss, window_task, window_lr, window_n = 0.0, [0.0] * len(task_names), 0.0, 0

    def evaluate(step: int) -> bool:
        """Score val at ``step``, keep the best state; True when patience has run out."""
        nonlocal best_state, best_score, since_best
        per_task = evaluate_macro_f1(model, val_x, val_y, task_names, device=str(dev), dtype=dtype)
        score = float(np.mean(list(per_task.values())))
        history["val_curve"].append({"step": step, "mean_macro_f1": score, "per_task": per_task})
        if score > best_score:
            best_score, since_best = score, 0
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            history["selected_step"] = step
        else:
            since_best += 1
        return patience is not None and since_best >= patience

    model.train()
    step = 0
    try:
        while step < steps:
            idx = stream.next()
            xb, yb = x_all[idx.to(x_all.device)], y_all[idx.to(y_all.device)]
            if pin:
                xb, yb = xb.pin_memory(), yb.pin_memory()
            x = model.preprocess(xb)
            y = yb.to(dev, non_blocking=True)
            if augment:
                x = _augment(x, gen, hflip=hflip)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(dev, cdtype):
                logits = model(x)
            if w_all is None:
                task_losses = [
                    F.cross_entropy(logits[task].float(), y[:, t], weight=class_w[t])
                    for t, task in enumerate(task_names)
                ]
            else:
                wb = w_all[idx.to(w_all.device)]
                eb = eps_all[idx.to(eps_all.device)] if eps_all is not None else None
                task_losses = [weighted_task_loss(logits[task].float(), y[:, t], class_w[t], wb[:, t], eb)
                               for t, task in enumerate(task_names)]
            stacked = torch.stack(task_losses)
            loss = stacked.sum()
            *task_values, value = torch.cat([stacked.detach(), loss.detach()[None]]).tolist()  # one sync
            step += 1
            if not math.isfinite(value):
                raise NonFiniteLossError(STAGE, step, value)
            step_lr = optimizer.param_groups[0]["lr"]
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            history["step_loss"].append(value)
            history["lr_per_step"].append(step_lr)
            window_loss += value
            window_lr += step_lr
            window_n += 1
            for t, tv in enumerate(task_values):
                window_task[t] += tv
            stop = False
            if step % every == 0 or step == steps:
                history["loss"].append(window_loss / window_n)
                history["lr"].append(window_lr / window_n)
                history["loss_steps"].append(step)
                for t, task in enumerate(task_names):
                    history["task_loss"][task].append(window_task[t] / window_n)
                window_loss, window_task, window_lr, window_n = 0.0, [0.0] * len(task_names), 0.0, 0
                if val is not None:
                    stop = evaluate(step)
                    model.train()
            info = {"loss": value}
            if history["val_curve"] and history["val_curve"][-1]["step"] == step:
                info["val_f1"] = history["val_curve"][-1]["mean_macro_f1"]
            progress(step, steps, info)
            if stop and step < steps:
                history["stopped_early"] = True
                break
        if window_n:  # stopped early inside a window: close it
            history["loss"].append(window_loss / window_n)
            history["lr"].append(window_lr / window_n)
            history["loss_steps"].append(step)
            for t, task in enumerate(task_names):
                history["task_loss"][task].append(window_task[t] / window_n)
        if best_state is not None:
            model.load_state_dict(best_state)
            history["best_val_macro_f1"] = best_score
        else:
            history["selected_step"] = step
    finally:
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
            x = model.preprocess(images[i:i + batch_size]).contiguous(memory_format=torch.channels_last)
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
