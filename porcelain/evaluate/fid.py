"""FID and KID of synthetic against real images, overall and per task value, with a real-vs-real floor.

Both come from torchmetrics (:class:`~torchmetrics.image.fid.FrechetInceptionDistance`,
:class:`~torchmetrics.image.kid.KernelInceptionDistance`) with a feature extractor of ours instead
of Inception v3, whose weights torchmetrics would download. The default extractor is the
reference classifier's backbone: its pooled features (what its task heads see), wrapped in
:class:`ClassifierFeatures`, an ``nn.Module`` taking uint8 N×3×H×W as torchmetrics passes it with
``normalize=False``. Numbers from different extractors are not comparable, so every score carries
the extractor's name.

Features are extracted once per image set; the per-value scores feed subsets of those features to
torchmetrics through an identity module (:class:`PrecomputedFeatures`), so each image passes the
network once however many task values it belongs to.

KID's ``subset_size`` adapts to small sets: ``min(1000, n_real, n_synthetic)``; FID and KID need
at least 2 images on each side and are NaN below that.

A real-vs-real floor (:func:`real_floor`, val against test) says what "no difference" looks like
for sets of that size: FID is biased upwards at small n, so a synthetic score should be read
against it, not against 0.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from porcelain.models.classifier import MultiTaskClassifier

KID_MAX_SUBSET = 1000
KID_SUBSETS = 100


class ClassifierFeatures(nn.Module):
    """Pooled backbone features of a :class:`MultiTaskClassifier`: uint8 N×3×H×W → float32 N×D.

    Images are scaled to [0, 1], resized (bilinear, antialiased) to ``image_size`` when given and
    different, and normalised with the classifier's mean/std, as it saw them in training. The
    classifier is put in eval mode (BatchNorm running statistics, no dropout).
    """

    def __init__(self, classifier: MultiTaskClassifier, image_size: int | None = None, name: str | None = None):
        super().__init__()
        self.classifier = classifier.eval()
        self.image_size = image_size
        self.num_features = int(classifier.feature_dim)
        arch = getattr(classifier.backbone, "default_cfg", {}).get("architecture", type(classifier.backbone).__name__)
        self.name = name or f"{arch} pooled features ({self.num_features}-d)"

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 N×3×H×W, got {tuple(x.shape)} {x.dtype}")
        x = x.to(self.classifier.mean.device).float().div_(255.0)
        if self.image_size is not None and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        x = (x - self.classifier.mean.view(1, 3, 1, 1)) / self.classifier.std.view(1, 3, 1, 1)
        return self.classifier.backbone(x).float().flatten(1)


class PrecomputedFeatures(nn.Module):
    """Identity on N×D feature tensors, so that torchmetrics computes FID/KID from features we extracted."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@torch.no_grad()
def extract_features(extractor: nn.Module, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """float64 N×D features of uint8 N×H×W×3 images (passed to ``extractor`` as uint8 N×3×H×W)."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images N×H×W×3, got {images.shape} {images.dtype}")
    out = [extractor(torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).permute(0, 3, 1, 2))
           .double().cpu().numpy() for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, int(getattr(extractor, "num_features", 0))))


def fid_from_features(real: np.ndarray, synthetic: np.ndarray) -> float:
    """torchmetrics FID between two feature sets (NaN when either has fewer than 2 rows)."""
    if len(real) < 2 or len(synthetic) < 2:
        return float("nan")
    metric = FrechetInceptionDistance(feature=PrecomputedFeatures(real.shape[1]), normalize=True)
    metric.update(torch.from_numpy(np.asarray(real, np.float64)), real=True)
    metric.update(torch.from_numpy(np.asarray(synthetic, np.float64)), real=False)
    return float(metric.compute())


def kid_subset_size(n_real: int, n_synthetic: int, max_subset: int = KID_MAX_SUBSET) -> int:
    """``min(max_subset, n_real, n_synthetic)``: KID's subset size for sets of these sizes."""
    return int(min(max_subset, n_real, n_synthetic))


def kid_from_features(real: np.ndarray, synthetic: np.ndarray, subsets: int = KID_SUBSETS,
                      max_subset: int = KID_MAX_SUBSET, seed: int = 0) -> tuple[float, float, int]:
    """torchmetrics KID ``(mean, std over subsets, subset_size)``; NaNs when a side has fewer than 2 rows.

    Subsets are drawn with torch's RNG seeded by ``seed`` inside ``fork_rng`` (the global RNG is untouched).
    """
    m = kid_subset_size(len(real), len(synthetic), max_subset)
    if m < 2:
        return float("nan"), float("nan"), m
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=PrecomputedFeatures(real.shape[1]), subsets=subsets,
                                         subset_size=m, normalize=True)
    metric.update(torch.from_numpy(np.asarray(real, np.float64)), real=True)
    metric.update(torch.from_numpy(np.asarray(synthetic, np.float64)), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std), m


@dataclass(frozen=True)
class DistributionDistance:
    """FID and KID of one pair of sets, with the extractor that defines them."""

    fid: float
    kid_mean: float
    kid_std: float
    kid_subset_size: int
    n_real: int
    n_synthetic: int
    extractor: str

    def as_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def distances_from_features(real: np.ndarray, synthetic: np.ndarray, extractor: str,
                            subsets: int = KID_SUBSETS, seed: int = 0) -> DistributionDistance:
    """:class:`DistributionDistance` of two feature sets."""
    kid, kid_std, m = kid_from_features(real, synthetic, subsets=subsets, seed=seed)
    return DistributionDistance(fid_from_features(real, synthetic), kid, kid_std, m, len(real), len(synthetic),
                                extractor)


def distribution_distances(
    extractor: nn.Module,
    real_images: np.ndarray,
    real_labels: Mapping[str, Sequence[Hashable]],
    synthetic_images: np.ndarray,
    synthetic_labels: Mapping[str, Sequence[Hashable]],
    *,
    subsets: int = KID_SUBSETS,
    seed: int = 0,
    batch_size: int = 128,
) -> dict[str, Any]:
    """FID/KID of ``synthetic_images`` against ``real_images``, overall and per task value.

    Returns ``{"extractor": name, "overall": DistributionDistance, "per_value": {task: {value:
    DistributionDistance}}}``; a value present on one side only gets NaN scores (n = 0 on the other).
    ``extractor``: an ``nn.Module`` on uint8 N×3×H×W (e.g. :class:`ClassifierFeatures`), named by its
    ``name`` attribute (else its class name).
    """
    name = str(getattr(extractor, "name", type(extractor).__name__))
    fr = extract_features(extractor, real_images, batch_size)
    fs = extract_features(extractor, synthetic_images, batch_size)
    per_value: dict[str, dict[Hashable, DistributionDistance]] = {}
    for task in real_labels:
        rl = np.asarray(list(real_labels[task]), dtype=object)
        sl = np.asarray(list(synthetic_labels[task]), dtype=object)
        if len(rl) != len(fr) or len(sl) != len(fs):
            raise ValueError(f"{task}: labels do not match the number of images")
        per_value[task] = {v: distances_from_features(fr[rl == v], fs[sl == v], name, subsets, seed)
                           for v in sorted(set(rl) | set(sl), key=str)}
    return {"extractor": name, "overall": distances_from_features(fr, fs, name, subsets, seed),
            "per_value": per_value}


def real_floor(
    extractor: nn.Module,
    val_images: np.ndarray,
    val_labels: Mapping[str, Sequence[Hashable]],
    test_images: np.ndarray,
    test_labels: Mapping[str, Sequence[Hashable]],
    **kwargs: Any,
) -> dict[str, Any]:
    """The real-vs-real floor: :func:`distribution_distances` of real test images against real val
    images (val as "real", test in the synthetic role) — what two samples of the same distribution score."""
    return distribution_distances(extractor, val_images, val_labels, test_images, test_labels, **kwargs)
