"""The watcher's tasks, one per function of :mod:`porcelain.watch`. No logic lives here.

Never cached: each tick must look at the prefix as it is now.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from porcelain import watch
from porcelain.config import DataConfig, StorageConfig
from porcelain.storage import Store

_OPTS: dict[str, Any] = dict(cache_policy=NO_CACHE, persist_result=False, retries=3, retry_delay_seconds=[2, 10, 30])


def _store(storage: StorageConfig) -> Store:
    return Store(storage.url, storage.storage_options())


@task(name="look-for-images", task_run_name="look-for-images", **_OPTS)
def look_for_images(data: DataConfig, storage: StorageConfig) -> dict[str, Any]:
    # the dataset is read with the store's storage options, as ingest reads it
    return watch.look(_store(storage), data.manifest, data.root, storage.storage_options())


@task(name="claim-snapshot", task_run_name="claim-{landed[snapshot]:.12}", **{**_OPTS, "retries": 0})
def claim_snapshot(landed: dict[str, Any], by: str | None, storage: StorageConfig) -> bool:
    return watch.claim_landed(_store(storage), landed, by)


@task(name="advance-watermark", task_run_name="advance-watermark", **_OPTS)
def advance_watermark(dataset: str, snapshot: str, storage: StorageConfig) -> bool:
    return watch.advance(_store(storage), dataset, snapshot)


@task(name="previous-run", task_run_name="previous-run", **_OPTS)
def previous_run(series: str, identity: str, storage: StorageConfig) -> dict[str, Any] | None:
    return watch.previous_digest(_store(storage), series, identity)


@task(name="record-run", task_run_name="record-run", **_OPTS)
def record_run(series: str, identity: str, data_hash: str, report_key: str, storage: StorageConfig) -> dict[str, Any]:
    return watch.record_run(_store(storage), series, identity, data_hash, report_key)
