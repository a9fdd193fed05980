"""Saliency cost for SGD-Mix: Grad-CAM of a classifier against spectral-residual saliency (no
classifier), the two the paper compares; it names saliency cost as its main limitation. Prints a
markdown table (random weights: speed only).

    .venv/bin/python benchmarks/saliency_speed.py [--threads 1] [--images 64]

A second table: how well the Otsu masks of spectral maps cover the object where it is known (dark
strokes of the digits scans; the vessel of the sample's renders, `sample.vessel_mask`):
recall (share of the object inside the mask), precision (share of the mask on the object) and the
object's share of the image (the precision of a mask placed at random).

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

from porcelain.augment.masks import foreground_mask
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
    print("\n| spectral masks on | images | recall | precision | object share |\n|---|---:|---:|---:|---:|")
    for name, images, objects in known_objects():
        masks = np.stack([foreground_mask(m) for m in spectral_residual_maps(images)])
        hit = (masks & objects).sum((1, 2))
        recall = (hit / np.maximum(objects.sum((1, 2)), 1)).mean()
        precision = (hit / np.maximum(masks.sum((1, 2)), 1)).mean()
        print(f"| {name} | {len(images)} | {recall:.2f} | {precision:.2f} | {objects.mean():.2f} |")


def known_objects() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Images whose object is known: digits train scans (dark strokes) and sample renders (the vessel)."""
    from porcelain.data import sample
    from porcelain.data.digits import load_digits_data

    digits = load_digits_data(size=32, seed=0).splits["train"][0]
    items = list(sample.plan_sample(300, 0))
    vessels = np.stack([sample.render(it.labels, 32, it.seed) for it in items])
    body = np.stack([sample.vessel_mask(it.labels, 32, it.seed) for it in items])
    return [("digits train scans, 32 px", digits, digits[..., 0] < 128), ("sample renders, 32 px", vessels, body)]


if __name__ == "__main__":
    main()
