"""Settings of Stable Diffusion + LoRA synthesis: one pydantic model, :class:`SdLoraSettings`.

Every field has a description; unknown keys are refused (``extra="forbid"``), and
:func:`parse_settings` turns a validation failure into a :class:`~porcelain.errors.ConfigError`
whose message names each offending key by its dotted path (``lora.rank: ...``).

:func:`training_identity` is the part of the settings that changes the trained weights (the
inference settings are left out), used to key checkpoints and results.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from porcelain.errors import ConfigError

__all__ = [
    "BASE_ALIASES",
    "AdapterSpec",
    "InferenceSettings",
    "LoraSettings",
    "PromptSettings",
    "SdLoraSettings",
    "TextualInversionSettings",
    "parse_settings",
    "resolve_base_alias",
    "training_identity",
]

BASE_ALIASES: dict[str, str] = {
    "sd21": "stabilityai/stable-diffusion-2-1-base",
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
}
"""Short names accepted by ``base``."""

DEFAULT_ADAPTER = "all"
"""Name of the single adapter trained when ``adapters`` is empty."""

_ADAPTER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
_RESERVED_NAMES = {"default", "textual_inversion"}


def resolve_base_alias(base: str) -> str:
    """``sd21`` / ``sd15`` to their hub ids; anything else unchanged."""
    return BASE_ALIASES.get(base.strip().lower(), base)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PromptSettings(_Model):
    """Which vocabulary turns labels into prompts, and optional overrides of its texts."""

    vocabulary: str = Field("sample", description=(
        "A built-in vocabulary ('sample', 'digits': porcelain/configs/prompts/<name>.yaml) or the path "
        "of a YAML vocabulary file (see docs/SD_LORA.md)."))
    template: str | None = Field(None, description=(
        "Overrides the vocabulary's prompt template, e.g. '{glaze}, {type}, Chinese porcelain'; each "
        "{field} names a task."))
    negative_prompt: str | None = Field(None, description="Overrides the vocabulary's negative prompt.")

    @field_validator("vocabulary")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name a built-in vocabulary or a YAML file")
        return v


class LoraSettings(_Model):
    """LoRA fine-tuning of the UNet (and optionally of the text encoder)."""

    rank: Annotated[int, Field(ge=1, le=512, description="LoRA rank r of each adapted projection.")] = 4
    alpha: Annotated[float, Field(gt=0, le=4096, description=(
        "LoRA alpha; the update is scaled by alpha / rank.")) ] = 4.0
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], description=(
        "UNet attention projections that get a LoRA (module-name suffixes, as peft matches them)."))
    text_encoder_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"],
        description="Text-encoder projections that get a LoRA when train_text_encoder is true.")
    lr: Annotated[float, Field(gt=0, le=1.0, description="AdamW learning rate of the LoRA weights.")] = 1e-4
    train_steps: Annotated[int, Field(ge=1, le=1_000_000, description=(
        "Optimizer steps per adapter.")) ] = 400
    batch_size: Annotated[int, Field(ge=1, le=1024, description="Training images per step.")] = 4
    train_text_encoder: bool = Field(False, description="Also train a LoRA on the text encoder.")
    checkpoint_every: Annotated[int, Field(ge=1, description=(
        "Write a resumable checkpoint every this many steps (counted over all training phases).")) ] = 100
    gradient_checkpointing: bool | Literal["auto"] = Field("auto", description=(
        "Recompute UNet activations in the backward pass to save memory; 'auto' = on CUDA only."))

    @field_validator("target_modules", "text_encoder_target_modules")
    @classmethod
    def _modules(cls, v: list[str]) -> list[str]:
        if not v or any(not m.strip() for m in v):
            raise ValueError("must list at least one module name, none empty")
        return v


class AdapterSpec(_Model):
    """One LoRA trained for a group of tasks, with its inference weight."""

    name: str = Field(description="Adapter name (letters, digits, underscores; starts with a letter).")
    tasks: list[str] = Field(description="The tasks this adapter stresses (its template names them).")
    weight: Annotated[float, Field(ge=-10.0, le=10.0, description=(
        "Weight of this adapter when adapters are combined at inference.")) ] = 1.0

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _ADAPTER_NAME.match(v) or v in _RESERVED_NAMES:
            raise ValueError(f"{v!r} is not a valid adapter name (letters, digits, '_', starting with a letter; "
                             f"not one of {sorted(_RESERVED_NAMES)})")
        return v

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("an adapter needs at least one task")
        if len(set(v)) != len(v):
            raise ValueError(f"tasks repeated: {v}")
        return v


class TextualInversionSettings(_Model):
    """Learned class tokens (``<glaze_celadon>``), used when ``class_tokens`` is 'textual_inversion'."""

    steps: Annotated[int, Field(ge=1, le=1_000_000, description="Optimizer steps of the token embeddings.")] = 200
    lr: Annotated[float, Field(gt=0, le=10.0, description="AdamW learning rate of the token embeddings.")] = 5e-3


class InferenceSettings(_Model):
    """txt2img sampling."""

    lora_scale: Annotated[float, Field(ge=0.0, le=10.0, description=(
        "Scale of the LoRA update at inference (0 = the base model; the porcelain paper uses 0.4).")) ] = 0.4
    steps: Annotated[int, Field(ge=1, le=1000, description="DDIM sampling steps.")] = 25
    guidance: Annotated[float, Field(ge=0.0, le=50.0, description=(
        "Classifier-free guidance scale (<= 1 turns guidance off).")) ] = 7.5
    batch_size: Annotated[int, Field(ge=1, le=1024, description=(
        "Images per UNet batch; halved automatically on CUDA out-of-memory.")) ] = 8
    compile: bool = Field(False, description="torch.compile the UNet (CUDA only; ignored on CPU).")


class SdLoraSettings(_Model):
    """Stable Diffusion + LoRA: base model, prompts, training and inference."""

    base: str = Field("stabilityai/stable-diffusion-2-1-base", description=(
        "A diffusers-format model folder, or a Hugging Face hub id found in the local HF cache "
        "(nothing is downloaded); aliases: 'sd21' (SD 2.1 base), 'sd15' (SD 1.5)."))
    resolution: Annotated[int, Field(ge=8, le=2048, description=(
        "Side in px of training images (resized to it) and of generated images; a multiple of 8.")) ] = 512
    seed: int = Field(0, description="Seed of LoRA initialisation, batch order, noise and timesteps in training.")
    prompts: PromptSettings = Field(default_factory=PromptSettings, description="Prompt vocabulary.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA fine-tuning.")
    adapters: list[AdapterSpec] = Field(default_factory=list, description=(
        "Per-task adapters, each trained with its own template and weighted at inference; "
        "empty = one adapter for all tasks."))
    class_tokens: Literal["none", "textual_inversion", "dreambooth"] = Field("none", description=(
        "Label values as class tokens: 'textual_inversion' learns one new token per label value before "
        "the LoRA; 'dreambooth' writes '[v] {class}'-style identifiers into the prompts (trained with the LoRA)."))
    textual_inversion: TextualInversionSettings = Field(default_factory=TextualInversionSettings, description=(
        "Textual-inversion training (used when class_tokens is 'textual_inversion')."))
    inference: InferenceSettings = Field(default_factory=InferenceSettings, description="txt2img sampling.")

    @field_validator("base")
    @classmethod
    def _base(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be a model folder, a hub id, 'sd21' or 'sd15'")
        return v.strip()

    @field_validator("resolution")
    @classmethod
    def _resolution(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"must be a multiple of 8 px, got {v}")
        return v

    @model_validator(mode="after")
    def _adapters_unique(self) -> "SdLoraSettings":
        names = [a.name for a in self.adapters]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"adapters: names must be unique, repeated: {dup}")
        return self

    @property
    def base_id(self) -> str:
        """``base`` with its alias resolved."""
        return resolve_base_alias(self.base)

    def adapter_specs(self) -> list[AdapterSpec]:
        """The adapters to train: ``adapters``, or one adapter named 'all' (tasks filled in from the data)."""
        return list(self.adapters) or [AdapterSpec(name=DEFAULT_ADAPTER, tasks=["*"], weight=1.0)]


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(settings)"


def parse_settings(obj: SdLoraSettings | dict[str, Any] | None, prefix: str = "") -> SdLoraSettings:
    """Validate ``obj``; a failure is a :class:`ConfigError` naming every bad key (``lora.rank: ...``).

    ``prefix`` is prepended to the keys (e.g. ``"synthesizer.sd_lora."``) so the message points to
    where they are in the user's config file.
    """
    if isinstance(obj, SdLoraSettings):
        return obj
    try:
        return SdLoraSettings.model_validate(obj or {})
    except ValidationError as e:
        lines = [f"{prefix}{_loc(err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ConfigError("invalid SD LoRA settings:\n  " + "\n  ".join(lines)) from None


def training_identity(cfg: SdLoraSettings) -> dict[str, Any]:
    """The settings that change the trained weights (inference settings and adapter weights left out)."""
    return {
        "base": cfg.base_id,
        "resolution": cfg.resolution,
        "seed": cfg.seed,
        "prompts": cfg.prompts.model_dump(mode="json"),
        "lora": cfg.lora.model_dump(mode="json", exclude={"checkpoint_every", "gradient_checkpointing"}),
        "adapters": [{"name": a.name, "tasks": a.tasks} for a in cfg.adapter_specs()],
        "class_tokens": cfg.class_tokens,
        "textual_inversion": cfg.textual_inversion.model_dump(mode="json")
        if cfg.class_tokens == "textual_inversion" else None,
    }
