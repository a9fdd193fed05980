"""Saliency-guided mixing (SGD-Mix, arXiv 2505.11813): a source's foreground on a target's background.

Steps, each a pure function here:

1. :func:`choose_targets` — for each source image, draw ``n_candidates`` images from a pool (seeded,
   never the source itself) and keep the one whose normalised saliency map is nearest to the
   source's in L2: its salient region lies where the source's does, so the pasted foreground
   covers the target's own object. ``n_candidates = 1`` is a random target.
2. a mask — typically :func:`porcelain.augment.masks.union_mask` of the source's and the target's
   :func:`~porcelain.augment.masks.foreground_mask`, so no part of the target's object stays visible;
3. :func:`mix` — source pixels inside the mask, target pixels outside. The mixed image keeps the
   **source's** labels (:func:`mix_pairs` returns them with per-image provenance).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from porcelain.augment.masks import normalize_map

__all__ = ["MixProvenance", "choose_targets", "mix", "mix_pairs", "mix_provenance"]


def _candidate_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of source ``index``'s candidate draw: independent of the other sources."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) % (1 << 64), int(index)]))


def choose_targets(
    source_maps: np.ndarray,
    pool_maps: np.ndarray,
    *,
    n_candidates: int,
    seed: int,
    source_ids: Sequence[str] | None = None,
    pool_ids: Sequence[str] | None = None,
) -> np.ndarray:
    """Index into the pool of each source's target (int64, one per source map).

    ``source_maps`` ``N×H×W`` and ``pool_maps`` ``M×H×W`` (same ``H×W``) are saliency maps; each is
    min-max normalised before comparing. For source ``i`` the candidates are ``n_candidates``
    distinct pool images drawn with a generator seeded by ``(seed, i)`` (all eligible ones when fewer),
    and the target is the candidate nearest in L2 (the first drawn on ties). A pool image is not
    eligible for source ``i`` when its id equals the source's (``source_ids``/``pool_ids``, both or
    neither; when the pool is the sources themselves pass the same ids twice).
    """
    src = np.asarray(source_maps)
    pool = np.asarray(pool_maps)
    if src.ndim != 3 or pool.ndim != 3 or src.shape[1:] != pool.shape[1:]:
        raise ValueError(f"maps must be N×H×W and M×H×W of one size, got {src.shape} and {pool.shape}")
    if n_candidates < 1:
        raise ValueError(f"n_candidates must be >= 1, got {n_candidates}")
    if (source_ids is None) != (pool_ids is None):
        raise ValueError("give both source_ids and pool_ids, or neither")
    if source_ids is not None and (len(source_ids) != len(src) or len(pool_ids) != len(pool)):
        raise ValueError(f"need one id per map: {len(source_ids)} source ids for {len(src)} maps, "
                         f"{len(pool_ids)} pool ids for {len(pool)} maps")
    src_n = normalize_map(src).reshape(len(src), -1) if len(src) else src.reshape(0, -1)
    pool_n = normalize_map(pool).reshape(len(pool), -1) if len(pool) else pool.reshape(0, -1)
    pool_ids_arr = np.asarray(pool_ids, dtype=object) if pool_ids is not None else None
    out = np.empty(len(src), dtype=np.int64)
    for i in range(len(src)):
        eligible = (np.flatnonzero(pool_ids_arr != source_ids[i]) if pool_ids_arr is not None
                    else np.arange(len(pool)))
        if len(eligible) == 0:
            raise ValueError(f"source {i} has no target: the pool holds no image other than itself")
        cand = _candidate_rng(seed, i).permutation(eligible)[:n_candidates]
        dist = ((pool_n[cand] - src_n[i]) ** 2).sum(axis=1)
        out[i] = cand[int(np.argmin(dist))]
    return out


def mix(source: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Source pixels where ``mask`` is true, target pixels elsewhere.

    ``source`` and ``target``: uint8 ``H×W×C`` (or ``N×H×W×C``) of one shape; ``mask`` boolean
    ``H×W`` (or ``N×H×W``). Returns a new array of the images' dtype and shape.
    """
    source, target, mask = np.asarray(source), np.asarray(target), np.asarray(mask)
    if source.shape != target.shape or source.dtype != target.dtype:
        raise ValueError(f"source and target differ: {source.shape} {source.dtype} vs {target.shape} {target.dtype}")
    if mask.dtype != bool or mask.shape != source.shape[:-1]:
        raise ValueError(f"mask must be boolean of shape {source.shape[:-1]}, got {mask.shape} {mask.dtype}")
    return np.where(mask[..., None], source, target)


@dataclass(frozen=True)
class MixProvenance:
    """Where a mixed image came from: the source (whose labels it keeps), the target (its background),
    and ``mask_area``, the share of its pixels taken from the source (in [0, 1])."""

    source_id: str
    target_id: str
    mask_area: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mix_provenance(source_ids: Sequence[str], target_ids: Sequence[str], masks: np.ndarray) -> list[MixProvenance]:
    """One :class:`MixProvenance` per mixed image (``masks`` boolean ``N×H×W``)."""
    masks = np.asarray(masks)
    if masks.dtype != bool or masks.ndim != 3 or not len(source_ids) == len(target_ids) == len(masks):
        raise ValueError(f"need N source ids, N target ids and boolean masks N×H×W; got {len(source_ids)}, "
                         f"{len(target_ids)}, {masks.shape} {masks.dtype}")
    area = masks.reshape(len(masks), -1).mean(axis=1) if len(masks) else np.zeros(0)
    return [MixProvenance(str(s), str(t), float(a)) for s, t, a in zip(source_ids, target_ids, area)]


def mix_pairs(
    sources: np.ndarray,
    source_labels: np.ndarray,
    targets: np.ndarray,
    masks: np.ndarray,
    *,
    source_ids: Sequence[str],
    target_ids: Sequence[str],
) -> tuple[np.ndarray, np.ndarray, list[MixProvenance]]:
    """Mix ``N`` (source, target) pairs: ``(images, labels, provenance)``.

    ``sources``/``targets`` uint8 ``N×H×W×3`` (the targets already gathered, e.g.
    ``pool[choose_targets(...)]``), ``masks`` boolean ``N×H×W``. The labels are a copy of
    ``source_labels`` (``N×T``): a mixed image is labelled as its source.
    """
    labels = np.array(source_labels, copy=True)
    if len(labels) != len(sources):
        raise ValueError(f"{len(labels)} label rows for {len(sources)} sources")
    return mix(sources, targets, masks), labels, mix_provenance(source_ids, target_ids, masks)
