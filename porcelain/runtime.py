"""Apply the run's runtime settings (threads) once per process."""

from __future__ import annotations

import torch

from porcelain.config import RuntimeConfig


def apply_runtime(runtime: RuntimeConfig) -> None:
    if runtime.threads:
        torch.set_num_threads(runtime.threads)
