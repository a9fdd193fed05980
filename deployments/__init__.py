"""Prefect deployments of the pipeline (scheduled ratio sweeps, refresh runs)."""
