"""Stage: one point of the ratio sweep — train the multi-task classifier on real + synthetic images at
one real:synthetic ratio and one seed, then evaluate it on the real test split."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from porcelain.config import ClassifierConfig, RuntimeConfig
from porcelain.data.ingest import load_split
from porcelain.evaluate.metrics import evaluate_predictions
from porcelain.generate.shards import load_synthetic
from porcelain.generate.targeting import decode_alloc
from porcelain.hashing import config_identity, stable_hash
from porcelain.models.classifier import create_classifier, resolve_classifier
from porcelain.models.weights import weights_bytes
from porcelain.progress import LogProgress
from porcelain.results import ShardRef
from porcelain.runtime import apply_runtime, runtime_identity
from porcelain.storage import Store
from porcelain.train.classifier import predict, train_classifier
from porcelain.versions import stage_identity


def run_key(data_hash: str, ratio: str, seed: int, synthetic: dict[str, Any], cfg: ClassifierConfig,
            runtime: RuntimeConfig, real_fraction: float = 1.0,
            synthetic_task_weights: dict[str, float] | None = None) -> str:
    """From content only: the data, the synthetic images it reads (their shard keys and how many per
    combination), the share of real train images, the classifier settings with ``weights`` as the
    file's sha256, the stage version and the numeric runtime. The synthesizer's display name and the
    ratio's spelling are not in it."""
    shards = sorted(_shard_identity(s) for s in synthetic.get("shards", []))
    ident = {"data": data_hash, "synthetic": {"alloc": synthetic.get("alloc", []), "shards": shards},
             "seed": seed, "classifier": config_identity(cfg), "stage": stage_identity("sweep"),
             "runtime": runtime_identity(runtime)}
    if real_fraction != 1.0:  # (absent for the full real set, so that those keys stay as they were)
        ident["real_fraction"] = float(real_fraction)
    if task_weights_apply(synthetic_task_weights):  # all 1: the same run as the fixed ratio's
        ident["synthetic_task_weights"] = {t: float(w) for t, w in sorted(synthetic_task_weights.items())}
    return stable_hash(ident)


def _shard_identity(s: ShardRef | dict[str, Any]) -> str:
    """A shard as a run reads it: its key, and for a filtered shard which of its images were kept (two
    filter chains over one shard are two training sets)."""
    ref = s if isinstance(s, ShardRef) else ShardRef.model_validate(s)
    return ref.key if ref.kept is None else f"{ref.key}#kept-{stable_hash(sorted(ref.kept), 16)}"


def task_weights_apply(weights: dict[str, float] | None) -> bool:
    return bool(weights) and any(float(w) != 1.0 for w in weights.values())


def real_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a ``fraction`` of the rows, every label combination kept in proportion
    (``ceil(fraction · n)``, so at least one image of each), drawn with ``seed``."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng([seed, 0x5EA1])
    combos, inverse = np.unique(labels, axis=0, return_inverse=True)
    keep = []
    for c in range(len(combos)):
        rows = np.flatnonzero(inverse.reshape(-1) == c)
        keep.append(rng.permutation(rows)[: int(np.ceil(fraction * len(rows) - 1e-9))])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def train_and_evaluate(store: Store, data: dict[str, Any], ratio: str, seed: int, synthetic: dict[str, Any],
                       cfg: ClassifierConfig, runtime: RuntimeConfig, synthesizer: str | None = None,
                       real_fraction: float = 1.0, arm: str | None = None,
                       synthetic_task_weights: dict[str, float] | None = None) -> dict[str, Any]:
    """``synthetic`` is ``{"alloc": [[combo, n], …], "shards": [shard refs]}`` (empty for 100:0), made
    by the synthesizer labelled ``synthesizer`` (None for the real-only baseline).

    Every run trains ``cfg.budget(real train images)`` optimizer steps, whatever its ratio, with class
    weights and sampler weights from the *real* train counts, and keeps the checkpoint with the best
    mean macro-F1 on the real val split. Its test predictions are stored beside its metrics, for the
    report's paired bootstrap. Up to ``runtime.workers`` of these run at once and share the CPU threads.
    """
    apply_runtime(runtime, concurrent=runtime.workers)
    weights = synthetic_task_weights if task_weights_apply(synthetic_task_weights) else None
    key = run_key(data["data_hash"], ratio, seed, synthetic, cfg, runtime, real_fraction, weights)
    out = f"runs/{key}/metrics.json"
    with store.lock(out):
        if not store.exists(out) or "sweep" in runtime.refresh:
            store.write_json(out, _run(store, data, ratio, seed, synthetic, cfg, runtime, key, real_fraction, weights))
    # the run is shared by content; how this run config names it is added here
    return {**store.read_json(out), "ratio": ratio, "synthesizer": synthesizer, "real_fraction": real_fraction,
            "arm": arm or (ratio if synthesizer is None else f"{synthesizer} {ratio}"),
            "synthetic_task_weights": synthetic_task_weights}


def _run(store: Store, data: dict[str, Any], ratio: str, seed: int, synthetic: dict[str, Any],
         cfg: ClassifierConfig, runtime: RuntimeConfig, key: str, real_fraction: float = 1.0,
         synthetic_task_weights: dict[str, float] | None = None) -> dict[str, Any]:
    tasks = data["tasks"]
    num_classes = [len(data["classes"][t]) for t in tasks]
    size, n_shards, h = cfg.image_size, data["n_shards"], data["data_hash"]
    real_x, real_y = load_split(store, h, size, n_shards, "train")
    budget = cfg.budget(len(real_x))  # of the whole real set: a learning-curve point trains as long as the rest
    counts = data["train_counts"]
    if real_fraction < 1.0:
        keep = real_subset(real_y, real_fraction, seed)
        real_x, real_y = real_x[keep], real_y[keep]
        counts = [np.bincount(real_y[:, t], minlength=n).tolist() for t, n in enumerate(num_classes)]
    alloc = decode_alloc(synthetic.get("alloc", []))
    syn_x, syn_y = load_synthetic(store, synthetic.get("shards", []), alloc, size)
    if len(syn_x):
        x, y = np.concatenate([real_x, syn_x]), np.concatenate([real_y, syn_y])
    else:
        x, y = real_x, real_y
    smooth = None
    if cfg.synthetic_label_smoothing > 0 and len(syn_x):  # soft targets for the synthetic images only
        smooth = np.zeros(len(x), np.float32)
        smooth[len(real_x):] = cfg.synthetic_label_smoothing
    sample_w = None
    if synthetic_task_weights:  # real images weigh 1 on every head; synthetic ones as chosen per task
        sample_w = np.ones((len(x), len(tasks)), np.float32)
        sample_w[len(real_x):] = np.asarray([float(synthetic_task_weights.get(t, 1.0)) for t in tasks], np.float32)
    val = load_split(store, h, size, n_shards, "val")
    name, why = resolve_classifier(cfg.model, size, cfg.weights is not None)
    model = create_classifier(name, num_classes=dict(zip(tasks, num_classes)), weights=cfg.weights, seed=seed)
    start = time.monotonic()
    model, history = train_classifier(
        model, x, y, tasks, counts=counts, steps=budget, batch_size=cfg.batch_size, lr=cfg.lr,
        weight_decay=cfg.weight_decay, beta=cfg.beta, use_sampler=cfg.use_sampler,
        class_weighted_loss=cfg.class_weighted_loss, augment=cfg.augment, hflip=cfg.hflip, seed=seed,
        device=runtime.device, dtype=runtime.dtype, val=val if len(val[0]) else None,
        eval_every=cfg.eval_every, patience=cfg.patience, progress=LogProgress(f"classifier {ratio} seed {seed}"),
        sample_task_weights=sample_w, sample_label_smoothing=smooth,
    )
    seconds = time.monotonic() - start
    test_x, test_y = load_split(store, h, size, n_shards, "test")
    preds = predict(model, test_x, batch_size=cfg.batch_size * 2, device=runtime.device, dtype=runtime.dtype)
    metrics = evaluate_predictions(preds, test_y, tasks, num_classes, data["train_counts"])
    # val predictions too: what the adaptive arm chooses its per-task weights from (test stays untouched)
    val_preds = predict(model, val[0], batch_size=cfg.batch_size * 2, device=runtime.device, dtype=runtime.dtype) \
        if len(val[0]) else [np.zeros(0, np.int64) for _ in tasks]
    predictions = store.write_json(f"runs/{key}/predictions.json",
                                   {"tasks": tasks, "test": {t: p.tolist() for t, p in zip(tasks, preds)},
                                    "val": {t: p.tolist() for t, p in zip(tasks, val_preds)}})
    result = {
        "key": key, "ratio": ratio, "seed": seed, "real_fraction": real_fraction,
        "synthetic_task_weights": synthetic_task_weights, "metrics": metrics,
        "predictions": predictions,
        "model": name, "model_reason": why,
        "n_real": int(len(real_x)), "n_synthetic": int(len(syn_x)), "n_test": int(len(test_x)),
        "n_val": int(len(val[0])), "budget": budget, "steps": history["steps"],
        "selected_step": history["selected_step"], "best_val_macro_f1": history["best_val_macro_f1"],
        "stopped_early": history["stopped_early"],
        "seconds": round(seconds, 1), "final_loss": (history.get("step_loss") or [None])[-1],
    }
    if cfg.save_weights:
        result["weights"] = store.write_bytes(f"runs/{key}/classifier.safetensors", weights_bytes(model.state_dict()))
    return result
