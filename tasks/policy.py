"""What every porcelain task shares: content cache keys, JSON results, retries that skip data errors."""

from __future__ import annotations

from typing import Any

from prefect.tasks import exponential_backoff

from porcelain.errors import NOT_RETRYABLE
from porcelain.hashing import config_identity, stable_hash
from porcelain.runtime import runtime_identity
from porcelain.versions import stage_identity

# Parameters that say where to run, not what to compute: never part of a cache key. (The runtime's
# numerics are: see runtime_identity.)
NOT_CONTENT = frozenset({"storage", "runtime"})

# The stage (porcelain/versions.py) behind each task. A task whose parameters hold a synthesizer
# config (`cfg` with a `kind`) also depends on that kind's stage.
TASK_STAGES: dict[str, tuple[str, ...]] = {
    "builtin-data": ("builtin-data",), "ingest": ("ingest",), "pack-shard": ("pack",),
    "plan-generation": ("plan",), "reference-classifier": ("reference",), "prepare-synthesizer": (),
    "generate-shard": ("shards",), "semantic-drift": ("drift",),
    "filter-shard": ("filters",), "plan-top-up": ("filters",), "label-faithfulness": ("faithfulness",), "train-evaluate": ("sweep",),
    "choose-adaptive": ("adaptive",),
    "report": ("report",),
}


def task_stages(task_name: str, parameters: dict[str, Any]) -> list[str]:
    stages = list(TASK_STAGES[task_name])
    kind = getattr(parameters.get("cfg"), "kind", None)
    if kind:
        stages.append(f"synthesizer:{kind}")
    return stages


def _content(v: Any) -> Any:
    # a config naming a weights file is keyed by the file's content, not its path
    if hasattr(v, "model_dump") and "weights" in getattr(type(v), "model_fields", {}):
        return config_identity(v)
    return v


def content_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Cache key from the task's content parameters (hashes, configs), its stages' versions and the
    versions of the libraries they use, and the numeric runtime (device type, dtype) — never from the
    whole library's code, so a change to one stage leaves the others cached."""
    name = context.task.name
    content = {k: _content(v) for k, v in parameters.items() if k not in NOT_CONTENT}
    ident = {"params": content, "stages": [stage_identity(s) for s in task_stages(name, parameters)]}
    if parameters.get("runtime") is not None:
        ident["runtime"] = runtime_identity(parameters["runtime"])
    return f"{name}-{stable_hash(ident, 32)}"


# A ValueError or TypeError comes from a wrong value or argument, i.e. from configuration or a bug:
# the same inputs fail the same way, so retrying only delays the message.
DETERMINISTIC = (*NOT_RETRYABLE, ValueError, TypeError)


def retry_unless_deterministic(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transient failures (storage, network, OOM); a data or config error fails at once."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # the failure itself could not be read back: be safe and retry
        return True
    return not isinstance(exc, DETERMINISTIC)


TASK_DEFAULTS: dict[str, Any] = dict(
    cache_key_fn=content_cache_key,
    persist_result=True,
    result_serializer="json",
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_unless_deterministic,
)


def result_storage_for(storage: Any) -> Any:
    """A saved Prefect filesystem block for task results, beside the run's data in the same store.

    Results are small JSON documents (see ``result_serializer``); credentials are not stored in the
    block: s3fs reads them from the environment.
    """
    import os

    from prefect.filesystems import LocalFileSystem, RemoteFileSystem

    url = storage.url.rstrip("/")
    name = f"porcelain-results-{stable_hash(url, 12)}"
    if "://" in url and not url.startswith("file://"):
        block = RemoteFileSystem(basepath=f"{url}/prefect-results", settings=storage.storage_options())
    else:
        path = url.removeprefix("file://")
        block = LocalFileSystem(basepath=os.path.join(os.path.abspath(path), "prefect-results"))
    block.save(name, overwrite=True)
    return block


def retry_options(runtime: Any) -> dict[str, Any]:
    """Per-run retry settings (``runtime.retries``, exponential backoff from ``retry_delay_seconds``)."""
    return {"retries": runtime.retries,
            "retry_delay_seconds": exponential_backoff(backoff_factor=runtime.retry_delay_seconds)
            if runtime.retry_delay_seconds > 0 else 0}
