"""Speed of the filter and evidence blocks on CPU: prints a markdown table.

    .venv/bin/python benchmarks/filters_speed.py [--threads 1]

* CLIP scoring with the tiny random CLIP (:func:`porcelain.evaluate.clip.build_tiny_clip`), 32 px;
* FID + KID (100 subsets) on 500 vs 500 images at 32 px, features extracted by a classifier
  backbone (``small_cnn`` and ``tiny`` presets, random weights: speed only), extraction included;
* memorisation: nearest-train search of 1000 generated against 1000 train images at 32 px (pixels),
  plus the 1000 real test images for the threshold.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from porcelain.evaluate.clip import build_tiny_clip, clip_scores  # noqa: E402
from porcelain.evaluate.fid import ClassifierFeatures, distribution_distances, extract_features  # noqa: E402
from porcelain.filter.memorisation import calibrate, memorisation_filter  # noqa: E402
from porcelain.filter.texture import glcm_features  # noqa: E402
from porcelain.models.classifier import create_classifier  # noqa: E402


def best_of(fn, k: int = 3) -> float:
    best = float("inf")
    for _ in range(k):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rows = []

    model, pre, tok = build_tiny_clip(seed=0)
    imgs = rng.integers(0, 256, (512, 32, 32, 3), dtype=np.uint8)
    texts = [f"a photo of class {i % 8}" for i in range(len(imgs))]
    t = best_of(lambda: clip_scores(model, pre, tok, imgs, texts))
    rows.append(("CLIP scores, tiny CLIP, 512 images 32 px", f"{len(imgs) / t:,.0f} images/s", f"{t:.2f} s"))

    a = rng.integers(0, 256, (500, 32, 32, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (500, 32, 32, 3), dtype=np.uint8)
    labels = {"kind": list(rng.integers(0, 4, 500))}
    for preset in ("small_cnn", "tiny"):
        ex = ClassifierFeatures(create_classifier(preset, {"kind": 4}, seed=0))
        t = best_of(lambda: distribution_distances(ex, a, labels, b, labels), k=1)
        rows.append((f"FID + KID, 500 vs 500, overall + 4 values, {ex.name}", "", f"{t:.2f} s"))

    gen, train, test = (rng.integers(0, 256, (1000, 32, 32, 3), dtype=np.uint8) for _ in range(3))
    t = best_of(lambda: memorisation_filter(gen, train, test))
    rows.append(("memorisation NN search, 1000 (+1000 test) vs 1000 train, 32 px pixels", "", f"{t:.2f} s"))
    # one shard's memorisation step in pixels + reference features: with the real side (test-to-train
    # thresholds, train features) recomputed per shard, as before, and read from the stored calibration
    ex = ClassifierFeatures(create_classifier("small_cnn", {"kind": 4}, seed=0))
    shard = gen[:64]
    big_train = rng.integers(0, 256, (2000, 32, 32, 3), dtype=np.uint8)

    def per_shard_calibration():
        feats = [extract_features(ex, x) for x in (shard, big_train, test)]
        return memorisation_filter(shard, big_train, test, *feats)

    bank = extract_features(ex, big_train)
    cal = calibrate(big_train, test, bank, extract_features(ex, test))
    before = best_of(per_shard_calibration)
    after = best_of(lambda: memorisation_filter(shard, big_train, None, extract_features(ex, shard), bank,
                                                calibration=cal))
    rows.append(("memorisation step, one shard of 64, pixels + small_cnn features, 2000 train / 1000 test: "
                 "real side recomputed per shard (before)", "", f"{before:.2f} s"))
    rows.append(("… real side stored once (`memorisation/`), the shard's own images only (now)",
                 f"{before / after:.0f}× faster", f"{after:.2f} s"))
    t = best_of(lambda: glcm_features(gen))
    rows.append(("GLCM contrast + homogeneity, 1000 images 32 px", f"{1000 / t:,.0f} images/s", f"{t:.2f} s"))

    print(f"torch threads: {torch.get_num_threads()}\n")
    print("| what | rate | time (best of 3; FID: 1 run) |\n|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
