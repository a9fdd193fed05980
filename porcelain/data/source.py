"""Where a run's dataset comes from: a user's manifest, or the built-in sample written into the store."""

from __future__ import annotations

import csv
import io

from porcelain.data.sample import TASKS, plan_sample, png_bytes, render
from porcelain.hashing import stable_hash
from porcelain.storage import Store


def materialize_sample(store: Store, n: int, size: int, seed: int) -> dict[str, str]:
    """Write the built-in sample under ``samples/<hash>/`` (once) and return its manifest and root URIs."""
    base = f"samples/{stable_hash({'n': n, 'size': size, 'seed': seed, 'v': 1})}"
    manifest = f"{base}/manifest.csv"
    if not store.exists(manifest):
        rows = []
        for item in plan_sample(n, seed):
            name = f"images/{item.index:05d}.png"
            store.write_bytes(f"{base}/{name}", png_bytes(render(item.labels, size, item.seed)))
            rows.append({"image": name, **item.labels})
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["image", *TASKS], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        store.write_bytes(manifest, buf.getvalue().encode("utf-8"))  # last: the sample exists once this does
    return {"manifest": store.uri(manifest), "root": store.uri(base)}
