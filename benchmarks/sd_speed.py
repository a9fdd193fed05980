"""txt2img throughput: porcelain's batched ``generate`` vs plain diffusers calls (prints a markdown table).

CPU part, on the tiny random pipeline (porcelain.diffusion.tiny; same model, steps, resolution,
guidance and negative prompt for every row):

* plain diffusers, one pipeline call per image (``generator=torch.Generator().manual_seed(seed)``);
* plain diffusers, one call per batch (a list of per-image generators);
* ``porcelain.diffusion.txt2img.generate`` at the same batch size and at a larger one.

CUDA part (only when a GPU is present): a real-size SD 2.1-base UNet built from its config with
random weights, fp16, SDPA attention, channels_last; denoising throughput (UNet calls with
classifier-free guidance) with ``torch.compile`` off and on. Without CUDA it prints that it skipped.

    HF_HUB_OFFLINE=1 python benchmarks/sd_speed.py --images 16 --steps 10 --res 64 --batch 8 --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from porcelain.diffusion.loading import load_pipeline  # noqa: E402
from porcelain.diffusion.tiny import build_tiny_pipeline  # noqa: E402
from porcelain.diffusion.txt2img import generate  # noqa: E402

NEGATIVE = "blurry, low quality"
PROMPTS = ["Ming dynasty, Jingdezhen kiln, Chinese porcelain vase, blue and white",
           "Song dynasty, Longquan kiln, Chinese porcelain bowl, celadon glaze with crackle",
           "Qing dynasty, Jun kiln, Chinese porcelain jar, copper red glaze",
           "Yuan dynasty, Ding kiln, Chinese porcelain plate, plain ivory white glaze"]


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def cpu_rows(args: argparse.Namespace) -> list[tuple[str, int, float, float]]:
    """(method, batch, seconds, images/s) rows on the tiny pipeline."""
    with tempfile.TemporaryDirectory() as d:
        base = build_tiny_pipeline(Path(d) / "tiny")
        pipe = load_pipeline(str(base), device="cpu")
    n, res, steps, g = args.images, args.res, args.steps, args.guidance
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    seeds = list(range(1000, 1000 + n))
    common = dict(num_inference_steps=steps, guidance_scale=g, height=res, width=res, negative_prompt=None,
                  output_type="np")

    def plain_loop():
        out = []
        with torch.inference_mode():
            for p, s in zip(prompts, seeds):
                out.append(pipe(prompt=p, negative_prompt=NEGATIVE, generator=torch.Generator().manual_seed(s),
                                **{k: v for k, v in common.items() if k != "negative_prompt"}).images[0])
        return out

    def plain_batched(bs: int):
        def run():
            out = []
            with torch.inference_mode():
                for i in range(0, n, bs):
                    gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + bs]]
                    out.extend(pipe(prompt=prompts[i : i + bs], negative_prompt=[NEGATIVE] * len(gens),
                                    generator=gens,
                                    **{k: v for k, v in common.items() if k != "negative_prompt"}).images)
            return out
        return run

    def ours(bs: int):
        return lambda: generate(pipe, prompts, seeds, negative_prompt=NEGATIVE, steps=steps, guidance=g,
                                batch_size=bs, lora_scale=1.0, height=res, width=res, output="float")

    rows = []
    # Warm-up (oneDNN primitive caches) with every shape used below.
    plain_loop_small = [pipe(prompt=PROMPTS[0], num_inference_steps=1, height=res, width=res, output_type="np")]
    del plain_loop_small
    ours(args.batch)()
    t_loop, imgs_loop = _timed(plain_loop)
    rows.append(("diffusers pipeline, one call per image", 1, t_loop, n / t_loop))
    t_pb, imgs_pb = _timed(plain_batched(args.batch))
    rows.append(("diffusers pipeline, one call per batch", args.batch, t_pb, n / t_pb))
    for bs in dict.fromkeys([args.batch, args.big_batch]):
        t, imgs = _timed(ours(bs))
        rows.append((f"porcelain `generate` (per-image seeds, OOM backoff)", bs, t, n / t))
        # Same model, seeds and settings: the images agree with the per-image loop.
        diff = float(np.max(np.abs(np.stack(imgs) - np.stack(imgs_loop))))
        if diff > 1e-3:
            print(f"WARNING: generate(batch={bs}) differs from the per-image loop by {diff:.2e}")
    return rows


def cuda_rows(args: argparse.Namespace) -> list[tuple[str, int, float, float]]:
    """Denoising throughput of a real-size SD 2.1-base UNet (random weights), fp16, compile off/on."""
    from diffusers import UNet2DConditionModel

    dev = torch.device("cuda")
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ).to(dev, torch.float16).to(memory_format=torch.channels_last).eval()
    rows = []
    for compiled in (False, True):
        if compiled:
            unet.compile(fullgraph=False)
        for bs in (1, args.batch):
            x = torch.randn(2 * bs, 4, 64, 64, device=dev, dtype=torch.float16).to(memory_format=torch.channels_last)
            e = torch.randn(2 * bs, 77, 1024, device=dev, dtype=torch.float16)
            t = torch.tensor([500] * (2 * bs), device=dev)
            with torch.inference_mode():
                for _ in range(3):
                    unet(x, t, e)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(args.gpu_steps):
                    unet(x, t, e)
                torch.cuda.synchronize()
            sec = time.perf_counter() - t0
            rows.append((f"SD 2.1 UNet 512 px, fp16, SDPA, compile {'on' if compiled else 'off'} "
                         f"({args.gpu_steps} CFG steps)", bs, sec, bs / sec))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--res", type=int, default=64)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--big-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: on a shared machine more threads only spin)")
    ap.add_argument("--gpu-steps", type=int, default=25)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"tiny SD pipeline, CPU ({args.threads} thread(s)), {args.images} images, {args.res} px, "
          f"{args.steps} DDIM steps, guidance {args.guidance}\n")
    rows = cpu_rows(args)
    base = rows[0][3]
    print("| method | batch | seconds | images/s | vs per-image loop |")
    print("|---|---:|---:|---:|---:|")
    for name, bs, sec, ips in rows:
        print(f"| {name} | {bs} | {sec:.2f} | {ips:.2f} | {ips / base:.1f}× |")
    print()
    if torch.cuda.is_available():
        grows = cuda_rows(args)
        print("| CUDA: method | batch | seconds | images/s (denoising only) |")
        print("|---|---:|---:|---:|")
        for name, bs, sec, ips in grows:
            print(f"| {name} | {bs} | {sec:.2f} | {ips:.2f} |")
    else:
        print("CUDA part skipped: no CUDA device on this machine (real-size SD UNet, fp16/SDPA/compile).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
