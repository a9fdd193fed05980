"""Manifest checks found by users: case variants, one-class columns, UTF-16 manifests, pixel limits,
near-duplicates across splits; and the split of porcelain.data.manifest into focused modules."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from porcelain.config import DataConfig
from porcelain.data.images import MAX_PIXELS
from porcelain.data.ingest import ingest_dataset
from porcelain.data.manifest import FLAG_REASONS, read_manifest, validate
from porcelain.data.neardup import near_duplicate_pairs, perceptual_hash
from porcelain.errors import DataError
from porcelain.storage import Store


def _textured(seed: int, size: int = 64) -> np.ndarray:
    """A random picture with photo-like detail (16×16 random colours, upscaled): distinct for every seed.

    (Near-flat pictures are a poor test: the hash's high-frequency bits are noise there.)"""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "RGB")
    return np.asarray(small.resize((size, size), Image.Resampling.BICUBIC))


def _save(path: Path, arr: np.ndarray, fmt: str = "PNG", **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, fmt, **kw)


def _dataset(tmp_path: Path, header: list[str], label_rows: list[list[str]], *, name: str = "m.csv") -> Path:
    """One distinct smooth image per row: ``img/<i>.png`` plus the given label cells."""
    root = tmp_path
    rows = []
    for i, labels in enumerate(label_rows):
        _save(root / f"img/{i}.png", _textured(i))
        rows.append([f"img/{i}.png", *labels])
    m = root / name
    with m.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return m


# ---------------------------------------------------------------------------------------------- modules


def test_manifest_module_reexports_the_focused_modules():
    from porcelain.data import manifest, manifest_csv, quarantine, records, splits, validation

    assert manifest.validate is validation.validate
    assert manifest.read_manifest is manifest_csv.read_manifest
    assert manifest.ValidatedDataset is records.ValidatedDataset
    assert manifest.write_quarantine_csv is quarantine.write_quarantine_csv
    assert manifest.stratified_split is splits.stratified_split
    assert set(manifest.__all__) >= {"validate", "write_quarantine_csv", "ValidatedDataset", "QuarantineEntry",
                                     "Record", "QUARANTINE_REASONS", "read_manifest", "safe_relpath", "shard",
                                     "stratified_split", "SPLITS"}
    assert Path(manifest.__file__).read_text().count("\n") < 100


# ---------------------------------------------------------------------------------------------- case


def _case_rows() -> list[list[str]]:
    return [["ming"]] * 12 + [["Ming"]] * 4 + [["MING"]] * 1 + [["song"]] * 10


def test_case_variants_are_named_in_a_warning(tmp_path, caplog):
    m = _dataset(tmp_path, ["image", "dynasty"], _case_rows())
    with caplog.at_level(logging.WARNING, logger="porcelain"):
        ds = validate(str(m), str(tmp_path), min_images=5, near_duplicate_bits=None)
    assert ds.classes["dynasty"] == ["MING", "Ming", "ming", "song"]  # unchanged without fold_case
    (warning,) = ds.warnings
    assert "'dynasty'" in warning and "'ming' (12 rows), 'Ming' (4 rows), 'MING' (1 rows)" in warning
    assert "data.fold_case" in warning
    assert any("differing only in case" in r.getMessage() for r in caplog.records)


def test_fold_case_merges_into_the_most_frequent_spelling(tmp_path):
    m = _dataset(tmp_path / "a", ["image", "dynasty"], _case_rows())
    ds = validate(str(m), str(tmp_path / "a"), min_images=5, fold_case=True, near_duplicate_bits=None)
    assert ds.classes["dynasty"] == ["ming", "song"]
    assert ds.counts("dynasty", None) == [17, 10]
    assert "merged" in ds.warnings[0] and "'ming'" in ds.warnings[0]
    lower = _dataset(tmp_path / "b", ["image", "dynasty"], [[r[0].lower()] for r in _case_rows()])
    assert ds.content_hash() == validate(str(lower), str(tmp_path / "b"), min_images=5).content_hash()


def test_fold_case_with_given_classes_and_the_hint_without(tmp_path):
    m = _dataset(tmp_path, ["image", "dynasty"], _case_rows())
    classes = {"dynasty": ["ming", "song"]}
    ds = validate(str(m), str(tmp_path), classes=classes, min_images=5, near_duplicate_bits=None)
    unknown = [q for q in ds.quarantine if q.reason == "unknown_label"]
    assert len(unknown) == 5 and "differs only in case from 'ming'" in unknown[0].detail
    assert "data.fold_case: true" in unknown[0].detail
    ds = validate(str(m), str(tmp_path), classes=classes, min_images=5, fold_case=True, near_duplicate_bits=None)
    assert not ds.quarantine and ds.counts("dynasty", None) == [17, 10]
    assert DataConfig().fold_case is False and DataConfig(fold_case=True).fold_case


# ---------------------------------------------------------------------------------------------- one class


def test_a_single_valued_column_is_an_error_naming_it(tmp_path):
    m = _dataset(tmp_path, ["image", "glaze", "museum"], [[g, "V&A"] for g in ["celadon", "white"] * 12])
    with pytest.raises(DataError, match=r"column 'museum' has a single value 'V&A' in all 24 usable rows") as info:
        validate(str(m), str(tmp_path), min_images=5, near_duplicate_bits=None)
    assert "at least two classes" in str(info.value) and "lowercase" not in str(info.value)
    ds = validate(str(m), str(tmp_path), tasks=["glaze"], min_images=5, near_duplicate_bits=None)
    assert ds.tasks == ["glaze"]


@pytest.mark.parametrize("column,values", [("Split", ["train"] * 24), ("SPLIT", ["train", "test", "val"] * 8)])
def test_a_split_column_in_capitals_is_an_error_with_the_hint(tmp_path, column, values):
    m = _dataset(tmp_path, ["image", "glaze", column], [[g, v] for g, v in zip(["celadon", "white"] * 12, values)])
    with pytest.raises(DataError, match=rf"column '{column}' holds split names") as info:
        validate(str(m), str(tmp_path), min_images=5, near_duplicate_bits=None)
    assert "must be named 'split' in lowercase" in str(info.value)


def test_a_single_valued_split_lookalike_gets_the_hint(tmp_path):
    m = _dataset(tmp_path, ["image", "glaze", "Split"], [[g, "A"] for g in ["celadon", "white"] * 12])
    with pytest.raises(DataError, match=r"column 'Split' has a single value 'A'.*'split' in lowercase"):
        validate(str(m), str(tmp_path), min_images=5, near_duplicate_bits=None)


# ---------------------------------------------------------------------------------------------- UTF-16


TEXT = "image\tglaze\tdynasty\r\nok/0.png\t青花\tming\r\nok/1.png\tcéladon\tsong\r\n"
ROWS = [{"image": "ok/0.png", "glaze": "青花", "dynasty": "ming"},
        {"image": "ok/1.png", "glaze": "céladon", "dynasty": "song"}]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le-bom", "utf-16-be-bom", "utf-8-sig", "utf-32",
                                      "utf-16-le"])
def test_unicode_text_manifests_are_read(tmp_path, encoding):
    """Excel's "Unicode Text" is UTF-16 LE with a BOM and tabs; BOM-less UTF-16 is recognised too."""
    boms = {"utf-16-le-bom": ("utf-16-le", b"\xff\xfe"), "utf-16-be-bom": ("utf-16-be", b"\xfe\xff")}
    codec, bom = boms.get(encoding, (encoding, b""))
    m = tmp_path / "m.txt"
    m.write_bytes(bom + TEXT.encode(codec))
    header, rows = read_manifest(str(m))
    assert header == ["image", "glaze", "dynasty"] and rows == ROWS


def test_broken_utf16_names_the_encoding(tmp_path):
    m = tmp_path / "m.txt"
    m.write_bytes(b"\xff\xfe" + TEXT.encode("utf-16-le") + b"\x00\xd8")  # a lone high surrogate at the end
    with pytest.raises(DataError, match=r"marked as UTF-16 LE but is not valid UTF-16 LE at byte offset"):
        read_manifest(str(m))


# ---------------------------------------------------------------------------------------------- pixels


def test_max_megapixels_reaches_validation(tmp_path):
    m = _dataset(tmp_path, ["image", "glaze"], [["celadon"], ["white"]] * 12)
    _save(tmp_path / "img/3.png", _textured(3, 100))  # 100×100 = 10 000 pixels, the others 64×64 = 4096
    ds = validate(str(m), str(tmp_path), min_images=5, max_pixels=5_000, near_duplicate_bits=None)
    assert [(q.image, q.reason) for q in ds.quarantine] == [("img/3.png", "too_large")]
    assert ds.quarantine[0].detail == ("100×100 = 0.01 megapixels, above the limit of 0.005 megapixels "
                                       "(raise data.max_megapixels to accept it)")
    assert DataConfig().max_megapixels == 300 and MAX_PIXELS == 300_000_000


# ---------------------------------------------------------------------------------------------- near-dups


def _near_dup_dataset(tmp_path: Path) -> Path:
    """20 distinct images (train) + a brightened re-save of image 3 (test) + a JPEG of image 5 (train)."""
    rows = []
    for i in range(20):
        _save(tmp_path / f"img/{i}.png", _textured(i))
        rows.append([f"img/{i}.png", "a" if i % 2 else "b", "train" if i < 14 else "test" if i < 17 else "val"])
    bright = np.clip(_textured(3).astype(np.float64) * 1.08, 0, 255).astype(np.uint8)
    _save(tmp_path / "copies/3-bright.png", bright)
    rows.append(["copies/3-bright.png", "a", "test"])  # img/3 is in train: flagged
    _save(tmp_path / "copies/5.jpg", _textured(5), "JPEG", quality=85)
    rows.append(["copies/5.jpg", "a", "train"])  # img/5 is in train too: not flagged
    m = tmp_path / "m.csv"
    with m.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "kind", "split"])
        w.writerows(rows)
    return m


def test_near_duplicates_across_splits_are_flagged_not_dropped(tmp_path):
    m = _near_dup_dataset(tmp_path)
    ds = validate(str(m), str(tmp_path), min_images=5)
    assert len(ds.records) == 22 and not ds.quarantine  # nothing dropped
    assert ds.n_near_duplicates == 1
    (flag,) = ds.near_duplicates
    assert flag.reason == "near_duplicate_across_splits" and flag.reason in FLAG_REASONS
    assert flag.row == 21 and flag.image == "copies/3-bright.png"
    assert flag.detail.startswith("kept; looks like row 4 (img/3.png, in train) while this one is in test")
    assert "near_duplicate_across_splits" in " ".join(ds.warnings)
    none = validate(str(m), str(tmp_path), min_images=5, near_duplicate_bits=None)
    assert none.n_near_duplicates == 0 and none.content_hash() == ds.content_hash()


def test_ingest_reports_near_duplicates(tmp_path):
    m = _near_dup_dataset(tmp_path)
    store = Store(f"memory://neardup-{tmp_path.name}")
    summary = ingest_dataset(store, str(m), str(tmp_path), min_images=5, fold_case=True, max_megapixels=50)
    assert summary["n_near_duplicates"] == 1 and summary["n_quarantined"] == 0
    assert any("look alike" in w for w in summary["warnings"])
    rows = list(csv.DictReader(io.StringIO(store.read_bytes(summary["quarantine_key"]).decode())))
    assert [(r["row"], r["image"], r["reason"]) for r in rows] == [("21", "copies/3-bright.png",
                                                                     "near_duplicate_across_splits")]
    meta = store.read_json(f"datasets/{summary['data_hash']}/dataset.json")
    assert meta["max_pixels"] == 50_000_000


def test_perceptual_hash_ignores_re_encoding_and_tells_colours_apart():
    a = _textured(7, 128)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=80)
    h = [perceptual_hash(Image.fromarray(a)), perceptual_hash(Image.open(buf)),
         perceptual_hash(Image.fromarray(a).resize((64, 64))), perceptual_hash(Image.fromarray(_textured(8, 128)))]
    assert len(h[0].bits) == 32
    pairs = near_duplicate_pairs(h)
    assert {(i, j) for i, j, _ in pairs} == {(0, 1), (0, 2), (1, 2)}
    tinted = (a * np.array([1.0, 0.7, 0.4])).astype(np.uint8)
    recoloured = np.ascontiguousarray(tinted[:, :, ::-1])  # the same grey structure, another colour
    assert np.abs(np.asarray(Image.fromarray(tinted).convert("L"), float)
                  - np.asarray(Image.fromarray(recoloured).convert("L"), float)).mean() < 60
    assert not near_duplicate_pairs([perceptual_hash(Image.fromarray(tinted)),
                                     perceptual_hash(Image.fromarray(recoloured))], max_bits=256)
    assert near_duplicate_pairs([perceptual_hash(Image.fromarray(tinted))] * 2)
    assert near_duplicate_pairs(h, ["train", "test", "train", "val"]) == [
        (i, j, d) for i, j, d in pairs if (i, j) != (0, 2)]
