"""Pack shards are keyed by their own images: new manifest rows leave the full packs as they were,
a relabel decodes nothing, and a split reads back the same images whatever the layout."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from porcelain.data import ingest as ingest_mod
from porcelain.data.ingest import ingest_dataset, load_split, pack_data_shard, pack_key
from porcelain.data.images import decode_image, to_array
from porcelain.storage import Store


def _manifest(tmp_path: Path, n: int) -> tuple[Path, list[dict]]:
    from porcelain.data.sample import write_sample

    path = Path(write_sample(tmp_path / "data", n=n, size=16, seed=2))
    return path, list(csv.DictReader(io.StringIO(path.read_text())))


def _write(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    path.write_text(buf.getvalue())


def _pack_all(store, data, size) -> int:
    """Pack every shard; return how many images were decoded."""
    decoded = []
    real = ingest_mod.decode_image

    def counting(*a, **k):
        decoded.append(1)
        return real(*a, **k)

    ingest_mod.decode_image = counting
    try:
        for i in range(data["n_shards"]):
            pack_data_shard(store, data["data_hash"], i, data["n_shards"], size)
    finally:
        ingest_mod.decode_image = real
    return len(decoded)


def test_appended_rows_decode_only_the_last_pack_and_splits_read_back_in_record_order(tmp_path):
    manifest, rows = _manifest(tmp_path, 70)
    store = Store(str(tmp_path / "store"))
    kw = dict(val_fraction=0.2, test_fraction=0.2, min_images=10, shard_size=16)

    _write(manifest, rows[:50])
    first = ingest_dataset(store, str(manifest), None, **kw)
    assert first["n_shards"] == 4 and _pack_all(store, first, 16) == 50

    _write(manifest, rows)  # 20 new rows at the end: packs 0-2 (48 images) are unchanged
    second = ingest_dataset(store, str(manifest), None, **kw)
    assert second["data_hash"] != first["data_hash"] and second["n_shards"] == 5
    assert second["packs"][:3] == first["packs"][:3] and second["packs"][3] != first["packs"][3]
    decoded = _pack_all(store, second, 16)
    assert decoded == 70 - 48  # the last old pack (2 images, now 16) and the new one

    # a split comes back in record (sha256) order, each image its own file decoded
    meta = store.read_json(f"datasets/{second['data_hash']}/dataset.json")
    x, y = load_split(store, second["data_hash"], 16, second["n_shards"], "val")
    val = [r for r in meta["records"] if r["split"] == "val"]
    assert len(x) == len(val) == second["counts"]["val"] > 0
    for img, r in zip(x[:5], val[:5]):
        raw = (manifest.parent / r["image"]).read_bytes()
        assert np.array_equal(img, to_array(decode_image(raw), 16))
    assert [meta["classes"][t][v] for t, v in zip(meta["tasks"], y[0])] == [val[0]["labels"][t] for t in meta["tasks"]]

    # the same images, shuffled rows: the same data hash, the layout of its first ingest, nothing decoded
    _write(manifest, rows[::-1])
    again = ingest_dataset(store, str(manifest), None, **kw)
    assert again["data_hash"] == second["data_hash"] and again["packs"] == second["packs"]
    assert _pack_all(store, again, 16) == 0
    assert all(store.exists(pack_key(p, 16)) for p in again["packs"])


def test_a_relabelled_image_changes_the_dataset_but_decodes_nothing(tmp_path):
    manifest, rows = _manifest(tmp_path, 40)
    store = Store(str(tmp_path / "store"))
    kw = dict(val_fraction=0.2, test_fraction=0.2, min_images=10, shard_size=16)
    before = ingest_dataset(store, str(manifest), None, **kw)
    _pack_all(store, before, 16)
    task = next(k for k in rows[0] if k not in ("image", "split"))
    values = sorted({r[task] for r in rows})
    rows[0] = {**rows[0], task: next(v for v in values if v != rows[0][task])}
    _write(manifest, rows)
    after = ingest_dataset(store, str(manifest), None, **kw)
    assert after["data_hash"] != before["data_hash"] and after["packs"] == before["packs"]
    assert _pack_all(store, after, 16) == 0


def test_the_reference_is_keyed_by_the_splits_it_reads_not_by_the_data_hash(tmp_path):
    from porcelain.config import ReferenceConfig, RuntimeConfig
    from porcelain.data.ingest import splits_digest
    from porcelain.evaluate.reference import reference_key, reference_splits

    manifest, rows = _manifest(tmp_path, 60)
    store = Store(str(tmp_path / "store"))
    kw = dict(min_images=10, shard_size=16)
    for r in rows:
        r["split"] = "train" if int(r["image"][-9:-4]) % 3 == 0 else ("val" if int(r["image"][-9:-4]) % 3 == 1 else "test")
    _write(manifest, rows[:50])
    a = ingest_dataset(store, str(manifest), None, **kw)
    _write(manifest, [*rows[:50], *(r for r in rows[50:] if r["split"] == "train")])  # new train images only
    b = ingest_dataset(store, str(manifest), None, **kw)
    _write(manifest, rows)  # new val and test images too
    c = ingest_dataset(store, str(manifest), None, **kw)
    assert len({a["data_hash"], b["data_hash"], c["data_hash"]}) == 3
    on_val, on_all = ReferenceConfig(), ReferenceConfig(train_on="train+val")
    digest = {(h, s): splits_digest(store, h, s) for h in (a["data_hash"], b["data_hash"], c["data_hash"])
              for s in (reference_splits(on_val), reference_splits(on_all))}
    key = lambda h, cfg: reference_key(digest[h, reference_splits(cfg)], cfg, 16, RuntimeConfig())  # noqa: E731
    assert key(a["data_hash"], on_val) == key(b["data_hash"], on_val) != key(c["data_hash"], on_val)
    assert key(a["data_hash"], on_all) != key(b["data_hash"], on_all)
