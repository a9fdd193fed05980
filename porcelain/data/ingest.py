"""Ingest: validate a dataset, record it in the store under its content hash, pack it into shards.

``ingest`` writes ``datasets/<data_hash>/dataset.json`` (records, tasks, classes, root) and a
``quarantine.csv``, and lays the images out in pack shards; ``pack_data_shard`` decodes one pack of
images at one resolution into a safetensors file of uint8 pixels, which training reads instead of
thousands of small files.

Packs are keyed by their own images, not by the dataset: a pack is the list of its images' sha256
(consecutive kept manifest rows, ``shard_size`` at a time) and lives at
``packs/<size>px/<hash of that list>.safetensors``. Appending rows to a manifest, as a museum does
when new images land, leaves every full pack as it was, so a rerun decodes only the last pack and the
new ones. Labels and splits are not in a pack (they come from ``dataset.json``), so relabelling or a
new split decodes nothing. The layout of a dataset is fixed by its first ingest
(``datasets/<data_hash>/packs.json``, written once), so every run of one dataset reads the same packs;
:func:`load_split` returns images in record (sha256) order whatever the layout.
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
from porcelain.hashing import canonical_safetensors, stable_hash
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
    packs = _layout(store, data_hash, pack_layout(ds.records, shard_size, max_pixels))
    buf = io.StringIO()
    write_quarantine_csv([*ds.quarantine, *ds.near_duplicates], buf)
    store.write_bytes(f"{base}/quarantine.csv", buf.getvalue().encode("utf-8"))
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
        "n_shards": len(packs),
        "packs": [p["id"] for p in packs],
    }


def pack_layout(records: list[Any], shard_size: int, max_pixels: int = MAX_PIXELS) -> list[dict[str, Any]]:
    """The packs of ``records``: consecutive kept manifest rows (by row, then sha256), ``shard_size`` at
    a time, each ``{"id", "sha256": [...]}`` with ``id`` a hash of its images and of how they are decoded."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    ordered = [r.sha256 for r in sorted(records, key=lambda r: (r.row, r.sha256))]
    out = []
    for i in range(0, len(ordered), shard_size):
        shas = ordered[i:i + shard_size]
        out.append({"id": stable_hash({"sha256": shas, "max_pixels": int(max_pixels)}, 24), "sha256": shas})
    return out or [{"id": stable_hash({"sha256": [], "max_pixels": int(max_pixels)}, 24), "sha256": []}]


def _layout(store: Store, data_hash: str, packs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The dataset's pack layout: the first ingest's (written once, create-if-absent), then read back."""
    import json

    key = f"{dataset_key(data_hash)}/packs.json"
    if not store.exists(key):
        store.create(key, json.dumps({"packs": packs}, sort_keys=True).encode("utf-8"))
    return store.read_json(key)["packs"]


def pack_key(pack_id: str, size: int) -> str:
    """Where the pack ``pack_id`` decoded at ``size`` px lives (shared by every dataset that holds it)."""
    return f"packs/{size}px/{pack_id}.safetensors"


def _packs(store: Store, data_hash: str) -> list[dict[str, Any]]:
    key = f"{dataset_key(data_hash)}/packs.json"
    if not store.exists(key):
        raise DataError(f"dataset {data_hash} has no pack layout ({key}); it was ingested by an older porcelain: "
                        "rerun the pipeline (ingest runs again)")
    return store.read_json(key)["packs"]


def pack_data_shard(store: Store, data_hash: str, shard_index: int, n_shards: int, size: int,
                    storage_options: dict | None = None) -> dict[str, Any]:
    """Decode pack ``shard_index`` of the dataset at ``size`` px into one safetensors file (nothing to
    do when another dataset, or an earlier run, already made it)."""
    packs = _packs(store, data_hash)
    if len(packs) != n_shards:
        raise ValueError(f"dataset {data_hash} has {len(packs)} packs, not {n_shards}")
    pack = packs[shard_index]
    key = pack_key(pack["id"], size)
    if store.exists(key):
        return {"key": key}
    meta = store.read_json(f"{dataset_key(data_hash)}/dataset.json")
    where = {r["sha256"]: r["image"] for r in meta["records"]}
    fs, root = fsspec.core.url_to_fs(meta["root"], **(storage_options or {}))
    images = np.zeros((len(pack["sha256"]), size, size, 3), dtype=np.uint8)
    for i, sha in enumerate(pack["sha256"]):
        data = fs.cat_file(posixpath.join(root.rstrip("/"), where[sha]))
        if hashlib.sha256(data).hexdigest() != sha:
            raise DataError(f"{where[sha]} changed after validation (sha256 differs); rerun to revalidate")
        images[i] = to_array(decode_image(data, max_pixels=int(meta.get("max_pixels", MAX_PIXELS))), size)
    blob = st_save({"images": images}, metadata={"pack": pack["id"], "size": str(size)})
    store.write_bytes(key, canonical_safetensors(blob))
    return {"key": key}


def splits_digest(store: Store, data_hash: str, splits: tuple[str, ...]) -> str:
    """A hash of what the records of ``splits`` hold (image sha256, labels), with the tasks and classes:
    equal for two datasets that differ only in other splits (new train images leave val and test as
    they were), so a stage that reads only these splits is keyed by it instead of the data hash."""
    meta = store.read_json(f"{dataset_key(data_hash)}/dataset.json")
    tasks = meta["tasks"]
    rows = sorted([r["sha256"], r["split"], [r["labels"][t] for t in tasks]] for r in meta["records"]
                  if r["split"] in splits)
    return stable_hash({"splits": sorted(splits), "tasks": tasks, "classes": {t: meta["classes"][t] for t in tasks},
                        "records": rows})


def split_ids(store: Store, data_hash: str, split: str) -> list[str]:
    """The sha256 of every image of one split, in the order :func:`load_split` returns them: the ids
    by which image-conditioned synthesizers name their source images."""
    meta = store.read_json(f"{dataset_key(data_hash)}/dataset.json")
    return [r["sha256"] for r in meta["records"] if r["split"] == split]


def load_split(store: Store, data_hash: str, size: int, n_shards: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All images (uint8 N×size×size×3) and labels (int64 N×T) of one split, in record (sha256) order,
    from the packs (``n_shards`` is checked against the layout)."""
    packs = _packs(store, data_hash)
    if len(packs) != n_shards:
        raise ValueError(f"dataset {data_hash} has {len(packs)} packs, not {n_shards}")
    meta = store.read_json(f"{dataset_key(data_hash)}/dataset.json")
    tasks, classes = meta["tasks"], meta["classes"]
    index = {t: {c: i for i, c in enumerate(classes[t])} for t in tasks}
    rows = [r for r in meta["records"] if r["split"] == split]
    wanted = {r["sha256"] for r in rows}
    found: dict[str, np.ndarray] = {}
    for p in packs:
        if not wanted.intersection(p["sha256"]):
            continue
        images = st_load(store.read_bytes(pack_key(p["id"], size)))["images"]
        if len(images) != len(p["sha256"]):
            raise DataError(f"pack {p['id']} at {size} px holds {len(images)} images, its layout {len(p['sha256'])}")
        for sha, img in zip(p["sha256"], images):
            if sha in wanted:
                found[sha] = img
    missing = wanted - found.keys()
    if missing:
        raise DataError(f"{len(missing)} {split} images of dataset {data_hash} are in no pack")
    x = np.stack([found[r["sha256"]] for r in rows]) if rows else np.zeros((0, size, size, 3), np.uint8)
    y = np.array([[index[t][r["labels"][t]] for t in tasks] for r in rows], dtype=np.int64).reshape(len(rows), len(tasks))
    return x, y
