"""Tests of porcelain.data.manifest and porcelain.report.csvsafe on a corpus of bad inputs."""

from __future__ import annotations

import csv
import io
import os
import random
import shutil
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from porcelain.data.manifest import (
    QUARANTINE_REASONS,
    Record,
    ValidatedDataset,
    read_manifest,
    safe_relpath,
    shard,
    stratified_split,
    validate,
    write_quarantine_csv,
)
from porcelain.data.sample import write_sample
from porcelain.errors import ConfigError, DataError
from porcelain.report.csvsafe import csv_safe, write_csv

CLASSES = {"kind": ["a", "b"], "glaze": ["x", "y"]}
FORMULA_IMAGE = "=cmd|' /C calc'!A0"
FORMULA_LABEL = '=HYPERLINK("http://evil.example","click")'


def _png(path: Path, seed: int, size: tuple[int, int] = (16, 16), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    if mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _write_manifest(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _good_rows(root: Path, n_per_group: int = 10, offset: int = 0) -> list[list[str]]:
    """``4 × n_per_group`` valid rows: image ok/<i>.png, kind ∈ {a, b} × glaze ∈ {x, y}."""
    rows = []
    i = offset
    for kind in ("a", "b"):
        for glaze in ("x", "y"):
            for _ in range(n_per_group):
                _png(root / f"ok/{i}.png", seed=i)
                rows.append([f"ok/{i}.png", kind, glaze])
                i += 1
    return rows


def _bomb_png() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (8, 8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", 30_000, 30_000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A root with 40 good images, 5 good-but-unusual ones and one of every kind of bad row."""
    base = tmp_path_factory.mktemp("corpus")
    root = base / "root"
    rows = _good_rows(root)
    expected: dict[str, str] = {}  # manifest image cell -> reason

    # Unusual but valid encodings: must pass.
    cmyk = io.BytesIO()
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(cmyk, "JPEG")
    (root / "modes").mkdir()
    (root / "modes/cmyk.jpg").write_bytes(cmyk.getvalue())
    Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)).save(root / "modes/i16.png")
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0, 0, 0] * 254)
    pal.paste(1, (4, 4, 12, 12))
    pal.save(root / "modes/pal.png", transparency=0)
    Image.new("LA", (16, 16), (90, 120)).save(root / "modes/la.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (24, 16), (10, 200, 30)).save(root / "modes/exif.jpg", exif=exif.tobytes())
    for name in ("cmyk.jpg", "i16.png", "pal.png", "la.png", "exif.jpg"):
        rows.append([f"modes/{name}", "a", "x"])

    # Bad files.
    (root / "bad").mkdir()
    good_png = _png(root / "bad/_src.png", seed=999, size=(64, 64))
    (root / "bad/_src.png").unlink()
    (root / "bad/trunc.png").write_bytes(good_png[: len(good_png) // 2])
    jpg = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpg, "JPEG")
    (root / "bad/trunc.jpg").write_bytes(jpg.getvalue()[: len(jpg.getvalue()) * 2 // 3])
    (root / "bad/empty.png").write_bytes(b"")
    (root / "bad/text.jpg").write_text("not a picture, just text\n")
    _png(root / "bad/tiny.png", seed=1, size=(1, 1))
    (root / "bad/bomb.png").write_bytes(_bomb_png())
    outside = base / "outside"
    _png(outside / "secret.png", seed=77)
    os.symlink(outside / "secret.png", root / "link_out.png")
    os.symlink(root / "ok/0.png", root / "link_in.png")  # a symlink inside the root is fine... but a dup
    (root / "dup").mkdir()
    shutil.copy(root / "ok/1.png", root / "dup/same.png")
    _png(root / "dup/conflict_a.png", seed=500)
    shutil.copy(root / "dup/conflict_a.png", root / "dup/conflict_b.png")
    _png(root / "lbl/unknown.png", seed=501)
    _png(root / "lbl/empty.png", seed=502)
    _png(root / "lbl/formula.png", seed=503)

    bad = [
        (["bad/trunc.png", "a", "x"], "truncated"),
        (["bad/trunc.jpg", "a", "x"], "truncated"),
        (["bad/empty.png", "a", "x"], "empty_file"),
        (["bad/text.jpg", "a", "x"], "not_an_image"),
        (["bad/tiny.png", "a", "x"], "too_small"),
        (["bad/bomb.png", "a", "x"], "too_large"),
        (["../outside/secret.png", "a", "x"], "path_escape"),
        (["ok/../../outside/secret.png", "a", "x"], "path_escape"),
        ([str(outside / "secret.png"), "a", "x"], "path_escape"),
        (["C:\\images\\x.png", "a", "x"], "path_escape"),
        (["s3://bucket/x.png", "a", "x"], "path_escape"),
        (["link_out.png", "a", "x"], "path_escape"),
        (["bad/nothere.png", "a", "x"], "missing_file"),
        (["bad", "a", "x"], "missing_file"),  # a directory
        ([FORMULA_IMAGE, "a", "x"], "missing_file"),
        (["", "a", "x"], "empty_path"),
        (["dup/same.png", "a", "x"], "duplicate_image"),  # same bytes and labels as ok/1.png
        (["dup/conflict_a.png", "a", "x"], "conflicting_duplicate"),
        (["dup/conflict_b.png", "b", "x"], "conflicting_duplicate"),
        (["lbl/unknown.png", "z", "x"], "unknown_label"),
        (["lbl/empty.png", "a", ""], "empty_label"),
        (["lbl/formula.png", FORMULA_LABEL, "x"], "unknown_label"),
    ]
    for row, reason in bad:
        rows.append(row)
        expected[row[0]] = reason
    rows.append(["ok/0.png", "b", "y"])  # same path as row 1 with other labels
    rows.append(["./ok//2.png", "a", "x"])  # normalises to ok/2.png
    rows.append(["ok/3.png", "a", "x", "stray"])  # an extra cell
    rows.append(["link_in.png", "a", "x"])  # resolves inside; same bytes as ok/0.png, same labels
    manifest = _write_manifest(base / "manifest.csv", ["image", "kind", "glaze"], rows)
    return {"base": base, "root": root, "manifest": manifest, "expected": expected, "n_rows": len(rows)}


def _validate(corpus, **kw):
    kw.setdefault("classes", CLASSES)
    kw.setdefault("min_images", 10)
    return validate(str(corpus["manifest"]), str(corpus["root"]), **kw)


# ---------------------------------------------------------------------------------------------- corpus


def test_every_bad_row_gets_its_reason_and_good_rows_pass(corpus):
    ds = _validate(corpus)
    got = {q.image: q.reason for q in ds.quarantine if q.image in corpus["expected"]}
    assert got == corpus["expected"]
    by_row = {q.row: q for q in ds.quarantine}
    n = corpus["n_rows"]
    assert by_row[n - 3].reason == "duplicate_row" and "row 1" in by_row[n - 3].detail
    assert by_row[n - 2].reason == "duplicate_row"  # ./ok//2.png is ok/2.png
    assert by_row[n - 1].reason == "bad_row"
    assert by_row[n].reason == "duplicate_image"  # link_in.png → ok/0.png bytes
    assert {q.reason for q in ds.quarantine} <= set(QUARANTINE_REASONS)
    # 40 good + 5 unusual modes, nothing else.
    assert len(ds.records) == 45
    assert {r.image for r in ds.records} >= {"modes/cmyk.jpg", "modes/i16.png", "modes/pal.png", "modes/la.png",
                                             "modes/exif.jpg", "ok/0.png", "ok/39.png"}
    assert ds.tasks == ["kind", "glaze"]
    assert ds.classes == {"kind": ["a", "b"], "glaze": ["x", "y"]}
    assert len(ds.quarantine) == len(corpus["expected"]) + 4
    assert ds.quarantine == sorted(ds.quarantine, key=lambda q: (q.row, q.reason))


def test_quarantine_csv_escapes_formulas(corpus, tmp_path):
    ds = _validate(corpus)
    out = tmp_path / "reports" / "quarantine.csv"
    write_quarantine_csv(ds.quarantine, str(out))
    rows = list(csv.DictReader(out.open(newline="", encoding="utf-8")))
    assert len(rows) == len(ds.quarantine)
    assert list(rows[0]) == ["row", "image", "reason", "detail"]
    images = [r["image"] for r in rows]
    assert "'" + FORMULA_IMAGE in images and FORMULA_IMAGE not in images
    for r in rows:
        for cell in r.values():
            assert not cell.startswith(("=", "+", "@", "\t", "\r")), cell
    formula_row = next(r for r in rows if r["image"] == "lbl/formula.png")
    assert formula_row["reason"] == "unknown_label" and FORMULA_LABEL in formula_row["detail"]
    # Same output through a binary file object.
    buf = io.BytesIO()
    write_quarantine_csv(ds.quarantine, buf)
    assert buf.getvalue() == out.read_bytes()


def test_progress_callback(corpus):
    calls = []
    _validate(corpus, on_record=lambda done, total, info: calls.append((done, total, info["quarantined"])))
    assert calls and calls[-1][0] == calls[-1][1]
    assert [c[0] for c in calls] == list(range(1, calls[-1][1] + 1))


# ---------------------------------------------------------------------------------------------- manifest


def test_missing_image_column(tmp_path):
    m = _write_manifest(tmp_path / "m.csv", ["path", "kind"], [["a.png", "a"]])
    with pytest.raises(DataError, match=r"no 'image' column.*\['path', 'kind'\]"):
        read_manifest(str(m))


def test_non_utf8_manifest_names_byte_offset(tmp_path):
    m = tmp_path / "m.csv"
    m.write_bytes("image,glaze\nok/0.png,青花\n".encode("gb18030"))
    with pytest.raises(DataError, match=r"byte offset 21.*UTF-8") as info:
        read_manifest(str(m))
    assert "line 2" in str(info.value)


def test_bom_whitespace_blank_lines_and_semicolons(tmp_path):
    m = tmp_path / "m.csv"
    m.write_bytes("\ufeff image , glaze \r\n ok/0.png ,  青花 \r\n\r\nok/1.png,celadon\r\n".encode())
    header, rows = read_manifest(str(m))
    assert header == ["image", "glaze"]
    assert rows == [{"image": "ok/0.png", "glaze": "青花"}, {"image": "ok/1.png", "glaze": "celadon"}]
    m.write_text("image;glaze\nok/0.png;white\n", encoding="utf-8")
    assert read_manifest(str(m))[1] == [{"image": "ok/0.png", "glaze": "white"}]


def test_missing_task_column_and_bad_arguments(corpus):
    with pytest.raises(DataError, match="'dynasty'"):
        _validate(corpus, tasks=["kind", "dynasty"])
    with pytest.raises(ConfigError):
        _validate(corpus, classes={"dynasty": ["song"]})
    with pytest.raises(ConfigError):
        _validate(corpus, val_fraction=0.6, test_fraction=0.5)


def test_tasks_subset(corpus):
    ds = _validate(corpus, tasks=["glaze"], classes=None)
    assert ds.tasks == ["glaze"] and ds.label_matrix().shape == (len(ds.records), 1)
    # Without 'kind', the conflicting copies agree on their labels: one kept, the other a duplicate.
    reasons = {q.image: q.reason for q in ds.quarantine}
    assert reasons["dup/conflict_b.png"] == "duplicate_image" and "dup/conflict_a.png" not in reasons
    # Without classes the 'z' and formula labels are accepted as classes of their own.
    ds2 = _validate(corpus, classes=None)
    assert "z" in ds2.classes["kind"] and FORMULA_LABEL in ds2.classes["kind"]


def test_safe_relpath():
    assert safe_relpath("images/a.png") == ("images/a.png", None)
    assert safe_relpath("./images//b.png")[0] == "images/b.png"
    assert safe_relpath("images\\c.png")[0] == "images/c.png"
    for bad in ("/etc/passwd", "../x.png", "a/../../x.png", "C:/x.png", "c:x.png", "\\\\server\\share\\x.png",
                "s3://b/k.png", "file:///etc/passwd", "~/x.png", "a\x00b.png"):
        path, problem = safe_relpath(bad)
        assert path is None and problem is not None and problem[0] == "path_escape", bad
    assert safe_relpath("")[1][0] == "empty_path"


def test_explicit_split_column_and_bad_split(tmp_path):
    root = tmp_path / "root"
    rows = _good_rows(root, n_per_group=8)
    splits = (["train"] * 5 + ["Val", "test", "validation"]) * 4
    rows = [r + [s] for r, s in zip(rows, splits)]
    _png(root / "extra.png", seed=1000)
    rows.append(["extra.png", "a", "x", "holdout"])
    m = _write_manifest(tmp_path / "m.csv", ["image", "kind", "glaze", "split"], rows)
    ds = validate(str(m), str(root), min_images=10)
    assert ds.tasks == ["kind", "glaze"]  # 'split' is not a task
    assert Counter(r.split for r in ds.records) == {"train": 20, "val": 8, "test": 4}
    assert [(q.image, q.reason) for q in ds.quarantine] == [("extra.png", "bad_split")]


def test_not_enough_images_error_lists_counts(corpus):
    with pytest.raises(DataError) as info:
        _validate(corpus, min_images=1000)
    msg = str(info.value)
    assert "45 valid" in msg and "quarantined" in msg and "truncated: 2" in msg and "train" in msg


def test_all_missing_hints_at_root(corpus, tmp_path):
    with pytest.raises(DataError, match="is the image root right"):
        validate(str(corpus["manifest"]), str(tmp_path), classes=CLASSES)


# ---------------------------------------------------------------------------------------------- splits


def _split_dataset(tmp_path: Path, seed_rows: int = 0) -> tuple[Path, Path, list[list[str]]]:
    root = tmp_path / "root"
    rows = _good_rows(root, n_per_group=20)
    _png(root / "rare/one.png", seed=2000)
    _png(root / "rare/two_a.png", seed=2001)
    _png(root / "rare/two_b.png", seed=2002)
    rows += [["rare/one.png", "c", "x"], ["rare/two_a.png", "c", "y"], ["rare/two_b.png", "c", "y"]]
    return root, _write_manifest(tmp_path / "m.csv", ["image", "kind", "glaze"], rows), rows


def test_stratified_split_is_seeded_and_independent_of_row_order(tmp_path):
    root, m, rows = _split_dataset(tmp_path)
    ds = validate(str(m), str(root))
    first = {r.image: r.split for r in ds.records}
    shuffled = rows[:]
    random.Random(3).shuffle(shuffled)
    m2 = _write_manifest(tmp_path / "m2.csv", ["image", "kind", "glaze"], shuffled)
    ds2 = validate(str(m2), str(root))
    assert {r.image: r.split for r in ds2.records} == first
    assert ds2.content_hash() == ds.content_hash()
    assert [r.sha256 for r in ds2.records] == [r.sha256 for r in ds.records]
    # Per group of 20: 4 test, 3 val, 13 train; rare groups entirely in train.
    for kind in ("a", "b"):
        for glaze in ("x", "y"):
            c = Counter(r.split for r in ds.records if r.labels == {"kind": kind, "glaze": glaze})
            assert c == {"train": 13, "val": 3, "test": 4}
    assert all(first[p] == "train" for p in ("rare/one.png", "rare/two_a.png", "rare/two_b.png"))
    other = {r.image: r.split for r in validate(str(m), str(root), seed=1).records}
    assert other != first and Counter(other.values()) == Counter(first.values())


def test_stratified_split_totals_match_fractions_with_many_small_groups():
    keys = [(f"g{i % 30}",) for i in range(120)]  # 30 groups of 4
    ids = [f"id{i}" for i in range(120)]
    out = stratified_split(keys, ids, val_fraction=0.15, test_fraction=0.2, seed=0)
    c = Counter(out)
    assert c == {"test": 24, "val": 18, "train": 78}
    for g in range(30):
        assert "train" in [s for k, s in zip(keys, out) if k == (f"g{g}",)]
    perm = list(range(120))
    random.Random(0).shuffle(perm)
    out2 = stratified_split([keys[i] for i in perm], [ids[i] for i in perm], seed=0)
    assert [out2[perm.index(i)] for i in range(120)] == out


# ---------------------------------------------------------------------------------------------- hashes


def test_content_hash_survives_a_move_and_changes_with_a_label(tmp_path):
    root, m, rows = _split_dataset(tmp_path / "a")
    h = validate(str(m), str(root)).content_hash()
    moved = tmp_path / "elsewhere" / "deeper"
    shutil.copytree(tmp_path / "a", moved)
    shutil.rmtree(tmp_path / "a")
    ds_moved = validate(str(moved / "m.csv"), str(moved / "root"))
    assert ds_moved.content_hash() == h
    changed = [r[:] for r in rows]
    changed[0][2] = "y" if changed[0][2] == "x" else "x"
    m3 = _write_manifest(moved / "m3.csv", ["image", "kind", "glaze"], changed)
    assert validate(str(m3), str(moved / "root")).content_hash() != h
    assert validate(str(moved / "m.csv"), str(moved / "root"), seed=5).content_hash() != h  # splits changed


def test_label_matrix_counts_and_shards(tmp_path):
    root, m, _ = _split_dataset(tmp_path)
    ds = validate(str(m), str(root))
    assert ds.classes == {"kind": ["a", "b", "c"], "glaze": ["x", "y"]}
    lm = ds.label_matrix("train")
    assert lm.dtype == np.int64 and lm.shape == (len(ds.split_records("train")), 2)
    assert ds.counts("kind") == [26, 26, 3]
    assert ds.counts("kind", split=None) == [40, 40, 3]
    assert sum(ds.counts("glaze", "val")) == len(ds.split_records("val"))
    assert np.bincount(lm[:, 0], minlength=3).tolist() == ds.counts("kind")
    shards = shard(list(reversed(ds.records)), 16)
    assert [len(s) for s in shards] == [16] * 5 + [3]
    flat = [r.sha256 for s in shards for r in s]
    assert flat == sorted(flat)
    with pytest.raises(ValueError):
        shard(ds.records, 0)


def test_content_hash_ignores_paths():
    r1 = Record(image="a/1.png", labels={"t": "x"}, split="train", sha256="00")
    r2 = Record(image="b/other.png", labels={"t": "x"}, split="train", sha256="00")
    a = ValidatedDataset([r1], ["t"], {"t": ["x"]})
    b = ValidatedDataset([r2], ["t"], {"t": ["x"]}, manifest_sha256="different")
    assert a.content_hash() == b.content_hash()


# ---------------------------------------------------------------------------------------------- sample


def test_builtin_sample_validates_cleanly(tmp_path):
    manifest = write_sample(tmp_path, n=200, size=32)
    ds = validate(str(manifest), str(tmp_path))
    assert ds.quarantine == []
    assert ds.tasks == ["dynasty", "kiln", "glaze", "type"]
    assert len(ds.records) == 200
    c = Counter(r.split for r in ds.records)
    assert c["train"] >= 100 and c["val"] > 0 and c["test"] > 0
    assert len(ds.manifest_sha256) == 64


# ---------------------------------------------------------------------------------------------- csvsafe


@pytest.mark.parametrize("value,expected", [
    ("=1+1", "'=1+1"), ("+cmd", "'+cmd"), ("-2+3", "'-2+3"), ("@SUM(A1)", "'@SUM(A1)"),
    ("\tx", "'\tx"), ("\rx", "'\rx"), ("\uff1d1+1", "'\uff1d1+1"),
    ("-1.5", "-1.5"), ("+3", "+3"), ("-2e5", "-2e5"), ("celadon", "celadon"), ("a=b", "a=b"),
    (None, ""), (3, "3"), (-0.25, "-0.25"), ("", ""),
])
def test_csv_safe(value, expected):
    assert csv_safe(value) == expected


def test_write_csv_escapes_header_and_cells():
    buf = io.StringIO(newline="")
    write_csv([{"=task": FORMULA_LABEL, "n": -3}, {"n": 4}], buf, ["=task", "n"])
    rows = list(csv.reader(io.StringIO(buf.getvalue())))
    assert rows == [["'=task", "n"], ["'" + FORMULA_LABEL, "-3"], ["", "4"]]
    with pytest.raises(ValueError):
        write_csv([{"other": 1}], io.StringIO(), ["n"])


# ---------------------------------------------------------------------------------------------- fsspec


def test_remote_root_through_fsspec(tmp_path):
    """Any fsspec URL works as manifest and root (memory:// stands in for s3:// here)."""
    import fsspec

    root, m, rows = _split_dataset(tmp_path)
    fs = fsspec.filesystem("memory")
    base = f"/porcelain-test-{os.getpid()}-{id(tmp_path)}"
    try:
        for r in rows:
            fs.pipe_file(f"{base}/root/{r[0]}", (root / r[0]).read_bytes())
        bad = [["missing.png", "a", "x"], ["../escape.png", "a", "x"]]
        fs.pipe_file(f"{base}/m.csv", m.read_bytes() + b"".join(f"{','.join(b)}\n".encode() for b in bad))
        ds = validate(f"memory://{base}/m.csv", f"memory://{base}/root", read_workers=2)
        assert ds.content_hash() == validate(str(m), str(root)).content_hash()
        assert [(q.image, q.reason) for q in ds.quarantine] == [("missing.png", "missing_file"),
                                                               ("../escape.png", "path_escape")]
        write_quarantine_csv(ds.quarantine, f"memory://{base}/out/q.csv")
        assert fs.cat_file(f"{base}/out/q.csv").startswith(b"row,image,reason,detail")
    finally:
        fs.rm(base, recursive=True)
