"""Stable Diffusion + LoRA synthesis as plain functions (no orchestration).

Entry points (:mod:`porcelain.diffusion.api`): :func:`train_sd_lora` and :func:`generate_sd_images`.
Settings: :class:`SdLoraSettings`. Building blocks, one purpose per module: ``loading`` (local-only
pipeline loading, base identity), ``tiny`` (a tiny random pipeline for tests), ``prompts``
(vocabularies), ``lora`` (adapters), ``textual_inversion`` (class tokens), ``checkpoint`` and
``training`` (resumable training), ``txt2img`` (batched, per-image-seeded sampling).
Heavy imports (diffusers, peft) happen inside the functions that need them.
"""

from .api import generate_sd_images, train_sd_lora
from .settings import SdLoraSettings, parse_settings

__all__ = ["SdLoraSettings", "generate_sd_images", "parse_settings", "train_sd_lora"]
