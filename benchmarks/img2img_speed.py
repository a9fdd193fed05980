"""Closed-set img2img (SDEdit) throughput: batched vs one call per image (prints a markdown table).

Random-weight generators from the presets (``tiny``: 16 px, ``small``: 32 px), CPU, fp32, same
images, labels, strength, steps, guidance and seed in every row. "per image" calls
``porcelain.generate.img2img.img2img`` once per image (a one-image array, ``first_index=i``);
"batched" calls it once for all images at ``--batch``. The per-image outputs are checked to equal the
batched ones (up to 1 grey level: per-image seeded noise makes the result batch-size independent).

    HF_HUB_OFFLINE=1 python benchmarks/img2img_speed.py --images 32 --steps 10 --strength 0.5 --batch 32 --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from porcelain.generate.img2img import img2img  # noqa: E402
from porcelain.models.generator import GENERATOR_PRESETS, create_generator  # noqa: E402


def rows(preset: str, args: argparse.Namespace) -> list[tuple[str, str, int, float, float]]:
    """(preset, method, batch, seconds, images/s) for one generator preset."""
    res = GENERATOR_PRESETS[preset].resolution
    model = create_generator(preset, num_classes=[4, 4], resolution=res, seed=0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, res, res, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, (args.images, 2))
    kw = dict(strength=args.strength, steps=args.steps, guidance=args.guidance, seed=0, device="cpu", dtype="fp32")
    img2img(model, images[:2], labels[:2], batch_size=2, **kw)  # warm-up
    t0 = time.perf_counter()
    batched = img2img(model, images, labels, batch_size=args.batch, **kw)
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = np.concatenate([img2img(model, images[i:i + 1], labels[i:i + 1], batch_size=1, first_index=i, **kw)
                             for i in range(args.images)])
    t_single = time.perf_counter() - t0
    diff = int(np.abs(batched.astype(int) - single.astype(int)).max())
    assert diff <= 1, f"per-image and batched results differ by {diff} grey levels"
    n = args.images
    return [(preset, "per image", 1, t_single, n / t_single),
            (preset, "batched", args.batch, t_batched, n / t_batched)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--strength", type=float, default=0.5)
    ap.add_argument("--guidance", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    table = [r for p in args.presets for r in rows(p, args)]
    k = int(np.floor(args.strength * args.steps + 1e-9))
    print(f"\nimg2img (SDEdit) on CPU, {args.threads} thread(s), {args.images} images, strength {args.strength} "
          f"({k} of {args.steps} DDIM steps), guidance {args.guidance}, random weights\n")
    print("| generator | method | batch | seconds | images/s | speed-up |")
    print("|---|---|---:|---:|---:|---:|")
    for i, (preset, method, batch, sec, ips) in enumerate(table):
        base = table[i - (i % 2)][4]
        print(f"| {preset} ({GENERATOR_PRESETS[preset].resolution} px) | {method} | {batch} | {sec:.2f} | "
              f"{ips:.1f} | {ips / base:.1f}× |")


if __name__ == "__main__":
    main()
