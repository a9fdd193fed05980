"""Registry of synthesizer kinds (timm's ``create_model`` style): ``get(kind)``, ``register(cls)``.

The built-in kinds are imported on first use, so that importing the registry (for example from the
config) stays cheap and free of cycles. A new kind is one module with a :class:`Synthesizer`
subclass decorated with :func:`register`; nothing else is edited.
"""

from __future__ import annotations

import importlib
from typing import Any

from porcelain.synthesizers.base import Generated, Synthesizer, SynthesizerConfig

__all__ = ["Generated", "Synthesizer", "SynthesizerConfig", "builtin_kinds", "get", "kinds", "parse_config", "register"]

# kind -> module that registers it (imported lazily)
_BUILTIN = {
    "closed_set": "porcelain.synthesizers.closed_set",
    "sd_lora": "porcelain.synthesizers.sd_lora",
    "sgd_mix": "porcelain.synthesizers.sgd_mix",
    "sip": "porcelain.synthesizers.sip",
}
_REGISTRY: dict[str, type[Synthesizer]] = {}


def register(cls: type[Synthesizer]) -> type[Synthesizer]:
    """Class decorator: make ``cls.kind`` available to configs and to the flow."""
    for attr in ("kind", "config", "version"):
        if not hasattr(cls, attr):
            raise TypeError(f"synthesizer {cls.__name__} must set `{attr}`")
    field = cls.config.model_fields.get("kind")
    if field is None or field.default != cls.kind:
        raise TypeError(f"{cls.config.__name__}.kind must default to {cls.kind!r}")
    _REGISTRY[cls.kind] = cls
    return cls


def builtin_kinds() -> list[str]:
    """The kinds porcelain ships (their stage versions are recorded in tests/stage_versions.json)."""
    return sorted(_BUILTIN)


def kinds() -> list[str]:
    """Every kind that can be named in ``synthesizers:``."""
    return sorted(set(_BUILTIN) | set(_REGISTRY))


def get(kind: str) -> Synthesizer:
    """The synthesizer of ``kind`` (an instance; they hold no state)."""
    if kind not in _REGISTRY and kind in _BUILTIN:
        importlib.import_module(_BUILTIN[kind])
    try:
        return _REGISTRY[kind]()
    except KeyError:
        raise ValueError(f"unknown synthesizer kind {kind!r}; known kinds: {', '.join(kinds())}") from None


def parse_config(raw: Any) -> SynthesizerConfig:
    """One ``synthesizers:`` entry → its kind's config (errors name the kind and the key)."""
    if isinstance(raw, SynthesizerConfig):
        return raw
    if not isinstance(raw, dict) or "kind" not in raw:
        raise ValueError(f"each synthesizer needs a `kind` (one of {', '.join(kinds())}), got {raw!r}")
    return type(get(raw["kind"])).config.model_validate(raw)
