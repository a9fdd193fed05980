"""Content hashes: the cache keys of every stage come from these, never from path strings."""

from __future__ import annotations

import functools
import hashlib
import json
import struct
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


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime: float) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | None) -> str | None:
    """sha256 of a local file's bytes (memoised by path, size and mtime); None for None.

    Used where a config names a file whose content matters (``classifier.weights``): replacing the
    file must change the key, moving it must not.
    """
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        return f"missing:{p.name}"  # the stage that loads it reports the missing file
    st = p.stat()
    return _file_sha256(str(p.resolve()), st.st_size, st.st_mtime)


def config_identity(cfg: Any, files: tuple[str, ...] = ("weights",)) -> dict[str, Any]:
    """A config's fields with file paths replaced by the sha256 of their content."""
    d = cfg.model_dump(mode="json")
    for k in files:
        if d.get(k) is not None:
            d[k] = {"sha256": file_sha256(d[k])}
    return d


def canonical_safetensors(blob: bytes) -> bytes:
    """The same safetensors blob with its JSON header written with sorted keys.

    safetensors writes the metadata map in a random order (a Rust ``HashMap``), so two saves of the
    same weights differed byte for byte, and so did their sha256, which keys content-addressed
    results downstream. Data offsets are relative to the end of the header, so only the header
    changes; it is padded with spaces to a multiple of 8 bytes, as safetensors itself does.
    """
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + blob[8 + n :]


def weights_folder_identity(path: str | None) -> Any:
    """A weights folder (``local-dir:``/plain path) by the sha256 of its safetensors files, not by where
    it is; a hub id, which the loader resolves from the local cache, by its name."""
    if path is None:
        return None
    p = Path(path.removeprefix("local-dir:")).expanduser()
    files = sorted(p.rglob("*.safetensors")) if p.is_dir() else []
    if not files:
        return {"name": path}  # a hub id: resolved from the local cache by the loader
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + f.read_bytes())
    return {"safetensors_sha256": h.hexdigest()}
