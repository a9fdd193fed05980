"""Classifier on the digits set: porcelain's ``train_classifier`` against a plain CNN written here.

Side by side in one process, real images only, on the few-shot long-tailed digits split
(:func:`porcelain.data.digits.load_digits_data`, ~100 train / ~560 val / ~1130 test images):

* ``plain``     — a 3-conv-layer CNN (BatchNorm, global average pooling, three heads) trained by the
                  ~60-line loop below: effective-number class weights, Adam, 600 steps of batch 64,
                  the checkpoint with the best mean val macro-F1 (evaluated every 30 steps);
* ``porcelain`` — ``create_classifier("auto")`` + ``train_classifier`` with the recommended defaults
                  (:data:`PORCELAIN`), val-selected.

Then the built-in sample (1600 procedural images, 32 px, stratified split 70/15/15 by seed 0):
the same porcelain settings against the demo's earlier setting (``tiny`` = mobilenetv3_small_050,
6 epochs, lr 0.005, batch 64, sampler + weighted loss, no val selection).

Prints per-task test macro-F1 (mean and range over runs) and seconds per run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/classifier_digits.py            # full: ~50 min on 2 busy cores
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/classifier_digits.py --quick    # smoke run: ~3 min
    ... --study imbalance --splits 0 1 --seeds 0 1   # sampler / weighted loss / both / neither (~35 min)
    ... --study ablation --splits 0 --seeds 0 1       # backbone, augmentation, lr, warmup (~50 min)
    ... --study size --seeds 0                        # backbone by image size on the sample (~30 min)
    ... --study budget --seeds 0                      # 600 / 300 / 150 steps on the sample (~4 min)

Results and what they decided: benchmarks/RESULTS.md, "Classifier on digits".
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from porcelain.evaluate.metrics import evaluate_predictions  # noqa: E402
from porcelain.models.classifier import PRESETS, create_classifier, resolve_classifier  # noqa: E402
from porcelain.train.classifier import effective_number_weights, macro_f1, predict, train_classifier  # noqa: E402

# The recommended defaults (see the docstring of train_classifier and benchmarks/RESULTS.md).
PORCELAIN: dict[str, Any] = dict(steps=600, batch_size=64, lr=2e-3, weight_decay=1e-4, beta=0.999,
                                 use_sampler=False, class_weighted_loss=True, augment=True)
DEMO_BEFORE: dict[str, Any] = dict(model="tiny", epochs=6, batch_size=64, lr=0.005, weight_decay=1e-4,
                                   use_sampler=True, class_weighted_loss=True, augment=True)


# ---------------------------------------------------------------------------- the plain CNN


class PlainCNN(nn.Module):
    def __init__(self, num_classes: Sequence[int]):
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(*block(3, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2),
                                      *block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleList(nn.Linear(128, n) for n in num_classes)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f = self.features(x)
        return [h(f) for h in self.heads]


def _tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


@torch.no_grad()
def _plain_predict(model: PlainCNN, images: np.ndarray) -> list[np.ndarray]:
    model.eval()
    logits = model(_tensor(images))
    model.train()
    return [lg.argmax(1).numpy() for lg in logits]


def train_plain(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
                num_classes: Sequence[int], seed: int, steps: int = 600, batch: int = 64,
                lr: float = 1e-3, every: int = 30) -> PlainCNN:
    torch.manual_seed(seed)
    model = PlainCNN(num_classes)
    x, y = _tensor(train[0]), torch.from_numpy(train[1])
    weights = [effective_number_weights(np.bincount(train[1][:, t], minlength=n), 0.999)
               for t, n in enumerate(num_classes)]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    best, best_state = -1.0, None
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (batch,))
        logits = model(x[idx])
        loss = sum(nn.functional.cross_entropy(lg, y[idx, t], weight=weights[t]) for t, lg in enumerate(logits))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0:
            preds = _plain_predict(model, val[0])
            score = np.mean([macro_f1(p, val[1][:, t], n) for t, (p, n) in enumerate(zip(preds, num_classes))])
            if score > best:
                best, best_state = score, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return model.eval()


# ---------------------------------------------------------------------------- runs


def _metrics(preds: list[np.ndarray], test_y: np.ndarray, tasks: Sequence[str], num_classes: Sequence[int],
             counts: list[list[int]]) -> dict[str, Any]:
    m = evaluate_predictions(preds, test_y, tasks, num_classes, counts)["per_task"]
    return {t: (m[t]["macro_f1"], m[t]["minority_macro_f1"]) for t in tasks}


def run_plain(data: Any, seed: int, steps: int) -> tuple[dict[str, Any], float]:
    tasks = data.tasks
    num_classes = [len(data.classes[t]) for t in tasks]
    start = time.perf_counter()
    model = train_plain(data.splits["train"], data.splits["val"], num_classes, seed, steps=steps,
                        every=max(1, steps // 20))
    seconds = time.perf_counter() - start
    test_x, test_y = data.splits["test"]
    counts = [np.bincount(data.splits["train"][1][:, t], minlength=n).tolist() for t, n in enumerate(num_classes)]
    return _metrics(_plain_predict(model, test_x), test_y, tasks, num_classes, counts), seconds


def run_porcelain(data: Any, seed: int, settings: dict[str, Any], hflip: bool = True,  # True: the sample
                  model: str = "auto", use_val: bool = True) -> tuple[dict[str, Any], float, dict[str, Any]]:
    tasks = data.tasks
    num_classes = [len(data.classes[t]) for t in tasks]
    train_x, train_y = data.splits["train"]
    counts = [np.bincount(train_y[:, t], minlength=n).tolist() for t, n in enumerate(num_classes)]
    settings = dict(settings)
    name, _ = resolve_classifier(settings.pop("model", model), train_x.shape[1], has_weights=False)
    start = time.perf_counter()
    clf = create_classifier(name, dict(zip(tasks, num_classes)), seed=seed)
    clf, history = train_classifier(clf, train_x, train_y, tasks, counts=counts, seed=seed, device="cpu",
                                    dtype="fp32", hflip=hflip, val=data.splits["val"] if use_val else None,
                                    **settings)
    seconds = time.perf_counter() - start
    test_x, test_y = data.splits["test"]
    preds = predict(clf, test_x, device="cpu", dtype="fp32")
    return _metrics(preds, test_y, tasks, num_classes, counts), seconds, history


class _Sample:
    """The built-in sample as a DigitsData-like object: 1600 images, stratified 70/15/15 split."""

    def __init__(self, n: int = 1600, size: int = 32, seed: int = 0):
        from porcelain.data.sample import CLASSES, TASKS, plan_sample, render

        items = plan_sample(n, seed=seed)
        images = np.stack([render(it.labels, size, it.seed) for it in items])
        labels = np.array([[CLASSES[t].index(it.labels[t]) for t in TASKS] for it in items], dtype=np.int64)
        combo = labels @ (10 ** np.arange(labels.shape[1]))
        rng = np.random.default_rng(seed)
        split = np.empty(n, dtype=np.int64)
        for c in np.unique(combo):
            idx = rng.permutation(np.flatnonzero(combo == c))
            n_tr, n_va = round(0.7 * len(idx)), round(0.15 * len(idx))
            split[idx[:n_tr]], split[idx[n_tr:n_tr + n_va]], split[idx[n_tr + n_va:]] = 0, 1, 2
        self.tasks = TASKS
        self.classes = {t: list(CLASSES[t]) for t in TASKS}
        self.splits = {s: (images[split == i], labels[split == i]) for i, s in enumerate(("train", "val", "test"))}


# Design choices measured on digits split 0, seeds 0 and 1 (--study ablation): name -> (settings, hflip).
PRESETS.setdefault("small_cnn_3x1", ("porcelain_small_cnn", {"widths": (32, 64, 128), "depth": 1}))
PRESETS.setdefault("small_cnn_3x2", ("porcelain_small_cnn", {"widths": (32, 64, 128), "depth": 2}))
PRESETS.setdefault("small_cnn_3x122", ("porcelain_small_cnn", {"widths": (32, 64, 128), "depth": (1, 2, 2)}))
ABLATION: dict[str, tuple[dict[str, Any], bool]] = {
    "default (small_cnn = 4 stages x 1 conv)": ({}, False),
    "3 stages x 1 conv (32-64-128)": ({"model": "small_cnn_3x1"}, False),
    "3 stages x 2 convs": ({"model": "small_cnn_3x2"}, False),
    "3 stages x (1, 2, 2) convs": ({"model": "small_cnn_3x122"}, False),
    "resnet10t (timm, from scratch)": ({"model": "resnet10t"}, False),
    "mobilenetv3_large_100 (from scratch)": ({"model": "mobilenetv3_large_100"}, False),
    "tiny (mobilenetv3_small_050)": ({"model": "tiny"}, False),
    "with horizontal flips": ({}, True),
    "no augmentation": ({"augment": False}, False),
    "lr 0.005": ({"lr": 5e-3}, False),
    "no warmup": ({"warmup_steps": 0}, False),
}
# Backbone by image size on the sample, 300 steps of batch 32, seed 0 (--study size).
SIZES: dict[int, tuple[str, ...]] = {32: ("small_cnn", "resnet10t"), 64: ("small_cnn", "resnet10t"),
                                     96: ("small_cnn", "resnet10t", "mobilenetv3_large_100")}


# ---------------------------------------------------------------------------- tables


def _fmt(values: list[float]) -> str:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return "n/a"
    return f"{v.mean():.3f} ({v.min():.3f}–{v.max():.3f})"


def _table(title: str, tasks: Sequence[str], rows: dict[str, list[tuple[dict[str, Any], float]]],
           minority: bool = False) -> str:
    head = ["method", *[f"{t} macro-F1" for t in tasks]]
    if minority:
        head += [f"{t} minority F1" for t in tasks]
    head += ["s/run", "runs"]
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in rows.items():
        cells = [name] + [_fmt([r[0][t][0] for r in runs]) for t in tasks]
        if minority:
            cells += [_fmt([r[0][t][1] for r in runs]) for t in tasks]
        cells += [f"{np.mean([r[1] for r in runs]):.1f}", str(len(runs))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _loop(label: str, fn: Callable[[], tuple], out: list) -> None:
    result = fn()
    out.append(result[:2])
    scores = " ".join(f"{t}={v[0]:.3f}" for t, v in result[0].items())
    extra = ""
    if len(result) > 2:
        h = result[2]
        extra = f" steps={h['steps']} selected={h['selected_step']} val={h['best_val_macro_f1'] or float('nan'):.3f}"
    print(f"  {label}: {scores} {result[1]:.1f}s{extra}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: one split, one seed, 60 steps, small sample")
    ap.add_argument("--study", choices=("compare", "imbalance", "ablation", "size", "budget"), default="compare",
                    help="compare (default): plain CNN vs porcelain, and the sample; imbalance: sampler/loss "
                         "variants; ablation: design choices on digits (use --splits 0 --seeds 0 1); size: backbone "
                         "by image size; budget: steps 600/300/150 on the sample")
    ap.add_argument("--splits", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--no-sample", action="store_true", help="skip the built-in sample comparison")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from porcelain.data.digits import load_digits_data

    steps = 60 if args.quick else PORCELAIN["steps"]
    splits = args.splits[:1] if args.quick else args.splits
    seeds = args.seeds[:1] if args.quick else args.seeds
    settings = dict(PORCELAIN, steps=steps)
    print(f"porcelain settings: {settings}; auto -> "
          f"{resolve_classifier('auto', args.size, has_weights=False)[1]}", flush=True)
    tables = []
    if args.study == "compare":
        rows: dict[str, list] = {"plain CNN (this script)": [], "porcelain auto (train_classifier)": []}
        for split in splits:
            data = load_digits_data(size=args.size, seed=split)
            tasks = data.tasks
            for seed in seeds:
                _loop(f"digits split {split} seed {seed} plain", lambda: run_plain(data, seed, steps),
                      rows["plain CNN (this script)"])
                _loop(f"digits split {split} seed {seed} porcelain",
                      lambda: run_porcelain(data, seed, settings, hflip=False),
                      rows["porcelain auto (train_classifier)"])
        tables.append(_table(f"digits, {args.size} px, real only, test macro-F1 mean (range) over splits "
                             f"{splits} × seeds {seeds}", tasks, rows))
        if not args.no_sample:
            sample = _Sample(n=400 if args.quick else 1600)
            before = dict(DEMO_BEFORE)
            if args.quick:
                before["epochs"] = 1
            rows = {"demo before (tiny, 6 epochs, lr 0.005, sampler+loss)": [],
                    "porcelain auto, recommended defaults": []}
            for seed in seeds:
                _loop(f"sample seed {seed} before", lambda: run_porcelain(sample, seed, before, use_val=False),
                      rows["demo before (tiny, 6 epochs, lr 0.005, sampler+loss)"])
                _loop(f"sample seed {seed} porcelain", lambda: run_porcelain(sample, seed, settings),
                      rows["porcelain auto, recommended defaults"])
            tables.append(_table(f"built-in sample, {len(sample.splits['train'][0])} train images, 32 px, real only, "
                                 f"seeds {seeds}", sample.tasks, rows))
    elif args.study == "ablation":
        rows = {k: [] for k in ABLATION}
        for split in splits:
            data = load_digits_data(size=args.size, seed=split)
            tasks = data.tasks
            for seed in seeds:
                for name, (extra, hflip) in ABLATION.items():
                    s = dict(settings, **extra)
                    _loop(f"digits split {split} seed {seed} {name}",
                          lambda: run_porcelain(data, seed, s, hflip=hflip), rows[name])
        tables.append(_table(f"design choices on digits, {args.size} px, real only, val-selected, "
                             f"splits {splits} × seeds {seeds}", tasks, rows, minority=True))
    elif args.study == "size":
        size_steps = 30 if args.quick else 300
        for size, models in SIZES.items():
            sample = _Sample(n=400 if args.quick else 1600, size=size)
            rows = {m: [] for m in models}
            for m in models:
                s = dict(settings, steps=size_steps, batch_size=32, model=m)
                _loop(f"sample {size} px {m}", lambda: run_porcelain(sample, seeds[0], s), rows[m])
            tables.append(_table(f"built-in sample at {size} px, {size_steps} steps of batch 32, seed {seeds[0]}",
                                 sample.tasks, rows))
    elif args.study == "budget":
        sample = _Sample(n=400 if args.quick else 1600)
        budgets = (60, 30) if args.quick else (600, 300, 150)
        rows = {f"{b} steps": [] for b in budgets}
        for b in budgets:
            for seed in seeds:
                _loop(f"sample {b} steps seed {seed}", lambda: run_porcelain(sample, seed, dict(settings, steps=b)),
                      rows[f"{b} steps"])
        tables.append(_table(f"step budget on the built-in sample, 32 px, batch 64, seeds {seeds}", sample.tasks, rows))
    else:
        variants = {"sampler only": (True, False), "weighted loss only": (False, True),
                    "both": (True, True), "neither": (False, False)}
        rows = {k: [] for k in variants}
        for split in splits:
            data = load_digits_data(size=args.size, seed=split)
            tasks = data.tasks
            for seed in seeds:
                for name, (sampler, weighted) in variants.items():
                    s = dict(settings, use_sampler=sampler, class_weighted_loss=weighted)
                    _loop(f"digits split {split} seed {seed} {name}",
                          lambda: run_porcelain(data, seed, s, hflip=False), rows[name])
        tables.append(_table(f"imbalance correction on digits, {args.size} px, real only, val-selected, "
                             f"splits {splits} × seeds {seeds}", tasks, rows, minority=True))
    print()
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
