"""Stage: prepare a synthesizer (train or load its model) — the same entry point for every kind."""

from __future__ import annotations

from typing import Any

from porcelain.config import RuntimeConfig
from porcelain.results import ModelRef
from porcelain.storage import Store
from porcelain.synthesizers import SynthesizerConfig, get


def prepare_synthesizer(store: Store, data: dict[str, Any], cfg: SynthesizerConfig, runtime: RuntimeConfig) -> ModelRef:
    """``cfg.kind``'s prepare: a reference to its stored model, cached in the store by its identity."""
    return get(cfg.kind).prepare(store, data, cfg, runtime)
