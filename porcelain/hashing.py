"""Content hashes: the cache keys of every stage come from these, never from path strings."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import porcelain


def stable_hash(obj: Any, length: int = 16) -> str:
    """SHA-256 of the canonical JSON of ``obj`` (dict keys sorted), truncated to ``length`` hex digits."""
    data = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_default).encode("utf-8")
    return hashlib.sha256(data).hexdigest()[:length]


def _default(o: Any) -> Any:
    if hasattr(o, "model_dump"):
        return o.model_dump(mode="json")
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"cannot hash object of type {type(o).__name__}")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The package version plus a hash of the library's source: a code change invalidates caches."""
    root = Path(porcelain.__file__).parent
    h = hashlib.sha256(porcelain.__version__.encode())
    for p in sorted(root.rglob("*.py")):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return f"{porcelain.__version__}+{h.hexdigest()[:12]}"
