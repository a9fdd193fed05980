"""New museum images: what is under a dataset's prefix now, what changed since the watermark, and
"what changed since the previous run" for a report.

A dataset is its manifest CSV and the files under its image root (a local folder or any fsspec URL,
``s3://`` included). :func:`take_snapshot` lists them and gives each image its sha256 (bytes are read
only for files whose size or stamp — ETag, mtime — differ from the last snapshot), and names the
whole state by one hash: the sha256 of a canonical JSON document of the manifest's hash and every
image's path and hash. :func:`diff` compares it with the stored watermark; :func:`claim` makes
"one snapshot, one run" hold across concurrent watchers (an atomic create-if-absent in the store).

Everything lives in the run's :class:`~porcelain.storage.Store` under ``watch/<dataset id>/``:

* ``watermark.json`` — the last snapshot seen (overwritten atomically);
* ``snapshots/ab/<sha256>.json`` — each snapshot, content-addressed;
* ``claims/<sha256>.json`` — written once per snapshot by the watcher that announces it.

No Prefect here: the watcher flow (flows/watcher.py) emits the event.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections import Counter
from datetime import datetime, timezone
from typing import Any

import fsspec
from pydantic import BaseModel, ConfigDict

from porcelain.errors import ConfigError
from porcelain.hashing import stable_hash
from porcelain.storage import Store

EVENT = "porcelain.images.landed"
"""The Prefect event the watcher emits when a dataset's snapshot changed."""

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp", ".gif"})


class FileEntry(BaseModel):
    """One image under the root: relative path, size, a cheap change stamp, and its sha256."""

    model_config = ConfigDict(frozen=True)
    path: str
    size: int
    stamp: str
    sha256: str


class Snapshot(BaseModel):
    """What a dataset's prefix holds at one moment, named by :attr:`hash`."""

    model_config = ConfigDict(frozen=True)
    dataset: str
    manifest: str
    root: str
    manifest_sha256: str | None
    images: list[FileEntry]
    taken_at: str

    def content(self) -> dict[str, Any]:
        """What the hash covers: the manifest's bytes and each image's path and bytes (not where the
        dataset lives, not sizes or stamps)."""
        return {"manifest_sha256": self.manifest_sha256, "images": {e.path: e.sha256 for e in self.images}}

    def content_bytes(self) -> bytes:
        return json.dumps(self.content(), sort_keys=True, separators=(",", ":")).encode("utf-8")

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.content_bytes()).hexdigest()


class Landed(BaseModel):
    """A change of a dataset's snapshot: what the watcher announces."""

    model_config = ConfigDict(frozen=True)
    dataset: str
    manifest: str
    manifest_sha256: str | None
    snapshot: str
    previous: str | None
    manifest_changed: bool
    added: list[str]
    removed: list[str]
    changed: list[str]

    def payload(self, snapshot_uri: str | None = None, limit: int = 50) -> dict[str, Any]:
        """The event's payload: addresses, hashes, counts, and at most ``limit`` names per list."""
        return {"dataset": self.dataset, "manifest": self.manifest, "manifest_sha256": self.manifest_sha256,
                "snapshot": self.snapshot, "snapshot_uri": snapshot_uri, "previous": self.previous,
                "manifest_changed": self.manifest_changed,
                "n_added": len(self.added), "n_removed": len(self.removed), "n_changed": len(self.changed),
                "added": self.added[:limit], "removed": self.removed[:limit], "changed": self.changed[:limit]}


# -- where --------------------------------------------------------------------------------------

def watched(manifest: str, root: str | None) -> tuple[str, str]:
    """The manifest URL and image root a watcher lists; a built-in dataset has nothing to watch."""
    from porcelain.data.ingest import default_root
    from porcelain.data.source import BUILTIN

    if manifest in BUILTIN:
        raise ConfigError(f"data.manifest is the built-in {manifest!r}: there is no prefix to watch for new images; "
                          "set data.manifest to a manifest CSV (a folder or s3:// URL)")
    return manifest, (root or default_root(manifest))


def dataset_id(manifest: str, root: str | None) -> str:
    """A stable name for a dataset's location (the event's resource id is ``porcelain.dataset.<id>``)."""
    manifest, root = watched(manifest, root)
    return stable_hash({"manifest": manifest.rstrip("/"), "root": root.rstrip("/")}, 16)


def resource_id(manifest: str, root: str | None = None) -> str:
    """The event's resource id, ``porcelain.dataset.<manifest URL>`` (readable in the UI and in a trigger's
    ``match``; the image root, when not the manifest's folder, is the resource's ``porcelain.root`` label)."""
    manifest, _ = watched(manifest, root)
    return f"porcelain.dataset.{manifest.rstrip('/')}"


def watch_prefix(dataset: str) -> str:
    return f"watch/{dataset}"


# -- listing ------------------------------------------------------------------------------------

def _stamp(info: dict[str, Any]) -> str:
    for k in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created"):
        if info.get(k) not in (None, ""):
            return str(info[k])
    return ""


def take_snapshot(manifest: str, root: str | None, storage_options: dict[str, Any] | None = None,
                  previous: Snapshot | None = None) -> Snapshot:
    """List the manifest and the images under ``root``; hash what is new or changed.

    An image's sha256 is taken from ``previous`` when its size and stamp are unchanged (so a watcher
    tick over a large, quiet collection reads no image bytes); otherwise its bytes are read. A missing
    manifest is ``manifest_sha256 = None`` (images may land before it).
    """
    manifest, root = watched(manifest, root)
    opts = storage_options or {}
    mfs, mpath = fsspec.core.url_to_fs(manifest, **opts)
    try:
        manifest_sha = hashlib.sha256(mfs.cat_file(mpath)).hexdigest()
    except FileNotFoundError:
        manifest_sha = None
    fs, rpath = fsspec.core.url_to_fs(root, **opts)
    rpath = rpath.rstrip("/")
    fs.invalidate_cache()
    try:
        listing = fs.find(rpath, detail=True)
    except FileNotFoundError:
        listing = {}
    known = {e.path: e for e in previous.images} if previous else {}
    entries: dict[str, tuple[int, str]] = {}
    for path, info in listing.items():
        if info.get("type") == "directory":
            continue
        rel = posixpath.relpath(path.rstrip("/"), rpath)
        name = posixpath.basename(rel)
        if ".tmp-" in name or posixpath.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
            continue
        entries[rel] = (int(info.get("size") or 0), _stamp(info))
    to_read = [rel for rel, (size, stamp) in entries.items()
               if not (rel in known and known[rel].size == size and known[rel].stamp == stamp and stamp)]
    blobs = fs.cat([posixpath.join(rpath, rel) for rel in to_read], on_error="return") if to_read else {}
    fresh: dict[str, str] = {}
    for rel in to_read:
        blob = blobs.get(posixpath.join(rpath, rel))
        if isinstance(blob, FileNotFoundError):  # removed between listing and reading
            continue
        if isinstance(blob, BaseException):
            raise blob
        fresh[rel] = hashlib.sha256(blob).hexdigest()
    images = []
    for rel in sorted(entries):
        if rel in fresh:
            images.append(FileEntry(path=rel, size=entries[rel][0], stamp=entries[rel][1], sha256=fresh[rel]))
        elif rel not in to_read:
            images.append(known[rel])
    return Snapshot(dataset=dataset_id(manifest, root), manifest=manifest, root=root, manifest_sha256=manifest_sha,
                    images=images, taken_at=datetime.now(timezone.utc).isoformat())


# -- watermark and claims -----------------------------------------------------------------------

def read_watermark(store: Store, dataset: str) -> Snapshot | None:
    key = f"{watch_prefix(dataset)}/watermark.json"
    if not store.exists(key):
        return None
    return Snapshot.model_validate(store.read_json(key))


def write_watermark(store: Store, snapshot: Snapshot) -> str:
    """Record ``snapshot`` as the last one seen (atomic overwrite) and keep it content-addressed;
    return the snapshot document's key."""
    key = store.put_object(snapshot.content_bytes(), "json", prefix=f"{watch_prefix(snapshot.dataset)}/snapshots")
    store.write_json(f"{watch_prefix(snapshot.dataset)}/watermark.json", snapshot.model_dump(mode="json"))
    return key


def snapshot_key(dataset: str, snapshot_hash: str) -> str:
    return f"{watch_prefix(dataset)}/snapshots/{snapshot_hash[:2]}/{snapshot_hash}.json"


def diff(previous: Snapshot | None, current: Snapshot) -> Landed | None:
    """What landed since ``previous`` (None: everything), or None when the snapshot is the same.

    A snapshot without a manifest announces nothing: images that land before their manifest are
    announced with it.
    """
    if current.manifest_sha256 is None:
        return None
    if previous is not None and previous.hash == current.hash:
        return None
    before = {e.path: e.sha256 for e in previous.images} if previous else {}
    now = {e.path: e.sha256 for e in current.images}
    return Landed(
        dataset=current.dataset, manifest=current.manifest, manifest_sha256=current.manifest_sha256,
        snapshot=current.hash, previous=previous.hash if previous else None,
        manifest_changed=previous is None or previous.manifest_sha256 != current.manifest_sha256,
        added=sorted(set(now) - set(before)), removed=sorted(set(before) - set(now)),
        changed=sorted(p for p in now if p in before and before[p] != now[p]))


def claim_key(dataset: str, snapshot_hash: str) -> str:
    return f"{watch_prefix(dataset)}/claims/{snapshot_hash}.json"


def create_if_absent(store: Store, key: str, data: bytes) -> bool:
    """Write ``data`` at ``key`` only if nothing is there; True for the one writer that did
    (:meth:`~porcelain.storage.store.Store.create`)."""
    return store.create(key, data)


def claim(store: Store, landed: Landed, by: str | None = None) -> bool:
    """Claim ``landed.snapshot`` for one announcement; False when someone already has."""
    return claim_landed(store, landed.payload(), by)


def seen_key(dataset: str, snapshot_hash: str) -> str:
    return f"{watch_prefix(dataset)}/seen/{snapshot_hash}.json"


def look(store: Store, manifest: str, root: str | None, storage_options: dict[str, Any] | None = None,
         limit: int = 50) -> dict[str, Any]:
    """One watcher tick: snapshot the prefix against the watermark and say what landed.

    Returns ``{"dataset", "resource_id", "snapshot", "snapshot_uri", "landed"}`` where ``landed`` is the
    event payload (:meth:`Landed.payload`) or None. A changed snapshot is kept under ``seen/`` until
    :func:`advance` makes it the watermark (after the announcement); an unchanged one whose stamps
    moved (files touched, not changed) refreshes the watermark at once, so the next tick reads nothing.
    """
    did = dataset_id(manifest, root)
    previous = read_watermark(store, did)
    current = take_snapshot(manifest, root, storage_options, previous)
    landed = diff(previous, current)
    snap_key = snapshot_key(did, current.hash)
    if landed is not None:
        store.put_object(current.content_bytes(), "json", prefix=f"{watch_prefix(did)}/snapshots")
        store.write_json(seen_key(did, current.hash), current.model_dump(mode="json"))
    elif previous is not None and previous.hash == current.hash and previous.images != current.images:
        store.write_json(f"{watch_prefix(did)}/watermark.json", current.model_dump(mode="json"))
    return {"dataset": did, "resource_id": resource_id(manifest, root), "snapshot": current.hash,
            "snapshot_uri": store.uri(snap_key),
            "landed": landed.payload(store.uri(snap_key), limit) if landed else None}


def advance(store: Store, dataset: str, snapshot_hash: str) -> bool:
    """Make the snapshot :func:`look` kept under ``seen/`` the watermark; False when there was none."""
    key = seen_key(dataset, snapshot_hash)
    if not store.exists(key):
        return False
    write_watermark(store, Snapshot.model_validate(store.read_json(key)))
    store.delete(key)
    return True


def claim_landed(store: Store, landed: dict[str, Any], by: str | None = None) -> bool:
    """:func:`claim` for a payload from :func:`look`."""
    doc = {"snapshot": landed["snapshot"], "manifest": landed["manifest"],
           "manifest_sha256": landed["manifest_sha256"], "previous": landed["previous"], "by": by,
           "at": datetime.now(timezone.utc).isoformat()}
    return create_if_absent(store, claim_key(landed["dataset"], landed["snapshot"]),
                            json.dumps(doc, sort_keys=True, indent=1).encode("utf-8"))


# -- what changed since the previous run (for the report) ---------------------------------------

def run_digest(data_hash: str, table: list[dict[str, Any]]) -> dict[str, Any]:
    """What a later run compares itself with (small: recorded, and passed to the report): the data hash
    and, per arm and task, the difference of test macro-F1 against the real-only baseline (the report's
    table rows). :func:`with_images` adds the dataset's images for :func:`changes_since`."""
    deltas: dict[str, dict[str, float | None]] = {}
    for row in table:
        if row.get("verdict") != "baseline":
            deltas.setdefault(str(row["arm"]), {})[str(row["task"])] = row.get("delta_macro_f1")
    return {"data_hash": data_hash, "deltas": deltas}


def with_images(store: Store, digest: dict[str, Any] | None) -> dict[str, Any] | None:
    """``digest`` with ``images`` (sha256 → split) read from its dataset's ``dataset.json``."""
    from porcelain.data.ingest import dataset_key

    if digest is None:
        return None
    meta = store.read_json(f"{dataset_key(digest['data_hash'])}/dataset.json")
    return {**digest, "images": {r["sha256"]: r["split"] for r in meta["records"]}}


def changes_since(previous: dict[str, Any] | None, current: dict[str, Any], moved: float = 0.0) -> dict[str, Any]:
    """What changed between two :func:`run_digest` results (each :func:`with_images`): images added and removed (per split) and,
    for every (arm, task) compared in both, how far its macro-F1 delta moved (``|moved| > moved`` kept).

    ``previous`` None means there is no earlier run to compare with (``first_run``).
    """
    if previous is None:
        return {"first_run": True, "data_changed": True, "n_added": len(current["images"]), "n_removed": 0,
                "added_by_split": dict(sorted(Counter(current["images"].values()).items())),
                "removed_by_split": {}, "deltas": [], "new_arms": sorted(current["deltas"]), "dropped_arms": []}
    before, now = previous["images"], current["images"]
    added = [h for h in now if h not in before]
    removed = [h for h in before if h not in now]
    rows = []
    for arm, tasks in sorted(current["deltas"].items()):
        for task, d in sorted(tasks.items()):
            p = previous["deltas"].get(arm, {}).get(task)
            if d is None or p is None:
                continue
            if abs(d - p) > moved:
                rows.append({"arm": arm, "task": task, "before": p, "after": d, "moved": round(d - p, 4)})
    return {"first_run": False, "previous_data_hash": previous["data_hash"],
            "data_changed": previous["data_hash"] != current["data_hash"],
            "n_added": len(added), "n_removed": len(removed),
            "added_by_split": dict(sorted(Counter(now[h] for h in added).items())),
            "removed_by_split": dict(sorted(Counter(before[h] for h in removed).items())),
            "deltas": sorted(rows, key=lambda r: -abs(r["moved"])),
            "new_arms": sorted(set(current["deltas"]) - set(previous["deltas"])),
            "dropped_arms": sorted(set(previous["deltas"]) - set(current["deltas"]))}


def changes_markdown(changes: dict[str, Any]) -> list[str]:
    """A report section ("Since the previous run") for :func:`changes_since`."""
    L = ["## Since the previous run", ""]
    if changes["first_run"]:
        return L + [f"First run of this deployment: {changes['n_added']} images "
                    f"({_splits(changes['added_by_split'])}); nothing to compare with.", ""]
    if not changes["data_changed"]:
        L.append(f"Same dataset as the previous run ({changes['previous_data_hash']}).")
    else:
        L.append(f"Dataset {changes['previous_data_hash']} → this run's: {changes['n_added']} images added "
                 f"({_splits(changes['added_by_split'])}), {changes['n_removed']} removed "
                 f"({_splits(changes['removed_by_split'])}).")
    for key, what in (("new_arms", "new arms"), ("dropped_arms", "arms no longer run")):
        if changes[key]:
            L.append(f"{what.capitalize()}: {', '.join(changes[key])}.")
    L.append("")
    if changes["deltas"]:
        L += ["| arm | task | Δ macro-F1 before | now | moved |", "|---|---|---|---|---|"]
        L += [f"| {r['arm']} | {r['task']} | {r['before']:+.3f} | {r['after']:+.3f} | {r['moved']:+.3f} |"
              for r in changes["deltas"]]
    else:
        L.append("No difference against the real-only baseline moved.")
    return L + [""]


def _splits(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


def history_key(series: str, digest_of: str) -> str:
    """Where the digest of a run is kept: ``history/<series>/<run identity>.json`` (``series`` names
    "the same deployment": config name and deployment, e.g. ``museum/museum-rerun``)."""
    return f"history/{series}/{digest_of}.json"


def previous_digest(store: Store, series: str, identity: str) -> dict[str, Any] | None:
    """The digest a run of ``identity`` compares itself with: the one recorded before it first ran
    (so rerunning the same inputs gives the same report, cache hit included), else the latest."""
    own = history_key(series, identity)
    if store.exists(own):
        return store.read_json(own).get("previous")
    latest = f"history/{series}/latest.json"
    if not store.exists(latest):
        return None
    doc = store.read_json(latest)
    return None if doc.get("identity") == identity else doc.get("digest")


def record_digest(store: Store, series: str, identity: str, digest: dict[str, Any]) -> None:
    """Record a finished run's digest: once per identity (with what it was compared with), and as
    the series' latest."""
    own = history_key(series, identity)
    if not store.exists(own):
        store.write_json(own, {"previous": previous_digest(store, series, identity), "digest": digest})
    store.write_json(f"history/{series}/latest.json", {"identity": identity, "digest": digest})


def series_of(name: str, deployment: str | None) -> str:
    """"The same deployment" as a store key: ``<config name>/<deployment name or cli>``."""
    clean = lambda s: "".join(c if c.isalnum() or c in "._-" else "_" for c in s).strip("._") or "_"  # noqa: E731
    return f"{clean(name)}/{clean(deployment or 'cli')}"


def run_identity(data_hash: str, config: dict[str, Any]) -> str:
    """What makes two runs "the same inputs": the data hash and the config, less where and how it runs."""
    return stable_hash({"data_hash": data_hash, "config": {k: v for k, v in config.items()
                                                           if k not in ("storage", "runtime")}}, 24)


def record_run(store: Store, series: str, identity: str, data_hash: str, report_key: str) -> dict[str, Any]:
    """Record a finished run (its report's ``table.json`` and dataset) for the next run to compare with."""
    digest = run_digest(data_hash, store.read_json(f"{report_key}/table.json")["rows"])
    record_digest(store, series, identity, digest)
    return {"series": series, "identity": identity, "data_hash": data_hash}
