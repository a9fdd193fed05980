"""Stage: label faithfulness and memorisation of the generated images.

The stored reference classifier (:mod:`porcelain.evaluate.reference`) classifies every generated
image; faithfulness per task is the share assigned to the value the image was generated for, with
a 95% Wilson interval. It is only as meaningful as the reference is accurate, so a task whose
reference balanced accuracy on real test images is below the floor is reported as **not
measurable** (with the reason), and no pass or fail is drawn from it.

Memorisation: the distance of each generated image to its nearest real train image, against the
same for real test images (real images the generator never saw). Generated images much closer to
the train set than real test images ever are look like copies.

Texture: GLCM contrast and homogeneity of the generated images against real test images, per task
and class, with the two-sample KS statistic (:func:`porcelain.filter.texture.texture_summary`).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from porcelain.config import FaithfulnessConfig, RuntimeConfig
from porcelain.data.ingest import load_split
from porcelain.evaluate.reference import load_reference
from porcelain.evaluate.stats import wilson_interval
from porcelain.filter.texture import texture_summary
from porcelain.generate.shards import load_synthetic
from porcelain.runtime import apply_runtime
from porcelain.storage import Store
from porcelain.train.classifier import predict

# Bins of "real train images of the image's attribute combination".
RARITY_BINS = (("1-2 real", 1, 2), ("3-5 real", 3, 5), ("6-20 real", 6, 20), (">20 real", 21, 10**12))


def _bin(n: int) -> str:
    return next((name for name, lo, hi in RARITY_BINS if lo <= n <= hi), "0 real")


def agreement(pred: list[np.ndarray], labels: np.ndarray, tasks: list[str]) -> dict[str, dict[str, float]]:
    """Per task: ``{"k", "n", "share", "low", "high"}``, the Wilson interval of the agreement share."""
    out = {}
    for t, task in enumerate(tasks):
        k, n = int((pred[t] == labels[:, t]).sum()), int(len(labels))
        share, lo, hi = wilson_interval(k, n)
        out[task] = {"k": k, "n": n, "share": share, "low": lo, "high": hi}
    return out


def nearest_distances(queries: np.ndarray, pool: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Euclidean distance of each query row to its nearest pool row (float32 features N×D), chunked."""
    q = queries.reshape(len(queries), -1).astype(np.float32)
    p = pool.reshape(len(pool), -1).astype(np.float32)
    p_sq = (p * p).sum(1)
    out = np.empty(len(q), np.float32)
    for i in range(0, len(q), chunk):
        b = q[i:i + chunk]
        d2 = (b * b).sum(1)[:, None] + p_sq[None, :] - 2.0 * b @ p.T
        out[i:i + chunk] = np.sqrt(np.maximum(d2.min(1), 0.0))
    return out


def memorisation(generated: np.ndarray, train: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """Pixel-space nearest-train distances of generated vs real test images (pixels scaled to [0, 1],
    distances divided by √D so that they read as a root-mean-square pixel difference).

    ``near_copy_share``: generated images closer to a train image than 99% of real test images are.
    """
    scale = 1.0 / (255.0 * np.sqrt(np.prod(train.shape[1:])))
    g = nearest_distances(generated, train) * scale
    r = nearest_distances(test, train) * scale
    threshold = float(np.quantile(r, 0.01))
    return {"generated_median": float(np.median(g)), "test_median": float(np.median(r)),
            "ratio": float(np.median(g) / max(np.median(r), 1e-12)), "copy_threshold": threshold,
            "near_copy_share": float((g < threshold).mean()), "n_generated": int(len(g)), "n_test": int(len(r))}


def set_quality(model: Any, data: dict[str, Any], synthetic: tuple[np.ndarray, np.ndarray],
                test: tuple[np.ndarray, np.ndarray], floor: tuple[np.ndarray, np.ndarray], floor_split: str,
                ) -> dict[str, Any]:
    """FID and KID of the generated images against real test images, overall and per task value, in
    the reference classifier's feature space, beside the same between two real splits (the floor:
    what two samples of one distribution score at these sizes; FID is biased upwards at small n).

    The floor pairs test with a split the reference did not train on, so that neither side of it
    was fitted by the extractor."""
    from porcelain.evaluate.fid import ClassifierFeatures, distribution_distances

    tasks, classes = data["tasks"], data["classes"]

    def named(y: np.ndarray) -> dict[str, list[str]]:
        return {t: [classes[t][int(v)] for v in y[:, i]] for i, t in enumerate(tasks)}

    extractor = ClassifierFeatures(model, name=f"reference classifier ({model.feature_dim}-d pooled features)")
    (sx, sy), (tx, ty), (fx, fy) = synthetic, test, floor

    def as_dicts(d: dict[str, Any]) -> dict[str, Any]:
        return {"overall": d["overall"].as_dict(),
                "per_value": {t: {v: s.as_dict() for v, s in vals.items()} for t, vals in d["per_value"].items()}}

    return {"extractor": extractor.name, "real": "test", "floor_pair": f"{floor_split} vs test",
            "synthetic": as_dicts(distribution_distances(extractor, tx, named(ty), sx, named(sy))),
            "floor": as_dicts(distribution_distances(extractor, tx, named(ty), fx, named(fy)))}


def measure_faithfulness(store: Store, data: dict[str, Any], shards: list[Any], reference: dict[str, Any],
                         cfg: FaithfulnessConfig, runtime: RuntimeConfig) -> dict[str, Any]:
    """Label faithfulness, memorisation, set-level distance and texture of the images in ``shards``
    (one synthesizer's)."""
    apply_runtime(runtime)
    shards = [s if isinstance(s, dict) else s.model_dump() for s in shards]
    tasks = data["tasks"]
    have: Counter = Counter()
    for ref in shards:  # a filtered shard counts the images its chain kept: those are judged
        have[tuple(ref["combo"])] += ref["n"] if ref.get("kept") is None else len(ref["kept"])
    kept_only = any(ref.get("kept") is not None for ref in shards)
    size = reference["image_size"]
    syn_x, syn_y = load_synthetic(store, shards, dict(have), size)
    judge = {t: {k: reference["test"][t][k] for k in ("balanced_accuracy", "accuracy", "usable")} for t in tasks}
    if not len(syn_x):
        return {"n_images": 0, "faithfulness": {}, "judge": judge, "threshold": cfg.threshold, "passed": None}
    model = load_reference(store, reference)
    pred = predict(model, syn_x, device=runtime.device, dtype=runtime.dtype)
    faith = agreement(pred, syn_y, tasks)
    for t in tasks:
        if not judge[t]["usable"]:
            faith[t]["not_measurable"] = (
                f"the reference classifier's balanced accuracy on real test images is "
                f"{judge[t]['balanced_accuracy']:.1%}, below the floor {reference['floor']:.0%}")
    # How faithful the generator is depends on how many real images its combination had.
    train_x, train_y = load_split(store, data["data_hash"], size, data["n_shards"], "train")
    real_count = Counter(map(tuple, train_y.tolist()))
    rarity = np.array([_bin(real_count[tuple(row)]) for row in syn_y.tolist()])
    by_rarity = {}
    for name in [b[0] for b in RARITY_BINS] + ["0 real"]:
        m = rarity == name
        if m.any():
            by_rarity[name] = {"n": int(m.sum()),
                               "faithfulness": agreement([p[m] for p in pred], syn_y[m], tasks)}
    test_x, test_y = load_split(store, data["data_hash"], size, data["n_shards"], "test")
    measurable = [t for t in tasks if judge[t]["usable"]]
    floor_split = "val" if reference.get("trained_on") == "train" else "train"
    floor_x, floor_y = (train_x, train_y) if floor_split == "train" else \
        load_split(store, data["data_hash"], size, data["n_shards"], "val")
    return {
        "n_images": int(len(syn_x)),
        "kept_only": kept_only,  # judged after the synthesizer's filters: the images the sweep trains on
        "faithfulness": faith,
        "by_rarity": by_rarity,
        "judge": judge,
        "reference": {k: reference[k] for k in ("key", "architecture", "trained_on", "floor", "selected_step")},
        "memorisation": memorisation(syn_x, train_x, test_x),
        "set_quality": set_quality(model, data, (syn_x, syn_y), (test_x, test_y), (floor_x, floor_y), floor_split),
        # GLCM texture of the generated images against real test images, per task and class
        "texture": texture_summary(syn_x, syn_y, test_x, test_y, tasks, data["classes"]),
        "threshold": cfg.threshold,
        "meets_target": {t: faith[t]["share"] >= cfg.threshold for t in measurable},
        # None when some task cannot be judged: no overall pass is claimed from what was not measured.
        "passed": all(faith[t]["share"] >= cfg.threshold for t in measurable) if len(measurable) == len(tasks) else None,
    }
