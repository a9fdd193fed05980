"""Ingest: validate a dataset, record it in the store under its content hash, pack it into shards.

``ingest`` writes ``datasets/<data_hash>/dataset.json`` (records, tasks, classes, quarantine) and a
``quarantine.csv``; ``pack_shard`` decodes one shard of images at one resolution into a safetensors
file of uint8 pixels and int64 labels, which training reads instead of thousands of small files.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
from collections import Counter
from typing import Any

import fsspec
import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from porcelain.data.images import MAX_PIXELS, decode_image, to_array
from porcelain.data.neardup import NEAR_DUPLICATE_BITS
from porcelain.data.quarantine import write_quarantine_csv
from porcelain.data.records import SPLITS, ValidatedDataset
from porcelain.data.validation import validate
from porcelain.errors import DataError
from porcelain.hashing import canonical_safetensors
from porcelain.storage import Store



def default_root(manifest: str) -> str:
    return posixpath.dirname(manifest.rstrip("/")) or "."


def fingerprint(manifest: str, root: str, storage_options: dict | None = None) -> str:
    """A cheap content fingerprint of a dataset: the manifest's bytes and the root's file listing.

    Used as the cache key of validation: a new or replaced image (size, mtime or ETag) or an edited
    manifest changes it; moving the dataset elsewhere does not.
    """
    fs, mpath = fsspec.core.url_to_fs(manifest, **(storage_options or {}))
    h = hashlib.sha256(fs.cat_file(mpath))
    rfs, rpath = fsspec.core.url_to_fs(root, **(storage_options or {}))
    rpath = rpath.rstrip("/")
    try:
        listing = rfs.find(rpath, detail=True)
    except FileNotFoundError:
        listing = {}
    for path in sorted(listing):
        info = listing[path]
        rel = posixpath.relpath(path, rpath)
        stamp = info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""
        h.update(f"{rel}|{info.get('size')}|{stamp}\n".encode())
    return h.hexdigest()[:16]


def dataset_key(data_hash: str) -> str:
    return f"datasets/{data_hash}"


def ingest_dataset(
    store: Store,
    manifest: str,
    root: str | None,
    *,
    tasks: list[str] | None = None,
    classes: dict[str, list[str]] | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    min_images: int = 20,
    shard_size: int = 512,
    storage_options: dict | None = None,
    fold_case: bool = False,
    max_megapixels: float = MAX_PIXELS / 1e6,
    near_duplicate_bits: int | None = NEAR_DUPLICATE_BITS,
) -> dict[str, Any]:
    """Validate, quarantine, split; record the dataset in the store. Returns a small summary.

    ``quarantine.csv`` lists the rows set aside and, after them, the kept rows flagged as
    ``near_duplicate_across_splits``. The summary's ``n_quarantined`` counts the former only,
    ``n_near_duplicates`` the flagged pairs, and ``warnings`` holds sentences worth showing.
    """
    root = root or default_root(manifest)
    max_pixels = int(max_megapixels * 1_000_000)
    ds: ValidatedDataset = validate(
        manifest, root, tasks=tasks, classes=classes, val_fraction=val_fraction,
        test_fraction=test_fraction, seed=split_seed, min_images=min_images, storage_options=storage_options,
        max_pixels=max_pixels, fold_case=fold_case, near_duplicate_bits=near_duplicate_bits,
    )
    data_hash = ds.content_hash()[:16]
    base = dataset_key(data_hash)
    records = sorted(ds.records, key=lambda r: (r.sha256, r.image))
    store.write_json(f"{base}/dataset.json", {
        "data_hash": data_hash,
        "tasks": ds.tasks,
        "classes": ds.classes,
        "root": root,
        "max_pixels": max_pixels,
        "records": [{"image": r.image, "sha256": r.sha256, "labels": r.labels, "split": r.split} for r in records],
    })
    buf = io.StringIO()
    write_quarantine_csv([*ds.quarantine, *ds.near_duplicates], buf)
    store.write_bytes(f"{base}/quarantine.csv", buf.getvalue().encode("utf-8"))
    n_shards = max(1, -(-len(records) // shard_size))
    return {
        "data_hash": data_hash,
        "tasks": ds.tasks,
        "classes": ds.classes,
        "counts": {s: int(sum(r.split == s for r in records)) for s in SPLITS},
        "train_counts": [ds.counts(t, "train") for t in ds.tasks],
        "n_quarantined": len(ds.quarantine),
        "quarantine_reasons": dict(Counter(q.reason for q in ds.quarantine)),
        "quarantine_key": f"{base}/quarantine.csv",
        "n_near_duplicates": ds.n_near_duplicates,
        "warnings": list(ds.warnings),
        "shard_size": shard_size,
        "n_shards": n_shards,
    }


def packed_key(data_hash: str, size: int, shard_index: int, n_shards: int) -> str:
    return f"{dataset_key(data_hash)}/packed/{size}px/{shard_index:05d}-of-{n_shards:05d}.safetensors"


def pack_data_shard(store: Store, data_hash: str, shard_index: int, n_shards: int, size: int,
               storage_options: dict | None = None) -> dict[str, Any]:
    """Decode shard ``shard_index`` of the dataset at ``size`` px into one safetensors file."""
    key = packed_key(data_hash, size, shard_index, n_shards)
    if store.exists(key):
        return {"key": key}
    meta = store.read_json(f"{dataset_key(data_hash)}/dataset.json")
    records = meta["records"]
    per = -(-len(records) // n_shards)
    part = records[shard_index * per:(shard_index + 1) * per]
    fs, root = fsspec.core.url_to_fs(meta["root"], **(storage_options or {}))
    tasks, classes = meta["tasks"], meta["classes"]
    images = np.zeros((len(part), size, size, 3), dtype=np.uint8)
    labels = np.zeros((len(part), len(tasks)), dtype=np.int64)
    split = np.zeros((len(part),), dtype=np.uint8)
    for i, r in enumerate(part):
        data = fs.cat_file(posixpath.join(root.rstrip("/"), r["image"]))
        if hashlib.sha256(data).hexdigest() != r["sha256"]:
            raise DataError(f"{r['image']} changed after validation (sha256 differs); rerun to revalidate")
        images[i] = to_array(decode_image(data, max_pixels=int(meta.get("max_pixels", MAX_PIXELS))), size)
        labels[i] = [classes[t].index(r["labels"][t]) for t in tasks]
        split[i] = SPLITS.index(r["split"])
    blob = st_save({"images": images, "labels": labels, "split": split},
                   metadata={"data_hash": data_hash, "size": str(size)})
    store.write_bytes(key, canonical_safetensors(blob))
    return {"key": key}


def split_ids(store: Store, data_hash: str, split: str) -> list[str]:
    """The sha256 of every image of one split, in the order :func:`load_split` returns them: the ids
    by which image-conditioned synthesizers name their source images."""
    meta = store.read_json(f"{dataset_key(data_hash)}/dataset.json")
    return [r["sha256"] for r in meta["records"] if r["split"] == split]


def load_split(store: Store, data_hash: str, size: int, n_shards: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All images and labels of one split, from the packed shards."""
    imgs, labs = [], []
    for i in range(n_shards):
        arrays = st_load(store.read_bytes(packed_key(data_hash, size, i, n_shards)))
        m = arrays["split"] == SPLITS.index(split)
        imgs.append(arrays["images"][m])
        labs.append(arrays["labels"][m])
    return np.concatenate(imgs), np.concatenate(labs)


