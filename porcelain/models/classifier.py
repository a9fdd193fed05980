"""The multi-task classifier: a timm backbone, one linear head per task.

Backbones (:data:`PRESETS`, or any timm model name):

* ``mobilenetv3_large_100`` — the porcelain paper's choice, for photographs with pretrained
  (ImageNet) weights;
* ``small_cnn`` — a plain CNN for small images trained from scratch (:mod:`porcelain.models.small_image`);
* ``resnet10t`` — timm's ResNet-10-T (stride-2 stem and max-pool), for larger images without weights;
* ``tiny`` — ``mobilenetv3_small_050``, for fast tests.

``"auto"`` (:func:`resolve_classifier`) picks one from the image size and whether weights are given.
The backbone comes from timm with ``pretrained=False`` (nothing is ever downloaded); ImageNet
weights, when wanted, are a local file given by the user (:func:`create_classifier` ``weights=``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

import porcelain.models.small_image  # noqa: F401  (registers porcelain_small_cnn with timm)
from porcelain.errors import WeightsError
from porcelain.models.weights import load_pretrained_backbone

# Model initialisation draws from torch's global RNG; the lock keeps seeded initialisations of
# classifiers created at once in several threads (a concurrent sweep) apart.
_INIT_LOCK = threading.Lock()


class SeededDropout(nn.Dropout):
    """``nn.Dropout`` that draws its masks from ``self.generator`` when one is set.

    Training runs that share a process (tasks of a sweep in threads) would otherwise interleave
    draws from torch's global RNG and stop being reproducible.
    """

    generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or self.generator is None:
            return super().forward(x)
        keep = torch.rand(x.shape, generator=self.generator, device=self.generator.device) >= self.p
        return x * keep.to(device=x.device, dtype=x.dtype) / (1.0 - self.p)


def set_dropout_generator(model: nn.Module, generator: torch.Generator | None) -> None:
    """Make every :class:`SeededDropout` in ``model`` draw from ``generator`` (``None``: global RNG)."""
    for m in model.modules():
        if isinstance(m, SeededDropout):
            m.generator = generator


# name -> (timm architecture, extra timm kwargs). "tiny" keeps tests fast (0.57M backbone parameters).
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "mobilenetv3_large_100": ("mobilenetv3_large_100", {}),  # the paper's default, with pretrained weights
    "small_cnn": ("porcelain_small_cnn", {"widths": (32, 64, 128, 256), "depth": 1}),
    "resnet10t": ("resnet10t", {}),  # images over SMALL_IMAGE_MAX_PX px without weights
    "tiny": ("mobilenetv3_small_050", {}),
}
DEFAULT_MODEL = "mobilenetv3_large_100"
AUTO = "auto"
SMALL_IMAGE_MAX_PX = 32
"""``auto`` without weights picks ``small_cnn`` up to this image size, ``resnet10t`` above it."""


def resolve_classifier(name: str, image_size: int, has_weights: bool) -> tuple[str, str]:
    """``(preset or timm name, reason)`` for the classifier ``name``; ``"auto"`` chooses:

    * weights given → ``mobilenetv3_large_100`` (the porcelain paper's backbone, fine-tuned);
    * no weights, ``image_size <= SMALL_IMAGE_MAX_PX`` (32) → ``small_cnn``: on digits at 32 px
      (600 steps) digit macro-F1 0.93, as ``resnet10t`` (0.93) at a third of its time per step, against 0.81 for
      MobileNetV3-Large from random initialisation;
    * no weights, larger images → ``resnet10t`` (timm's ResNet-10-T from scratch): on the built-in
      sample (300 steps) it beat ``small_cnn``, whose receptive field (~31 px) misses the vessel
      silhouette, at 64 px (type macro-F1 0.95 vs 0.88) and at 96 px (0.97 vs 0.78; MobileNetV3-Large
      from scratch 0.93), at 1.4–1.7× the time.

    Any other name is returned as it is (after checking that it exists), with reason "asked for".
    """
    if name != AUTO:
        if name not in PRESETS and not timm.is_model(name):
            raise ValueError(f"unknown classifier {name!r}; presets: {', '.join(PRESETS)}, auto "
                             f"(or any timm model name)")
        return name, f"{name}: asked for"
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if has_weights:
        return "mobilenetv3_large_100", (
            "auto: pretrained weights given -> mobilenetv3_large_100 (the porcelain paper's backbone, fine-tuned)")
    if image_size <= SMALL_IMAGE_MAX_PX:
        return "small_cnn", (
            f"auto: {image_size} px images, no pretrained weights -> small_cnn (measured from scratch on digits at "
            f"32 px: digit macro-F1 0.93, as resnet10t at a third of its time; MobileNetV3-Large 0.81)")
    return "resnet10t", (
        f"auto: {image_size} px images, no pretrained weights -> resnet10t (measured from scratch on the sample at "
        f"64 and 96 px: beat small_cnn and MobileNetV3-Large; give ImageNet weights to use mobilenetv3_large_100)")


def preprocess(
    images: np.ndarray | torch.Tensor,
    mean: torch.Tensor | tuple[float, float, float],
    std: torch.Tensor | tuple[float, float, float],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """uint8 N×H×W×3 (numpy or tensor) -> float32 N×3×H×W, scaled to [0, 1] then normalised."""
    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 images N×H×W×3, got {tuple(x.shape)} {x.dtype}")
    if device is not None:
        x = x.to(device, non_blocking=True)
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    return (x - mean_t) / std_t


def head_key(task: str) -> str:
    """The key of a task's head in :attr:`MultiTaskClassifier.heads` (``heads.task_<name>.*`` in state dicts)."""
    return f"task_{task}"


class MultiTaskClassifier(nn.Module):
    """A shared backbone and one ``Dropout -> Linear`` head per task; ``forward`` returns ``{task: logits}``.

    ``heads`` is an ``nn.ModuleDict`` keyed by :func:`head_key` (``"task_<name>"``); ``task_names``
    keeps the task order and ``num_classes`` the class count per task.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: Mapping[str, int],
        drop_rate: float = 0.2,
        mean: tuple[float, float, float] = timm.data.IMAGENET_DEFAULT_MEAN,
        std: tuple[float, float, float] = timm.data.IMAGENET_DEFAULT_STD,
        feature_dim: int | None = None,
    ):
        super().__init__()
        if not num_classes:
            raise ValueError("num_classes must name at least one task")
        for task, n in num_classes.items():
            if not task or "." in task:
                raise ValueError(f"task name {task!r} must be non-empty and contain no '.'")
            if int(n) < 2:
                raise ValueError(f"task {task!r} needs at least 2 classes, got {n}")
        self.backbone = backbone
        dim = feature_dim or int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)
        self.feature_dim = dim
        # Keys are "task_<name>": a bare task name may clash with nn.Module attributes ("type", "train").
        self.heads = nn.ModuleDict(
            {head_key(task): nn.Sequential(SeededDropout(drop_rate), nn.Linear(dim, int(n)))
             for task, n in num_classes.items()}
        )
        self.num_classes = {task: int(n) for task, n in num_classes.items()}
        self.task_names: tuple[str, ...] = tuple(num_classes)
        # Non-persistent: they follow .to(device) but stay out of the saved weights.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)

    def preprocess(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 N×H×W×3 -> normalised float32 N×3×H×W on the model's device."""
        return preprocess(images, self.mean, self.std, device=self.mean.device)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(x)
        return {task: self.heads[head_key(task)](features) for task in self.task_names}


def _classifier_prefixes(backbone: nn.Module) -> tuple[str, ...]:
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or "classifier"
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{n}." for n in names)


def load_backbone_weights(backbone: nn.Module, state: Mapping[str, torch.Tensor], where: str = "weights") -> None:
    """Load ``state`` into a timm backbone: strict, except that ImageNet classifier-head keys are ignored
    and missing BatchNorm ``num_batches_tracked`` counters are tolerated (raises :class:`WeightsError`).

    A state dict saved from a whole :class:`MultiTaskClassifier` is accepted too: its ``backbone.``
    prefix is stripped and its ``heads.`` are ignored (the heads are task-specific).
    """
    state = dict(state)
    if any(k.startswith("backbone.") for k in state) and all(k.startswith(("backbone.", "heads.")) for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    head_prefixes = _classifier_prefixes(backbone)
    state = {k: v for k, v in state.items() if not k.startswith(head_prefixes)}
    expected = backbone.state_dict()
    # BatchNorm's num_batches_tracked is bookkeeping that many published checkpoints omit.
    missing = sorted(k for k in set(expected) - set(state) if not k.endswith(".num_batches_tracked"))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong_shape:
        arch = getattr(backbone, "default_cfg", {}).get("architecture", type(backbone).__name__)

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f", … ({len(keys)} in all)" if len(keys) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if wrong_shape:
            parts.append(
                "shape mismatch: "
                + show([f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong_shape])
            )
        raise WeightsError(
            f"{where} do not fit the {arch} backbone ({'; '.join(parts)}); "
            f"are they weights for a different architecture?"
        )
    backbone.load_state_dict(state, strict=False)  # everything but num_batches_tracked was checked above


def create_classifier(
    name: str = DEFAULT_MODEL,
    num_classes: Mapping[str, int] | None = None,
    weights: str | os.PathLike | None = None,
    drop_rate: float = 0.2,
    *,
    seed: int | None = None,
    image_size: int | None = None,
) -> MultiTaskClassifier:
    """A :class:`MultiTaskClassifier` for the preset ``name`` (see :data:`PRESETS`) or any timm model name.

    ``weights``: a local backbone weights file (safetensors, or ``.pth``/``.bin`` read with
    ``torch.load(weights_only=True)``); keys must match the backbone exactly apart from the
    ImageNet classifier head. ``seed``: initialise deterministically without touching the global RNG.
    ``name="auto"`` needs ``image_size`` and is resolved by :func:`resolve_classifier`.
    """
    if not num_classes:
        raise ValueError("num_classes is required, e.g. {'dynasty': 4, 'kiln': 4}")
    if name == AUTO:
        if image_size is None:
            raise ValueError("classifier 'auto' needs image_size= to choose a backbone")
        name, _ = resolve_classifier(name, image_size, weights is not None)
    if name in PRESETS:
        arch, kwargs = PRESETS[name]
    elif timm.is_model(name):
        arch, kwargs = name, {}
    else:
        raise ValueError(f"unknown classifier {name!r}; presets: {', '.join(PRESETS)}, auto (or any timm model name)")
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        backbone = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
        data_cfg = timm.data.resolve_model_data_config(backbone)
        model = MultiTaskClassifier(
            backbone, num_classes, drop_rate=drop_rate, mean=tuple(data_cfg["mean"]), std=tuple(data_cfg["std"])
        )
    if weights is not None:
        state = load_pretrained_backbone(weights)
        load_backbone_weights(model.backbone, state, where=f"backbone weights {os.fspath(weights)}")
    return model
