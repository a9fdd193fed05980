"""Stage: the reference classifier — one validated classifier per dataset, trained on real images only.

It judges label faithfulness (and, later, gives Grad-CAM saliency maps and filters generated images),
so it must be shown to work before anything is drawn from it: the stage stores its weights
(safetensors) with a JSON *card* — architecture, data hash, what it trained on, the step it was
selected at, and per task its accuracy, balanced accuracy and per-class recall on the real test
split. A task whose balanced accuracy is below ``floor`` is marked unusable: faithfulness for it is
"not measurable", never a number presented as a pass.

By default it trains on the val split only (``train_on="val"``): images the generator never saw, so
a generated copy of a training image is judged like any other image rather than recognised. A
slice of val (``holdout``) is held out for early stopping either way.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from porcelain.config import ReferenceConfig, RuntimeConfig
from porcelain.data.ingest import load_split, splits_digest
from porcelain.errors import DataError
from porcelain.evaluate.stats import metric_values
from porcelain.hashing import code_version, config_identity, stable_hash
from porcelain.models.classifier import MultiTaskClassifier, create_classifier, resolve_classifier
from porcelain.models.weights import load_weights, weights_bytes
from porcelain.progress import LogProgress
from porcelain.runtime import apply_runtime, runtime_identity
from porcelain.storage import Store
from porcelain.train.classifier import predict, train_classifier
from porcelain.versions import stage_identity


def holdout_mask(labels: np.ndarray, share: float, seed: int) -> np.ndarray:
    """Boolean mask of the early-stopping slice: ``share`` of each label combination (seeded).

    Combinations with a single image stay in the fitting part; every combination with two or more
    images gives at least one image to the slice, so early stopping sees the rare ones too.
    """
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    combos = {}
    for i, row in enumerate(map(tuple, np.asarray(labels).tolist())):
        combos.setdefault(row, []).append(i)
    for idx in combos.values():
        if len(idx) < 2:
            continue
        take = max(1, int(round(share * len(idx))))
        mask[rng.permutation(idx)[:take]] = True
    return mask


def reference_splits(cfg: ReferenceConfig) -> tuple[str, ...]:
    """The splits the reference reads: those it is fitted on and the test split its card is measured on."""
    return ("train", "val", "test") if cfg.train_on == "train+val" else ("val", "test")


def reference_key(inputs: str, cfg: ReferenceConfig, image_size: int, runtime: RuntimeConfig) -> str:
    """From what the reference reads (``inputs``: :func:`~porcelain.data.ingest.splits_digest` of its
    splits, so new train images do not retrain a reference fitted on val), the settings (``weights``
    by content), the stage version and the numeric runtime."""
    return stable_hash({"data": inputs, "reference": config_identity(cfg), "size": image_size,
                        "stage": stage_identity("reference"), "runtime": runtime_identity(runtime)})


def test_card(pred: list[np.ndarray], labels: np.ndarray, tasks: list[str], classes: dict[str, list[str]],
              floor: float) -> dict[str, Any]:
    """Per task: accuracy, balanced accuracy, per-class recall with support, and whether it can judge."""
    out = {}
    for t, task in enumerate(tasks):
        n_cls = len(classes[task])
        y, p = labels[:, t], pred[t]
        support = np.bincount(y, minlength=n_cls)
        hits = np.bincount(y[p == y], minlength=n_cls)
        recall = [float(h / s) if s else None for h, s in zip(hits, support)]
        bal = float(metric_values(p, y, n_cls, "balanced_accuracy"))
        out[task] = {"accuracy": float((p == y).mean()), "balanced_accuracy": bal,
                     "per_class_recall": dict(zip(classes[task], recall)),
                     "support": dict(zip(classes[task], support.tolist())), "n": int(len(y)),
                     "usable": bal >= floor}
    return out


def train_reference(store: Store, data: dict[str, Any], cfg: ReferenceConfig, image_size: int,
                    runtime: RuntimeConfig) -> dict[str, Any]:
    """Train (or find in the store) the dataset's reference classifier; return its reference and card."""
    apply_runtime(runtime)
    key = reference_key(splits_digest(store, data["data_hash"], reference_splits(cfg)), cfg, image_size, runtime)
    card_key = f"reference/{key}/card.json"
    with store.lock(card_key):
        if not store.exists(card_key) or "reference" in runtime.refresh:
            _train(store, data, cfg, image_size, runtime, key, card_key)
    return store.read_json(card_key)


def _train(store: Store, data: dict[str, Any], cfg: ReferenceConfig, image_size: int, runtime: RuntimeConfig,
           key: str, card_key: str) -> None:
    tasks, classes = data["tasks"], data["classes"]
    num_classes = {t: len(classes[t]) for t in tasks}
    h, n = data["data_hash"], data["n_shards"]
    val_x, val_y = load_split(store, h, image_size, n, "val")
    if len(val_x) < 4:
        raise DataError(f"the reference classifier needs real val images to stop on; the val split has {len(val_x)}: "
                        "raise data.val_fraction (or give the manifest a split column with val rows)")
    stop = holdout_mask(val_y, cfg.holdout, cfg.seed)
    fit_x, fit_y = val_x[~stop], val_y[~stop]
    if cfg.train_on == "train+val":
        tr_x, tr_y = load_split(store, h, image_size, n, "train")
        fit_x, fit_y = np.concatenate([tr_x, fit_x]), np.concatenate([tr_y, fit_y])
    counts = [np.bincount(fit_y[:, t], minlength=num_classes[task]).tolist() for t, task in enumerate(tasks)]
    name, reason = resolve_classifier(cfg.model, image_size, cfg.weights is not None)
    model = create_classifier(name, num_classes=num_classes, weights=cfg.weights, seed=cfg.seed)
    model, history = train_classifier(
        model, fit_x, fit_y, tasks, counts=counts, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
        hflip=cfg.hflip, seed=cfg.seed, device=runtime.device, dtype=runtime.dtype, val=(val_x[stop], val_y[stop]),
        eval_every=cfg.eval_every, patience=cfg.patience, progress=LogProgress("reference classifier"))
    test_x, test_y = load_split(store, h, image_size, n, "test")
    pred = predict(model, test_x, device=runtime.device, dtype=runtime.dtype)
    blob = weights_bytes(model.state_dict())
    sha = hashlib.sha256(blob).hexdigest()
    weights = store.put_object(blob, "safetensors", prefix="weights")  # under its content hash
    card = {
        "key": key, "weights": weights, "weights_sha256": sha, "architecture": name, "why": reason,
        "num_classes": num_classes, "tasks": tasks, "classes": classes, "image_size": image_size,
        "data_hash": h, "trained_on": cfg.train_on, "n_fit": int(len(fit_x)), "n_stop": int(stop.sum()),
        "budget": history["budget"], "steps": history["steps"], "selected_step": history["selected_step"],
        "stopped_early": history["stopped_early"], "best_val_macro_f1": history["best_val_macro_f1"],
        "floor": cfg.floor, "test": test_card(pred, test_y, tasks, classes, cfg.floor),
        "code_version": code_version(),
    }
    store.write_json(card_key, card)  # last: the reference exists once its card does


_LOADED: dict[str, MultiTaskClassifier] = {}


def load_reference(store: Store, card: dict[str, Any]) -> MultiTaskClassifier:
    """The stored reference classifier of ``card``, checked against its recorded sha256."""
    sha = card["weights_sha256"]
    if sha not in _LOADED:
        state, _ = load_weights(store.read_verified(card["weights"], sha))
        # the card's JSON has its keys sorted: the task order (which predict() follows) is card["tasks"]
        model = create_classifier(card["architecture"], num_classes={t: card["num_classes"][t] for t in card["tasks"]})
        model.load_state_dict(state)
        _LOADED.clear()
        _LOADED[sha] = model.eval()
    return _LOADED[sha]
