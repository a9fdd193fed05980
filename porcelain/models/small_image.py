"""Backbones for small images (16–64 px) trained from random initialisation, in timm's registry.

Importing this module registers them with timm, so ``timm.create_model(name, num_classes=0)`` builds
them like any timm model (``num_features``, ``forward_features``, ``forward_head``,
``reset_classifier``, a ``pretrained_cfg`` with the normalisation statistics). Nothing here has
published weights: ``pretrained=True`` is an error (local weights go through
:func:`porcelain.models.classifier.create_classifier` ``weights=``).

* ``porcelain_small_cnn`` — a plain CNN: ``len(widths)`` stages of ``depth`` × (3×3 conv → BatchNorm
  → ReLU), a 2×2 max-pool between stages, global average pooling. Widths and depth (an int or one
  per stage) are configurable (``timm.create_model("porcelain_small_cnn", widths=(32, 64, 128), depth=2)``).
  The default, widths (32, 64, 128, 256) with one conv per stage, is the ``small_cnn`` preset of
  :data:`porcelain.models.classifier.PRESETS`: on the digits set (32 px) it beat 3 stages of one conv
  (digit macro-F1 0.93 vs 0.89) and of two convs (0.92, at twice the time).

A low-resolution ResNet (timm's ResNet-10-T, channels 32–256, with a stride-1 stem and no stem
max-pool) was measured too and left out: on digits at 16 px it reached digit macro-F1 0.921 against
the small CNN's 0.937, at 4× the time per run (benchmarks/RESULTS.md, "Classifier on digits").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import register_model
from torch import nn

__all__ = ["SmallCNN", "porcelain_small_cnn"]

# timm passes these to every entrypoint; they concern published weights, which these models lack.
_TIMM_CFG_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _cfg(classifier: str, **kw: Any) -> dict[str, Any]:
    """timm's pretrained_cfg fields that :func:`timm.data.resolve_model_data_config` and weight loading read."""
    return {"num_classes": 0, "input_size": (3, 32, 32), "pool_size": None, "crop_pct": 1.0,
            "interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "first_conv": "stem.0", "classifier": classifier, **kw}


def _no_published_weights(name: str, pretrained: bool, kwargs: dict[str, Any]) -> dict[str, Any]:
    if pretrained:
        raise ValueError(f"{name} has no published weights; pass a local weights file to create_classifier")
    return {k: v for k, v in kwargs.items() if k not in _TIMM_CFG_KWARGS}


class SmallCNN(nn.Module):
    """``widths`` stages of ``depth`` × (conv3×3 → BN → ReLU) (an int, or one per stage), max-pool 2×2
    between stages, global average pooling, linear."""

    def __init__(self, num_classes: int = 0, in_chans: int = 3, widths: Sequence[int] = (32, 64, 128, 256),
                 depth: int | Sequence[int] = 1, drop_rate: float = 0.0, global_pool: str = "avg"):
        super().__init__()
        depths = [int(depth)] * len(widths) if isinstance(depth, int) else [int(d) for d in depth]
        if not widths or any(int(w) < 1 for w in widths) or len(depths) != len(widths) or min(depths) < 1:
            raise ValueError(f"widths must be positive and depth >= 1 (an int or one per stage), got {widths}, {depth}")
        if global_pool != "avg":
            raise ValueError(f"SmallCNN pools by average only, got global_pool={global_pool!r}")
        layers: list[nn.Module] = []
        c = in_chans
        for i, (w, d) in enumerate(zip((int(w) for w in widths), depths)):
            if i:
                layers.append(nn.MaxPool2d(2))
            for _ in range(d):
                layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                c = w
        self.stem = nn.Sequential(*layers)  # named "stem" so pretrained_cfg's first_conv is stem.0
        self.num_features = self.head_hidden_size = c
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc: nn.Module = nn.Linear(c, num_classes) if num_classes else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.pretrained_cfg = self.default_cfg = _cfg("fc", architecture="porcelain_small_cnn")

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x).flatten(1)
        if self.drop_rate:
            x = nn.functional.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def porcelain_small_cnn(pretrained: bool = False, **kwargs: Any) -> SmallCNN:
    """A plain CNN for small images (module docstring): widths (32, 64, 128, 256), depth 1 by default."""
    return SmallCNN(**_no_published_weights("porcelain_small_cnn", pretrained, kwargs))
