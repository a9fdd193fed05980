"""Fixtures of the Stable Diffusion + LoRA tests: a tiny pipeline on disk, sample data, one shared training run.

Imported by tests/test_sd_lora.py (``from tests.sd_fixtures import *``): everything is offline, on
the CPU, and small enough for the whole file to run in about a minute on two cores.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from porcelain.data.sample import plan_sample, render  # noqa: E402
from porcelain.diffusion.settings import SdLoraSettings, parse_settings  # noqa: E402
from porcelain.diffusion.tiny import build_tiny_pipeline  # noqa: E402
from porcelain.storage.store import Store  # noqa: E402

__all__ = ["SharedRun", "one_thread", "sample_data", "shared_run", "tiny_base", "tiny_settings"]

RES = 32  # px: 8×8 latents with the tiny VAE (4× downsampling)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, OpenMP's spinning threads slow tiny ops ~50×."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny random SD pipeline saved with ``save_pretrained`` (a valid ``base``)."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd") / "tiny", seed=0)


@pytest.fixture(scope="session")
def sample_data() -> tuple[np.ndarray, list[dict[str, str]]]:
    """20 images of the procedural porcelain sample (every glaze×type combination once), 32 px."""
    items = plan_sample(20, seed=0)
    images = np.stack([render(it.labels, RES, it.seed) for it in items])
    return images, [dict(it.labels) for it in items]


def tiny_settings(base: Path, **overrides: Any) -> SdLoraSettings:
    """Settings for the tiny pipeline: a few steps, high learning rates so that the LoRA visibly matters."""
    cfg: dict[str, Any] = {
        "base": str(base), "resolution": RES, "seed": 0,
        "lora": {"train_steps": 4, "batch_size": 2, "checkpoint_every": 2, "lr": 5e-2, "rank": 4, "alpha": 4},
        "textual_inversion": {"steps": 2, "lr": 5e-2},
        "inference": {"steps": 4, "guidance": 5.0, "batch_size": 4, "lora_scale": 1.0},
    }
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return parse_settings(cfg)


@dataclass
class SharedRun:
    """One training run shared by the tests: two adapters plus textual-inversion class tokens."""

    store: Store
    cfg: SdLoraSettings
    ref: dict
    pipe: Any  # the trained in-memory pipeline
    base_state: dict[str, dict[str, torch.Tensor]]  # unet / text_encoder / vae tensors before training
    images: np.ndarray
    labels: list[dict[str, str]]


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory, tiny_base, sample_data) -> SharedRun:
    from porcelain.diffusion.api import _train_sd_lora
    from porcelain.diffusion.loading import load_pipeline

    images, labels = sample_data
    cfg = tiny_settings(tiny_base, class_tokens="textual_inversion", adapters=[
        {"name": "form", "tasks": ["type", "glaze"], "weight": 1.0},
        {"name": "origin", "tasks": ["dynasty", "kiln"], "weight": 0.5},
    ])
    fresh = load_pipeline(str(tiny_base), device="cpu")
    base_state = {c: {k: v.detach().clone() for k, v in getattr(fresh, c).state_dict().items()}
                  for c in ("unet", "text_encoder", "vae")}
    store = Store(str(tmp_path_factory.mktemp("sd_store")))
    ref, pipe = _train_sd_lora(store, images, labels, cfg, key="runs/shared", device="cpu")
    assert pipe is not None
    return SharedRun(store, cfg, ref, pipe, base_state, images, labels)
