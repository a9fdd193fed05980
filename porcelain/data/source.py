"""Where a run's dataset comes from: a user's manifest, or a built-in dataset written into the store.

Built-in datasets (:data:`BUILTIN`), selected by ``data.manifest``:

* ``sample`` – the procedural porcelain-like sample (:mod:`porcelain.data.sample`), no split column;
* ``digits`` – scikit-learn's 8×8 digit scans, few-shot and long-tailed, with a ``split`` column
  (:mod:`porcelain.data.digits`).
"""

from __future__ import annotations

import csv
import io
from typing import TYPE_CHECKING

from porcelain.data.digits import materialize_digits
from porcelain.data.sample import TASKS, plan_sample, png_bytes, render
from porcelain.errors import ConfigError
from porcelain.hashing import stable_hash
from porcelain.storage import Store

if TYPE_CHECKING:
    from porcelain.config import DataConfig

BUILTIN: tuple[str, ...] = ("sample", "digits")
"""Values of ``data.manifest`` that name a built-in dataset instead of a manifest file."""


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


def materialize_builtin(store: Store, data: DataConfig) -> dict[str, str]:
    """Write the built-in dataset that ``data.manifest`` names (see :data:`BUILTIN`) into ``store``, once.

    Returns ``{"manifest": URI, "root": URI}``. Raises :class:`ConfigError` for any other value.
    """
    if data.manifest == "sample":
        s = data.sample
        return materialize_sample(store, s.n, s.size, s.seed)
    if data.manifest == "digits":
        d = data.digits
        return materialize_digits(store, size=d.size, shots=d.shots, imbalance=d.imbalance, seed=d.seed)
    raise ConfigError(f"data.manifest {data.manifest!r} is not a built-in dataset; built-in ones are {list(BUILTIN)}")
