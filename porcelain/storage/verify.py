"""Check a store's integrity: content-addressed objects match their names, shard manifests are whole
and point at objects that exist. Used after faults (killed runs, outages, concurrent runs)."""

from __future__ import annotations

import hashlib
import json
import posixpath

from porcelain.storage.store import Store


def verify_store(store: Store) -> list[str]:
    """Problems found (empty when the store is sound)."""
    problems: list[str] = []
    objects = set(store.list("objects"))
    for key in sorted(objects):
        digest = posixpath.basename(key).split(".")[0]
        if hashlib.sha256(store.read_bytes(key)).hexdigest() != digest:
            problems.append(f"{key}: content does not match its name")
    for key in store.list("synthetic"):
        if not key.endswith(".json"):
            continue
        try:
            manifest = json.loads(store.read_bytes(key))
        except ValueError as e:
            problems.append(f"{key}: unreadable shard manifest ({e})")
            continue
        images = manifest.get("images", [])
        if len(images) != manifest.get("provenance", {}).get("count"):
            problems.append(f"{key}: {len(images)} images but provenance says {manifest.get('provenance', {}).get('count')}")
        for im in images:
            if im["key"] not in objects:
                problems.append(f"{key}: missing object {im['key']}")
    return problems
