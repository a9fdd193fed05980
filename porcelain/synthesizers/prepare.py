"""Stage: prepare a synthesizer (train or load its model) — the same entry point for every kind."""

from __future__ import annotations

from typing import Any

from porcelain.config import RuntimeConfig
from porcelain.results import ModelRef
from porcelain.storage import Store
from porcelain.synthesizers import SynthesizerConfig, get


def prepare_synthesizer(store: Store, data: dict[str, Any], cfg: SynthesizerConfig, runtime: RuntimeConfig,
                        context: dict[str, Any] | None = None) -> ModelRef:
    """``cfg.kind``'s prepare: a reference to its stored model, cached in the store by its identity.
    ``context`` holds the results the kind declares in ``needs`` (nothing for most kinds)."""
    syn = get(cfg.kind)
    if syn.needs:
        missing = sorted(syn.needs - set(context or {}))
        if missing:
            raise ValueError(f"synthesizer {cfg.kind} needs {missing} to prepare")
        return syn.prepare(store, data, cfg, runtime, context={k: context[k] for k in syn.needs})
    return syn.prepare(store, data, cfg, runtime)
