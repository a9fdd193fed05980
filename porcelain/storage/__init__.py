"""Object storage: one URL (folder or s3://…), content-addressed keys, atomic writes."""

from porcelain.storage.store import Store, StorageError, sha256_bytes

__all__ = ["Store", "StorageError", "sha256_bytes"]
