"""Stable Diffusion img2img (SDEdit) throughput: porcelain's batched ``img2img`` vs diffusers' plain
``StableDiffusionImg2ImgPipeline`` (prints a markdown table).

On the tiny random pipeline (porcelain.diffusion.tiny), CPU, fp32, in one process, side by side:
the same model (the img2img pipeline is built from the loaded txt2img pipeline's components), source
images, prompts, negative prompt, strength, steps, guidance and resolution in every row.

* diffusers ``StableDiffusionImg2ImgPipeline``, one call per image (``generator`` seeded per image);
* the same pipeline, one call per batch (a list of per-image generators), at ``--batch``;
* ``porcelain.diffusion.img2img.img2img`` at ``--batch`` (per-image seeds, guidance groups, OOM
  backoff), and at batch 1 for reference.

Each method runs ``--repeats`` times, the methods interleaved, and the table gives the median wall
time and the median CPU time of the process (with one thread, CPU time is the work done, steadier
than wall time on a shared machine; images/s and the ratio are from wall time).
The images of the batched porcelain call are checked against its batch-1 call (at most 1 grey level).

    HF_HUB_OFFLINE=1 python benchmarks/sd_img2img_speed.py --images 16 --steps 10 --strength 0.5 --res 64 --batch 8 --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from porcelain.diffusion.img2img import img2img  # noqa: E402
from porcelain.diffusion.loading import load_pipeline  # noqa: E402
from porcelain.diffusion.tiny import build_tiny_pipeline  # noqa: E402
from porcelain.generate.img2img import denoising_steps  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sd_speed import NEGATIVE, PROMPTS  # noqa: E402  (the same prompts as the txt2img benchmark)


def methods(args: argparse.Namespace):
    """{name: (batch, callable returning uint8 images)} on the tiny pipeline."""
    from diffusers import StableDiffusionImg2ImgPipeline

    with tempfile.TemporaryDirectory() as d:
        pipe = load_pipeline(str(build_tiny_pipeline(Path(d) / "tiny")), device="cpu", dtype="fp32")
    plain = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    plain.set_progress_bar_config(disable=True)
    n, res = args.images, args.res
    sources = np.random.default_rng(0).integers(0, 256, (n, res, res, 3), dtype=np.uint8)
    as_float = sources.astype(np.float32) / 255.0  # what diffusers' image processor takes for arrays
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    seeds = list(range(1000, 1000 + n))
    common = dict(strength=args.strength, num_inference_steps=args.steps, guidance_scale=args.guidance,
                  output_type="np")

    def to_uint8(images) -> list[np.ndarray]:
        return [np.clip(np.rint(np.asarray(im) * 255.0), 0, 255).astype(np.uint8) for im in images]

    def diffusers_calls(bs: int):
        def run() -> list[np.ndarray]:
            out: list[np.ndarray] = []
            with torch.inference_mode():
                for i in range(0, n, bs):
                    gens = [torch.Generator().manual_seed(s) for s in seeds[i:i + bs]]
                    out.extend(to_uint8(plain(prompt=prompts[i:i + bs], negative_prompt=[NEGATIVE] * len(gens),
                                              image=as_float[i:i + bs], generator=gens if bs > 1 else gens[0],
                                              **common).images))
            return out
        return run

    def ours(bs: int):
        return lambda: img2img(pipe, sources, prompts, seeds, strength=args.strength, steps=args.steps,
                               guidance=args.guidance, negative_prompt=NEGATIVE, batch_size=bs)

    return {
        "diffusers `StableDiffusionImg2ImgPipeline`, one call per image": (1, diffusers_calls(1)),
        "diffusers `StableDiffusionImg2ImgPipeline`, one call per batch": (args.batch, diffusers_calls(args.batch)),
        "porcelain `diffusion.img2img` (per-image seeds, OOM backoff)": (args.batch, ours(args.batch)),
        "porcelain `diffusion.img2img`, batch 1": (1, ours(1)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--strength", type=float, default=0.5)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--res", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    table = methods(args)
    for _, fn in table.values():  # warm-up: first calls pay for allocations and lazy imports
        fn()
    times: dict[str, list[float]] = {name: [] for name in table}
    cpu: dict[str, list[float]] = {name: [] for name in table}
    outputs: dict[str, list[np.ndarray]] = {}
    for _ in range(args.repeats):
        for name, (_, fn) in table.items():
            t0, c0 = time.perf_counter(), time.process_time()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    names = list(table)
    diff = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(outputs[names[2]], outputs[names[3]]))
    assert diff <= 1, f"batched and batch-1 porcelain img2img differ by {diff} grey levels"
    k = denoising_steps(args.strength, args.steps)
    print(f"\nSD img2img on CPU, tiny random pipeline, {args.threads} thread(s), {args.images} images at {args.res} px, "
          f"strength {args.strength} ({k} of {args.steps} DDIM steps), guidance {args.guidance}, "
          f"median of {args.repeats} runs\n")
    print("| method | batch | seconds | CPU seconds | images/s | vs diffusers per image |")
    print("|---|---:|---:|---:|---:|---:|")
    base = args.images / statistics.median(times[names[0]])
    for name in names:
        sec = statistics.median(times[name])
        ips = args.images / sec
        print(f"| {name} | {table[name][0]} | {sec:.2f} | {statistics.median(cpu[name]):.2f} | {ips:.2f} | "
              f"{ips / base:.2f}× |")
    print(f"\nper-run seconds: " + "; ".join(f"{n.split(',')[0].split(' (')[0]} b{table[n][0]}: "
                                           + ", ".join(f"{t:.2f}" for t in ts) for n, ts in times.items()))


if __name__ == "__main__":
    main()
