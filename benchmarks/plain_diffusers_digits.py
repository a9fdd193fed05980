"""Reference row: a plain class-conditional diffusers DDPM on digits, no porcelain generator code.

UNet2DModel on 16 px grayscale, conditioned on the digit only (``num_class_embeds``; index 10 is the
"null" label for classifier-free guidance), epsilon prediction, cosine schedule, EMA, DDIM 25 steps.
The judge is an RBF SVC on 16 px grayscale pixels fitted on the real val split (its accuracy on real
test images is printed beside the faithfulness). ``benchmarks/generator_digits.py`` imports
:func:`train_plain`, :func:`sample_plain` and the judge helpers from here::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/plain_diffusers_digits.py --steps 750 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel  # noqa: E402

JUDGE_SIZE = 16


def to_gray(images: np.ndarray, size: int = JUDGE_SIZE) -> torch.Tensor:
    """uint8 N×H×W(×3) → float N×1×size×size in [-1, 1] (channel mean, area resize)."""
    x = torch.from_numpy(np.asarray(images)).float()
    if x.ndim == 4:
        x = x.mean(-1)
    x = x[:, None] / 127.5 - 1.0
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="area")
    return x


def features(images: np.ndarray) -> np.ndarray:
    """Judge features: 16 px grayscale pixels in [0, 1], flattened."""
    return ((to_gray(images) + 1) / 2).reshape(len(images), -1).numpy()


def fit_judges(val_x: np.ndarray, val_y: np.ndarray):
    """One RBF SVC per task (column of ``val_y``), fitted on real val images."""
    from sklearn.svm import SVC
    f = features(val_x)
    return [SVC(kernel="rbf", C=10.0, gamma="scale").fit(f, val_y[:, t]) for t in range(val_y.shape[1])]


def judge_scores(judges, images: np.ndarray, labels: np.ndarray) -> list[float]:
    """Per task: share of ``images`` the judge assigns to the label in ``labels``."""
    f = features(images)
    return [float(np.mean(j.predict(f) == labels[:, t])) for t, j in enumerate(judges)]


def nearest_l2(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per image of ``x``: pixel L2 distance (16 px gray, [0, 1]) to its nearest image in ``ref``."""
    a, b = torch.from_numpy(features(x)), torch.from_numpy(features(ref))
    return torch.cdist(a, b).min(dim=1).values.numpy()


def make_unet(size: int = 16) -> UNet2DModel:
    return UNet2DModel(
        sample_size=size, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=11, norm_num_groups=8, attention_head_dim=32,
    )


def schedulers():
    kw = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")
    return (DDPMScheduler(**kw),
            DDIMScheduler(**kw, clip_sample=True, set_alpha_to_one=False, timestep_spacing="trailing"))


def train_plain(images: np.ndarray, digits: np.ndarray, *, steps: int = 750, batch: int = 64, lr: float = 2e-3,
                ema: float = 0.995, p_uncond: float = 0.1, seed: int = 0) -> tuple[UNet2DModel, dict]:
    """Train on uint8 images and int digit labels; return the EMA model and ``{"seconds", "loss"}``."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x_all, y_all = to_gray(images), torch.as_tensor(digits).long()
    model = make_unet(x_all.shape[-1])
    ema_model = copy.deepcopy(model).requires_grad_(False)
    noise_sched, _ = schedulers()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    warm = 50
    lam = lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(x_all), (batch,), generator=g)
        x0, y = x_all[idx], y_all[idx]
        y = torch.where(torch.rand(batch, generator=g) < p_uncond, torch.full_like(y, 10), y)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        pred = model(noise_sched.add_noise(x0, noise, t), t, class_labels=y).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        d = min(ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema_model.parameters(), model.parameters()):
                e.lerp_(p, 1 - d)
        losses.append(loss.item())
    return ema_model.eval(), {"seconds": time.perf_counter() - start, "loss": losses}


@torch.no_grad()
def sample_plain(model: UNet2DModel, digits: np.ndarray, *, steps: int = 25, guidance: float = 1.0,
                 seed: int = 1) -> np.ndarray:
    """DDIM with classifier-free guidance ``eps_c + w (eps_c - eps_u)``; uint8 N×16×16 grayscale."""
    _, ddim = schedulers()
    ddim.set_timesteps(steps)
    y = torch.as_tensor(digits).long()
    size = model.config.sample_size
    x = torch.randn((len(y), 1, size, size), generator=torch.Generator().manual_seed(seed))
    null = torch.full_like(y, 10)
    for t in ddim.timesteps:
        tt = torch.full((len(y),), int(t))
        eps_c, eps_u = model(torch.cat([x, x]), torch.cat([tt, tt]), class_labels=torch.cat([y, null])).sample.chunk(2)
        x = ddim.step(eps_c + guidance * (eps_c - eps_u), t, x, eta=0.0).prev_sample
    return ((x[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from porcelain.data.digits import load_digits_data

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=750)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--per-digit", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_digits_data(seed=args.seed)
    (tx, ty), (vx, vy), (sx, sy) = (data.splits[s] for s in ("train", "val", "test"))
    judges = fit_judges(vx, vy)
    model, hist = train_plain(tx, ty[:, 0], steps=args.steps, batch=args.batch, seed=args.seed)
    digits = np.repeat(np.arange(10), args.per_digit)
    fake = sample_plain(model, digits, guidance=args.guidance, seed=args.seed + 1)
    # loops and parity are functions of the digit: their intended labels come from the train split.
    lut = {int(r[0]): r for r in ty}
    want = np.stack([lut[d] for d in digits])
    faith = judge_scores(judges, fake, want)
    print(f"train {len(tx)} images, {args.steps} steps x batch {args.batch}, {hist['seconds']:.0f}s on "
          f"{args.threads} threads; judge test accuracy {judge_scores(judges, sx, sy)}")
    print("faithfulness", dict(zip(data.tasks, faith)))
    per = [float(np.mean(judges[0].predict(features(fake[digits == d])) == d)) for d in range(10)]
    print("per digit", [f"{p:.0%}" for p in per])


if __name__ == "__main__":
    main()
