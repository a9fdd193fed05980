"""Saliency cost for SGD-Mix: Grad-CAM of a classifier against spectral-residual saliency (no
classifier), the two the paper compares; it names saliency cost as its main limitation. Prints a
markdown table (random weights: speed only).

    .venv/bin/python benchmarks/saliency_speed.py [--threads 1] [--images 64]

Grad-CAM runs one forward and one backward pass of the classifier per batch (porcelain's
``gradcam_maps``, hooks on the timm backbone's last feature map); spectral residual is an FFT per
image (``spectral_residual_maps``). Sizes: the digits runs (small_cnn, 32 px) and a museum-sized
setting (the paper's MobileNetV3-Large at 224 px).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from porcelain.augment.saliency import gradcam_maps, spectral_residual_maps
from porcelain.models.classifier import create_classifier


def best_of(fn, k: int = 3) -> float:
    times = []
    for _ in range(k):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--images", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rows = []
    for preset, px in (("small_cnn", 32), ("mobilenetv3_large_100", 224)):
        images = rng.integers(0, 256, (args.images, px, px, 3), dtype=np.uint8)
        classes = rng.integers(0, 4, args.images)
        model = create_classifier(preset, {"kind": 4}, seed=0).eval()
        t = best_of(lambda: gradcam_maps(model, images, 0, classes=classes, batch_size=32), k=2)
        rows.append((f"Grad-CAM, {preset}", px, t))
        t = best_of(lambda: spectral_residual_maps(images))
        rows.append(("spectral residual", px, t))
    print(f"torch threads: {torch.get_num_threads()}, {args.images} images\n")
    print("| saliency | px | seconds | images/s | ms per image |\n|---|---:|---:|---:|---:|")
    for name, px, t in rows:
        print(f"| {name} | {px} | {t:.2f} | {args.images / t:,.0f} | {1000 * t / args.images:.1f} |")


if __name__ == "__main__":
    main()
