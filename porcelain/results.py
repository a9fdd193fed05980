"""Typed results that stages hand to each other, and the one function that keys them.

Tasks pass these small records (hashes, store keys, counts), never tensors or images. A result's
cache identity comes from its *content* (the sha256 of the files it points to, the content keys of
its inputs), never from timings, paths or display names: :func:`key_of`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from porcelain.hashing import stable_hash


class _Result(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)



class FileRef(_Result):
    """One stored file: its store key and the sha256 of its bytes (checked on every read)."""

    key: str
    sha256: str


class ModelRef(_Result):
    """What a synthesizer's prepare stage made: the stored files, and what describes them.

    ``identity`` holds what the model was made from (data hash, settings, stage version); ``meta``
    holds descriptive facts (train images, steps, seconds, final loss) that never enter a key.
    """

    kind: str
    key: str = Field(description="The prepare stage's cache key (from its inputs).")
    files: dict[str, FileRef] = Field(default_factory=dict)
    identity: dict[str, Any] = Field(default_factory=dict)
    meta: dict[str, Any] = Field(default_factory=dict)


class ShardRef(_Result):
    """One finished shard: its manifest key and what it holds."""

    key: str
    n: int
    combo: list[int]
    start: int
    synthesizer: str = Field(description="The synthesizer's label in this run (display only).")
    kept: list[int] | None = Field(None, description="After filters: the indices (within the combination) of the "
                                   "images kept; None: unfiltered, every image is kept.")
    filter_key: str | None = Field(None, description="Where the filter verdicts of this shard are stored.")


_VOLATILE: dict[type, frozenset[str]] = {
    ModelRef: frozenset({"meta", "key"}),
    ShardRef: frozenset({"synthesizer"}),
}


def key_of(result: _Result | dict[str, Any], length: int = 24) -> str:
    """A cache key from a result's identity: content fields only (no timings, paths or labels).

    A :class:`ModelRef` is keyed by its kind, its identity and the sha256 of its files, so two
    trainings that wrote bit-identical weights give one key, and any other weights another.
    """
    if isinstance(result, dict):
        return stable_hash(result, length)
    skip = _VOLATILE.get(type(result), frozenset())
    payload = result.model_dump(mode="json", exclude=set(skip))
    if isinstance(result, ModelRef):
        payload["files"] = {k: v["sha256"] for k, v in payload["files"].items()}
    return stable_hash({"type": type(result).__name__, **payload}, length)
