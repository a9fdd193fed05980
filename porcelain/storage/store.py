"""A small object store over fsspec.

Every key is relative to one base URL (a local folder or ``s3://bucket/prefix``). Writes are atomic:
on a local disk a temporary file is renamed into place; on object stores a single PUT is atomic by
itself, so a reader never sees a partial object. Content-addressed objects (:meth:`Store.put_object`)
are named by their SHA-256, so writing the same bytes twice — from a rerun or from a second run at
the same time — is idempotent.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import errno
import os
import time
import posixpath
import re
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from porcelain.errors import PorcelainError, WeightsError

_KEY_RE = re.compile(r"^[A-Za-z0-9._\-/=+]+$")


class StorageError(PorcelainError):
    """A key or URL that the store refuses (it would leave the store's root)."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_key(key: str) -> str:
    """Keys are relative, plain and cannot climb out of the store (no ``..``, no absolute paths)."""
    if not key or key.startswith("/") or "\\" in key or not _KEY_RE.match(key):
        raise StorageError(f"invalid storage key {key!r}")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"invalid storage key {key!r}: empty, '.' or '..' segment")
    return key


class Store:
    """Content-addressed, atomic storage under one base URL."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = url.rstrip("/") or url
        self.storage_options = dict(storage_options or {})
        self.fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = os.path.abspath(root) if self.local else root.rstrip("/")
        if self.local:
            os.makedirs(self.root, exist_ok=True)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # -- paths -----------------------------------------------------------------------------------
    def path(self, key: str) -> str:
        return posixpath.join(self.root, check_key(key))

    def uri(self, key: str) -> str:
        """A URL for ``key`` that fsspec (and a person) can open."""
        if self.local:
            return self.path(key)
        protocol = self.fs.protocol[0] if isinstance(self.fs.protocol, (tuple, list)) else self.fs.protocol
        return f"{protocol}://{self.path(key)}"

    # -- reads -----------------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return self.fs.exists(self.path(key))

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.fs.cat_file(self.path(key))
        except FileNotFoundError:
            raise FileNotFoundError(f"{key!r} is not in the store {self.url}") from None

    def read_verified(self, key: str, sha256: str) -> bytes:
        """The bytes at ``key``, checked against the SHA-256 recorded when they were written."""
        blob = self.read_bytes(key)
        if sha256_bytes(blob) != sha256:
            raise WeightsError(f"{key} does not match its recorded sha256: the stored weights changed or are corrupt")
        return blob

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key).decode("utf-8"))

    def list(self, prefix: str) -> list[str]:
        """Keys below ``prefix`` (recursive), sorted; temporary files are not listed."""
        base = self.path(prefix)
        if not self.fs.exists(base):
            return []
        out = []
        for p in self.fs.find(base):
            rel = posixpath.relpath(p if self.local else p.rstrip("/"), self.root)
            if ".tmp-" not in posixpath.basename(rel):
                out.append(rel)
        return sorted(out)

    # -- writes ----------------------------------------------------------------------------------
    @staticmethod
    def _place(path: str, data: bytes, put: Any) -> Any:
        """Local disks: write ``data`` to a temporary file beside ``path``, synced, then ``put(tmp, path)``
        (os.replace to publish it, os.link to publish it only if the name is free); a reader never sees a
        partial file, and the temporary file is gone afterwards."""
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return put(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def create(self, key: str, data: bytes) -> bool:
        """Write ``data`` at ``key`` only if nothing is there; True for the one writer that did (a claim).

        Local disks: a hard link of the synced temporary file (``link`` fails when the name exists, so of
        two writers exactly one wins). Object stores: a conditional PUT (``If-None-Match: *``), which S3
        and MinIO honour.
        """
        path = self.path(key)
        if self.local:
            def link(tmp: str, dst: str) -> bool:
                try:
                    os.link(tmp, dst)
                except FileExistsError:
                    return False
                return True

            return self._place(path, data, link)
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        except OSError as e:  # s3fs maps 412 Precondition Failed to EINVAL in some versions
            if e.errno == errno.EINVAL and "Precondition" in str(e):
                return False
            raise
        finally:
            self.fs.invalidate_cache(posixpath.dirname(path))
        return True

    def write_bytes(self, key: str, data: bytes) -> str:
        """Write ``data`` at ``key`` atomically; return the key."""
        path = self.path(key)
        if self.local:
            self._place(path, data, os.replace)
        else:
            # One PUT: object stores make the object visible whole or not at all.
            self.fs.pipe_file(path, data)
            self.fs.invalidate_cache(posixpath.dirname(path))
        return key

    def write_json(self, key: str, obj: Any) -> str:
        return self.write_bytes(key, json.dumps(obj, sort_keys=True, indent=1).encode("utf-8"))

    def put_object(self, data: bytes, ext: str, prefix: str = "objects") -> str:
        """Store ``data`` under its SHA-256 (``objects/ab/abcdef….ext``); skip if already there."""
        digest = sha256_bytes(data)
        key = f"{prefix}/{digest[:2]}/{digest}.{ext.lstrip('.')}"
        if not self.exists(key):
            self.write_bytes(key, data)
        return key

    def delete(self, key: str) -> None:
        path = self.path(key)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    # -- coordination ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Serialise writers of one non-content-addressed result (two runs of the same config at once).

        On a local disk (shared by every process of a machine) an exclusive ``flock`` on
        ``.locks/<name>.lock``; the second writer waits, then finds the result and skips the work.
        On object stores there is no lock: their writes are single atomic PUTs of identical,
        deterministic bytes, so two writers of one key cannot corrupt it (the work may be done twice).
        """
        if not self.local:
            yield
            return
        path = os.path.join(self.root, ".locks", check_key(name).replace("/", "__") + ".lock")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def clean_temporary(self, older_than_s: float = 3600.0) -> int:
        """Remove temporary files left by killed writers (local disks only); return how many."""
        if not self.local:
            return 0
        removed, now = 0, time.time()
        for dirpath, _, files in os.walk(self.root):
            for f in files:
                p = os.path.join(dirpath, f)
                if ".tmp-" in f and now - os.path.getmtime(p) > older_than_s:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(p)
                        removed += 1
        return removed
