"""Label faithfulness of generated images, measured by an independent "judge" classifier.

The judge is a small multi-head CNN (plain torch, one linear head per task) trained on *real*
images only. :func:`label_faithfulness` is the fraction of generated images that the judge assigns
to the label value they were generated for, per task. It is only meaningful when the judge itself
is accurate on held-out real images (:func:`judge_accuracy`), so report both.

Labels equal to a task's class count ("null": the task was left free when generating) are not
counted for that task.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from porcelain.device import autocast, choose_device, choose_dtype
from porcelain.errors import DataError, NonFiniteLossError
from porcelain.progress import ProgressFn, null_progress

__all__ = ["Judge", "judge_accuracy", "judge_predict", "label_faithfulness", "train_judge"]

STAGE = "faithfulness judge training"


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class Judge(nn.Module):
    """Three conv stages (each halves the resolution), a 2×2 pooled feature, one head per task.

    Input: uint8-range images normalised by :meth:`prepare` (``N×3×H×W`` in [-1, 1]).
    Output: a list of ``N×n_t`` logits, one per task.
    """

    def __init__(self, num_classes: list[int], width: int = 16, dropout: float = 0.2):
        super().__init__()
        self.num_classes = [int(n) for n in num_classes]
        w = width
        self.features = nn.Sequential(_block(3, w), _block(w, 2 * w), _block(2 * w, 4 * w),
                                      nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(dropout))
        self.heads = nn.ModuleList(nn.Linear(16 * w, n) for n in self.num_classes)

    @staticmethod
    def prepare(images: np.ndarray) -> torch.Tensor:
        arr = np.asarray(images)
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise DataError(f"images must be uint8 N×H×W×3, got {arr.dtype} {arr.shape}")
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f = self.features(x)
        return [head(f) for head in self.heads]


def _check_labels(labels: np.ndarray, num_classes: list[int], n: int, *, allow_null: bool) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 2 or y.shape != (n, len(num_classes)):
        raise DataError(f"labels must be {n}×{len(num_classes)}, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"labels must be integers, got {y.dtype}")
    upper = np.asarray(num_classes) + (1 if allow_null else 0)
    if (y < 0).any() or (y >= upper[None, :]).any():
        raise DataError("labels out of range for num_classes " + str(list(num_classes)))
    return y.astype(np.int64)


def _fit(judge: Judge, x_all: torch.Tensor, y_all: torch.Tensor, *, epochs: int, seed: int, batch_size: int,
         lr: float, hflip: bool, dev: torch.device, dt: torch.dtype, progress: ProgressFn) -> None:
    n = len(x_all)
    judge.to(dev).train()
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    per_epoch = math.ceil(n / batch_size)
    total = epochs * per_epoch
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(total, 1), pct_start=0.2)
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        flips = torch.rand(n, generator=gen) < 0.5
        for b in range(per_epoch):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            x = x_all[idx]
            if hflip:
                x = torch.where(flips[idx][:, None, None, None], x.flip(-1), x)
            x, y = x.to(dev), y_all[idx].to(dev)
            with autocast(dev, dt):
                logits = judge(x)
            loss = sum(F.cross_entropy(lg.float(), y[:, t]) for t, lg in enumerate(logits))
            value = float(loss.detach())
            if not math.isfinite(value):
                raise NonFiniteLossError(STAGE, step, value)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            progress(step, total, {"loss": value})


def train_judge(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: list[int],
    *,
    epochs: int = 10,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 3e-3,
    width: int = 16,
    hflip: bool = True,
    device: str = "auto",
    dtype: str = "auto",
    progress: ProgressFn = null_progress,
) -> Judge:
    """Train a judge on real uint8 images (N×H×W×3) and int64 labels (N×T); deterministic in ``seed``.

    AdamW with a one-cycle LR schedule, random horizontal flips, summed per-task cross-entropy.
    Returns the judge in eval mode on ``device``.
    """
    x_all = Judge.prepare(images)
    y_all = torch.from_numpy(_check_labels(labels, num_classes, len(x_all), allow_null=False))
    n = len(x_all)
    if n == 0:
        raise DataError("no images to train the judge on")
    dev = choose_device(device)
    dt = choose_dtype(dtype, dev)
    # Initialisation and dropout draw from torch's global RNG: seed it, without disturbing the caller's.
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        judge = Judge(num_classes, width=width)
        _fit(judge, x_all, y_all, epochs=epochs, seed=seed, batch_size=batch_size, lr=lr, hflip=hflip,
             dev=dev, dt=dt, progress=progress)
    return judge.eval()


@torch.no_grad()
def judge_predict(judge: Judge, images: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """The judge's predicted class per task: int64 ``N×T``."""
    x_all = Judge.prepare(images)
    dev = next(judge.parameters()).device
    was_training = judge.training
    judge.eval()
    out = []
    for b in range(0, len(x_all), batch_size):
        logits = judge(x_all[b:b + batch_size].to(dev))
        out.append(torch.stack([lg.argmax(1) for lg in logits], 1).cpu())
    judge.train(was_training)
    if not out:
        return np.zeros((0, len(judge.num_classes)), dtype=np.int64)
    return torch.cat(out).numpy().astype(np.int64)


def _agreement(judge: Judge, images: np.ndarray, labels: np.ndarray, *, allow_null: bool) -> dict[int, float]:
    y = _check_labels(labels, judge.num_classes, len(images), allow_null=allow_null)
    pred = judge_predict(judge, images)
    result: dict[int, float] = {}
    for t, n_t in enumerate(judge.num_classes):
        keep = y[:, t] != n_t  # null labels (only possible when allow_null) are not counted
        result[t] = float((pred[keep, t] == y[keep, t]).mean()) if keep.any() else float("nan")
    return result


def judge_accuracy(judge: Judge, images: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """Per-task accuracy of the judge on real, labelled images: ``{task_index: accuracy}``."""
    return _agreement(judge, images, labels, allow_null=False)


def label_faithfulness(judge: Judge, images: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """Per task, the fraction of generated ``images`` the judge assigns to their conditioned label.

    ``labels`` are the labels the images were generated for; null entries (value ``n_t``) are skipped
    (NaN for a task whose labels are all null).
    """
    return _agreement(judge, images, labels, allow_null=True)
