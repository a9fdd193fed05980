"""Loading a Stable Diffusion pipeline from local files only, and the identity of its weights.

* :func:`resolve_base` turns ``base`` (a folder, a hub id, ``sd21``/``sd15``) into a local
  diffusers folder, looking in the Hugging Face cache only; nothing is ever downloaded. A missing
  model raises :class:`BaseModelNotFoundError` saying what to download and where.
* :func:`load_pipeline` loads it (safetensors only, safety checker off) with a DDIM scheduler that
  keeps the base scheduler's ``prediction_type`` and noise schedule; fp32 on CPU, fp16/bf16,
  SDPA attention and ``channels_last`` on CUDA.
* :func:`base_model_hash` is a content identity of the base weights (see its docstring for what
  is hashed).
* :func:`optimize_for_inference` optionally compiles the UNet (CUDA only).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from porcelain.device import choose_device, choose_dtype
from porcelain.errors import WeightsError

from .settings import BASE_ALIASES, resolve_base_alias

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

__all__ = [
    "BaseModelNotFoundError",
    "base_model_hash",
    "load_pipeline",
    "optimize_for_inference",
    "pipeline_dtype",
    "resolve_base",
]

log = logging.getLogger("porcelain")

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_HASH_EDGE = 1 << 20  # bytes hashed at each end of a large weights file
_BASE_DIR_ATTR = "_porcelain_base_dir"


class BaseModelNotFoundError(WeightsError):
    """The base diffusion model is not on this machine (nothing is downloaded at run time)."""


def _download_hint(what: str) -> str:
    hub_id = what if _HUB_ID.match(what) else BASE_ALIASES["sd21"]
    return (
        f"download it once, on a machine with internet access, with\n"
        f"    huggingface-cli download {hub_id} --local-dir /models/{hub_id.split('/')[-1]}\n"
        f"and set the config key `base` to that folder (or download it without --local-dir into the "
        f"Hugging Face cache, $HF_HOME/hub, default ~/.cache/huggingface/hub, and set `base: {hub_id}`). "
        f"Built-in aliases: " + ", ".join(f"{k} = {v}" for k, v in BASE_ALIASES.items())
        + ". See docs/SD_LORA.md."
    )


def resolve_base(base: str) -> Path:
    """The local diffusers folder of ``base``: a folder, a hub id in the local HF cache, or an alias."""
    name = resolve_base_alias(base)
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise BaseModelNotFoundError(
                f"`base` = {base!r}: {local.resolve()} is not a diffusers pipeline folder (no model_index.json); "
                + _download_hint(BASE_ALIASES["sd21"]))
        return local.resolve()
    if not _HUB_ID.match(name) or name.startswith((".", "/", "~")):
        raise BaseModelNotFoundError(f"`base` = {base!r}: no such folder ({local.resolve()}); "
                                     + _download_hint(BASE_ALIASES["sd21"]))
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id=name, local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError, OfflineModeIsEnabled, ...
        raise BaseModelNotFoundError(
            f"`base` = {base!r}: the model {name} is not in the local Hugging Face cache and nothing is "
            f"downloaded at run time ({type(e).__name__}); " + _download_hint(name)) from None
    if not (path / "model_index.json").is_file():
        raise BaseModelNotFoundError(f"`base` = {base!r}: the cached snapshot {path} has no model_index.json "
                                     f"(incomplete download?); " + _download_hint(name))
    return path


def pipeline_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype:
    """Weights dtype: fp32 on CPU unless asked otherwise; on CUDA bf16 where supported, else fp16."""
    return choose_dtype(dtype, device)


def load_pipeline(base: str, *, device: str | torch.device = "auto", dtype: str = "auto") -> "StableDiffusionPipeline":
    """A :class:`StableDiffusionPipeline` from local files, ready for training or txt2img.

    Safetensors only (a base with only ``.bin`` weights is refused rather than unpickled), the safety
    checker off, progress bars off, a :class:`DDIMScheduler` built from the base scheduler's config
    (same betas, ``prediction_type``, ``timestep_spacing``). On CUDA: half precision, SDPA attention
    (the default processor in torch 2) and ``channels_last`` UNet/VAE.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    path = resolve_base(base)
    dev = device if isinstance(device, torch.device) else choose_device(device)
    torch_dtype = pipeline_dtype(dev, dtype)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(path), dtype=torch_dtype, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, local_files_only=True, use_safetensors=True)
    except (OSError, EnvironmentError, ValueError) as e:
        raise BaseModelNotFoundError(f"`base` = {base!r}: could not load the pipeline from {path} ({e}); "
                                     + _download_hint(resolve_base_alias(base))) from e
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(dev)
    if dev.type == "cuda":
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    setattr(pipe, _BASE_DIR_ATTR, str(path))
    return pipe


def optimize_for_inference(pipe: "StableDiffusionPipeline", *, compile: bool = False) -> "StableDiffusionPipeline":
    """Compile the UNet in place on CUDA (``nn.Module.compile`` keeps the module's class, so peft's
    ``set_adapters`` still reaches it); a no-op on CPU or when ``compile`` is false."""
    if compile and pipe.device.type == "cuda" and not getattr(pipe.unet, "_porcelain_compiled", False):
        pipe.unet.compile(fullgraph=False, dynamic=False)
        pipe.unet._porcelain_compiled = True
    return pipe


_HASH_CACHE: dict[tuple[str, tuple[tuple[str, int, int], ...]], str] = {}


def _hashed_files(root: Path) -> list[Path]:
    """The files that define a pipeline: JSON configs, tokenizer texts and the default-variant safetensors."""
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if not p.is_file() or any(part.startswith(".") for part in rel.split("/")):
            continue
        if p.suffix in (".json", ".txt") or (p.suffix == ".safetensors" and len(p.name.split(".")) == 2):
            out.append(p)
    return out


def base_model_hash(pipe_or_path: "StableDiffusionPipeline | str | os.PathLike[str]") -> str:
    """sha256 identity (hex) of a base model folder.

    Over every JSON config, every tokenizer text file and every default-variant ``*.safetensors``
    file (``fp16``/``non_ema`` variants are skipped: they are not what :func:`load_pipeline` loads),
    in path order: the relative path and size of each; the whole content of files up to 2 MiB, and
    for larger weight files their safetensors header (names, dtypes, shapes, offsets) plus the first
    and last MiB of data. Cheap for a 5 GB model (~10 MiB read) and changed by any re-download of
    different weights; it cannot see an edit in the middle of a large file that keeps its size.
    Cached in-process by (path, size, mtime) of the files.
    """
    path = Path(getattr(pipe_or_path, _BASE_DIR_ATTR, None) or pipe_or_path)  # type: ignore[arg-type]
    if not path.is_dir():
        raise WeightsError(f"base_model_hash: {path} is not a model folder (load the pipeline with load_pipeline)")
    files = _hashed_files(path)
    stat_key = tuple((p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    cache_key = (str(path), stat_key)
    if cache_key in _HASH_CACHE:
        return _HASH_CACHE[cache_key]
    h = hashlib.sha256(b"porcelain-base-v1")
    for p, (rel, size, _) in zip(files, stat_key):
        h.update(json.dumps([rel, size]).encode())
        with p.open("rb") as f:
            if size <= 2 * _HASH_EDGE:
                h.update(f.read())
                continue
            if p.suffix == ".safetensors":
                n = int.from_bytes(f.read(8), "little")
                h.update(f.read(min(n, 100 << 20)))
            f.seek(0)
            h.update(f.read(_HASH_EDGE))
            f.seek(size - _HASH_EDGE)
            h.update(f.read(_HASH_EDGE))
    digest = h.hexdigest()
    _HASH_CACHE[cache_key] = digest
    return digest
