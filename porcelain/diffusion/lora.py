"""LoRA adapters on a Stable Diffusion pipeline (peft backend): add, initialise, save, load, weight.

Adapters are added with ``unet.add_adapter`` (and ``text_encoder.add_adapter`` when the text
encoder is trained too), so diffusers' multi-adapter machinery works on them unchanged:
``pipe.set_adapters([...], adapter_weights=[...])`` combines them at inference and
``cross_attention_kwargs={"scale": s}`` scales them.

A saved adapter is a flat state dict ``{"unet.<module>.lora_A.weight": ..., "text_encoder.…": ...}``
(the adapter name taken out of the keys, as ``get_peft_model_state_dict`` does) plus text
metadata describing its :class:`LoraConfig`, written as canonical safetensors
(:func:`porcelain.models.weights.weights_bytes`). Initialisation is seeded per adapter
(``lora_A`` Gaussian with std ``1/rank``, ``lora_B`` zero, as peft's ``"gaussian"`` init), so
training is reproducible whatever the global torch RNG did before.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import torch

from porcelain.errors import WeightsError
from porcelain.hashing import stable_hash

from .settings import LoraSettings

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

__all__ = [
    "LORA_FORMAT",
    "add_lora",
    "adapter_names",
    "lora_config",
    "lora_metadata",
    "lora_parameters",
    "lora_state_dict",
    "load_lora",
    "set_adapter_weights",
    "set_lora_state",
]

LORA_FORMAT = "porcelain-lora-v1"
_COMPONENTS = ("unet", "text_encoder")


def lora_config(s: LoraSettings, *, text_encoder: bool = False) -> "LoraConfig":
    """The peft :class:`LoraConfig` of the UNet (or of the text encoder) for these settings."""
    from peft import LoraConfig

    modules = s.text_encoder_target_modules if text_encoder else s.target_modules
    return LoraConfig(r=s.rank, lora_alpha=s.alpha, target_modules=list(modules), lora_dropout=0.0,
                      init_lora_weights="gaussian")


@contextlib.contextmanager
def _quiet_multi_adapter() -> Iterator[None]:
    """peft warns on every second adapter of a model; several adapters are intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        yield


def _component(pipe: "StableDiffusionPipeline", name: str) -> torch.nn.Module:
    return getattr(pipe, name)


def adapter_names(pipe: "StableDiffusionPipeline") -> list[str]:
    """Names of the LoRA adapters present on the pipeline's UNet."""
    return list(getattr(pipe.unet, "peft_config", {}) or {})


def add_lora(pipe: "StableDiffusionPipeline", name: str, s: LoraSettings, *, seed: int,
             text_encoder: bool | None = None) -> None:
    """Add adapter ``name`` to the UNet (and the text encoder if ``text_encoder``, default
    ``s.train_text_encoder``) and initialise it deterministically from ``(seed, name)``."""
    te = s.train_text_encoder if text_encoder is None else text_encoder
    if name in adapter_names(pipe):
        raise ValueError(f"adapter {name!r} is already on this pipeline")
    with _quiet_multi_adapter():
        pipe.unet.add_adapter(lora_config(s), adapter_name=name)
        if te:
            pipe.text_encoder.add_adapter(lora_config(s, text_encoder=True), adapter_name=name)
    gen = torch.Generator("cpu").manual_seed(int(stable_hash(["lora-init", seed, name]), 16) % (2**63))
    with torch.no_grad():
        for key, p in sorted(lora_parameters(pipe, name).items()):
            if ".lora_A." in key:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) / s.rank)
            else:
                p.zero_()


def lora_parameters(pipe: "StableDiffusionPipeline", name: str) -> dict[str, torch.nn.Parameter]:
    """The LoRA parameters of adapter ``name``, keyed ``"unet.<module>.lora_A.weight"`` (name removed)."""
    tag = f".{name}."
    out: dict[str, torch.nn.Parameter] = {}
    for comp in _COMPONENTS:
        for key, p in _component(pipe, comp).named_parameters():
            if ".lora_" in key and tag in key:
                out[f"{comp}.{key.replace(tag, '.')}"] = p
    return out


def lora_state_dict(pipe: "StableDiffusionPipeline", name: str) -> dict[str, torch.Tensor]:
    """A CPU copy of adapter ``name``'s weights (see :func:`lora_parameters` for the keys)."""
    params = lora_parameters(pipe, name)
    if not params:
        raise WeightsError(f"no LoRA adapter {name!r} on this pipeline (present: {adapter_names(pipe)})")
    return {k: p.detach().to("cpu", torch.float32, copy=True) for k, p in sorted(params.items())}


def set_lora_state(pipe: "StableDiffusionPipeline", name: str, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into adapter ``name``; the keys must match exactly (else :class:`WeightsError`)."""
    params = lora_parameters(pipe, name)
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise WeightsError(f"LoRA {name!r} does not fit the pipeline: missing {missing[:3]} ({len(missing)}), "
                           f"unexpected {unexpected[:3]} ({len(unexpected)}); was it trained on another base?")
    with torch.no_grad():
        for k, p in params.items():
            if tuple(state[k].shape) != tuple(p.shape):
                raise WeightsError(f"LoRA {name!r}: {k} has shape {tuple(state[k].shape)}, the model wants "
                                   f"{tuple(p.shape)}")
            p.copy_(state[k].to(p.device, p.dtype))


def lora_metadata(s: LoraSettings, *, name: str, tasks: list[str], text_encoder: bool,
                  extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Text metadata stored with an adapter: enough to rebuild its :class:`LoraConfig`."""
    return {
        "format": LORA_FORMAT, "adapter": name, "tasks": json.dumps(tasks),
        "rank": str(s.rank), "alpha": repr(float(s.alpha)),
        "target_modules": json.dumps(list(s.target_modules)),
        "text_encoder_target_modules": json.dumps(list(s.text_encoder_target_modules)) if text_encoder else "",
        **dict(extra or {}),
    }


def load_lora(pipe: "StableDiffusionPipeline", state: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
              name: str | None = None) -> str:
    """Add a saved adapter (state + metadata from :func:`lora_metadata`) to ``pipe``; return its name."""
    from peft import LoraConfig

    if metadata.get("format") != LORA_FORMAT:
        raise WeightsError(f"not a porcelain LoRA (format {metadata.get('format')!r}, expected {LORA_FORMAT!r})")
    name = name or metadata["adapter"]
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
        raise WeightsError(f"invalid adapter name {name!r} in LoRA metadata")
    rank, alpha = int(metadata["rank"]), float(metadata["alpha"])
    with _quiet_multi_adapter():
        pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                         target_modules=json.loads(metadata["target_modules"])), adapter_name=name)
        if metadata.get("text_encoder_target_modules"):
            pipe.text_encoder.add_adapter(LoraConfig(
                r=rank, lora_alpha=alpha, target_modules=json.loads(metadata["text_encoder_target_modules"]),
                lora_dropout=0.0), adapter_name=name)
    set_lora_state(pipe, name, state)
    return name


def set_adapter_weights(pipe: "StableDiffusionPipeline", weights: Mapping[str, float]) -> None:
    """Activate exactly the adapters in ``weights``, each with its weight (peft multi-adapter).

    Also resets each layer's scaling to ``weight * alpha / rank`` exactly, undoing any drift from
    repeated ``scale``/``unscale`` by a LoRA scale.
    """
    if not weights:
        return
    present = set(adapter_names(pipe))
    unknown = sorted(set(weights) - present)
    if unknown:
        raise WeightsError(f"adapters {unknown} are not loaded (loaded: {sorted(present)})")
    pipe.set_adapters(list(weights), adapter_weights=[float(w) for w in weights.values()])
