"""Prefect flows: wiring only. CLI → flow → task → porcelain function."""
