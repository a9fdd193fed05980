"""Prefect deployments of a run config, one purpose each: the weekly ratio sweep, the image watcher and
the rerun its event triggers (serve.py for one machine, prefect.yaml for work pools)."""
