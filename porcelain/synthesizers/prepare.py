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
    ``context`` holds the results the kind declares in ``needs_for(cfg)`` (nothing for most kinds)."""
    syn = get(cfg.kind)
    needs = syn.needs_for(cfg)
    if needs:
        missing = sorted(needs - set(context or {}))
        if missing:
            raise ValueError(f"synthesizer {cfg.kind} needs {missing} to prepare")
        return syn.prepare(store, data, cfg, runtime, context={k: context[k] for k in needs})
    return syn.prepare(store, data, cfg, runtime)
