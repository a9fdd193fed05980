"""Classifier throughput on this machine: images/s for training and inference, to size the demo.

Runs the real code paths (``train_classifier`` with weighted sampler + augmentation + weighted loss,
and ``predict``) on rendered sample images, a warm-up call first, then ``--steps`` timed batches.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/classifier_speed.py
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/classifier_speed.py --models mobilenetv3_large_100 tiny \
        --threads 1 2 --train-images 500

On a shared CPU, measure 1 thread: with other processes busy, 2 intra-op threads were 5-20x slower
than 1 on the 2-core development machine (OpenMP threads wait for a core that another process holds).

Then prints an estimate for the demo (``--runs`` trainings of ``--train-images`` images for each
epoch count, plus evaluating ``--test-images`` images per run).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from porcelain.data.sample import CLASSES, TASKS, plan_sample, render  # noqa: E402
from porcelain.models.classifier import create_classifier  # noqa: E402
from porcelain.train.classifier import predict, train_classifier  # noqa: E402


def _data(n: int, size: int) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    items = plan_sample(max(n, 20), seed=0)[:n]
    images = np.stack([render(it.labels, size, it.seed) for it in items])
    labels = np.array([[CLASSES[t].index(it.labels[t]) for t in TASKS] for it in items], dtype=np.int64)
    counts = [np.maximum(np.bincount(labels[:, t], minlength=len(CLASSES[task])), 1).tolist()
              for t, task in enumerate(TASKS)]
    return images, labels, counts


def measure(model_name: str, size: int, batch: int, steps: int) -> tuple[float, float]:
    """(training images/s, inference images/s) for one model and image size."""
    num_classes = {t: len(CLASSES[t]) for t in TASKS}
    images, labels, counts = _data(batch * steps, size)
    model = create_classifier(model_name, num_classes, seed=0)
    kw = dict(counts=counts, batch_size=batch, lr=1e-3, seed=0, device="cpu", dtype="fp32")
    train_classifier(model, images[:batch], labels[:batch], TASKS, epochs=1, **kw)  # warm-up
    start = time.perf_counter()
    _, history = train_classifier(model, images, labels, TASKS, epochs=1, **kw)
    train_ips = history["steps"] * batch / (time.perf_counter() - start)
    predict(model, images[:batch], batch_size=batch, device="cpu", dtype="fp32")  # warm-up
    start = time.perf_counter()
    predict(model, images, batch_size=batch, device="cpu", dtype="fp32")
    infer_ips = len(images) / (time.perf_counter() - start)
    return train_ips, infer_ips


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mobilenetv3_large_100"])
    p.add_argument("--sizes", nargs="+", type=int, default=[32, 64])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=4, help="timed batches per measurement")
    p.add_argument("--threads", nargs="+", type=int, default=sorted({1, torch.get_num_threads()}),
                   help="intra-op thread counts to measure (default: 1 and torch's default)")
    p.add_argument("--runs", type=int, default=9, help="training runs in the demo (3 ratios x 3 seeds)")
    p.add_argument("--train-images", type=int, default=1000, help="training images per run (real + synthetic)")
    p.add_argument("--test-images", type=int, default=300)
    p.add_argument("--epochs", nargs="+", type=int, default=[3, 5, 10])
    args = p.parse_args()

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, batch {args.batch}, {args.steps} timed steps")
    print(f"{'model':<24}{'px':>4}{'threads':>8}{'train img/s':>13}{'infer img/s':>13}")
    results = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name in args.models:
            for size in args.sizes:
                tr, inf = measure(name, size, args.batch, args.steps)
                results.append((name, size, threads, tr, inf))
                print(f"{name:<24}{size:>4}{threads:>8}{tr:>13.1f}{inf:>13.1f}", flush=True)

    print(f"\ndemo estimate: {args.runs} runs x {args.train_images} training images x E epochs "
          f"+ {args.test_images} test images per run (sequential)")
    print(f"{'model':<24}{'px':>4}{'threads':>8}" + "".join(f"{f'E={e}':>10}" for e in args.epochs))
    for name, size, threads, tr, inf in results:
        cells = "".join(
            f"{args.runs * (e * args.train_images / tr + args.test_images / inf):>9.0f}s" for e in args.epochs
        )
        print(f"{name:<24}{size:>4}{threads:>8}{cells}")


if __name__ == "__main__":
    main()
