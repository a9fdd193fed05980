"""Validation: every row of a manifest checked against its image root, bad rows quarantined with a reason.

:func:`validate` reads every image once, and returns a :class:`~porcelain.data.records.ValidatedDataset`:
the usable records, the discovered tasks and classes, and a quarantine list with one
:class:`~porcelain.data.records.QuarantineEntry` per rejected row (see
:data:`~porcelain.data.quarantine.QUARANTINE_REASONS`). One bad row never stops the run; too few
good rows do, with a :class:`~porcelain.errors.DataError` that says what was wrong.

Label checks (:mod:`porcelain.data.labels`): spellings that differ only in case are named in a
warning, or merged with ``fold_case``; a task with fewer than two classes, or a ``Split`` column that
would become a task, is a :class:`~porcelain.errors.DataError`. Kept images that look alike across
splits (:mod:`porcelain.data.neardup`) are flagged in ``ValidatedDataset.near_duplicates``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from porcelain.data.images import MAX_PIXELS, ImageError, decode_image
from porcelain.data.labels import (
    case_variants,
    check_split_lookalikes,
    check_tasks_have_classes,
    describe_variants,
    fold_map,
)
from porcelain.data.manifest_csv import load_manifest
from porcelain.data.neardup import NEAR_DUPLICATE_BITS, PerceptualHash, near_duplicate_pairs, perceptual_hash
from porcelain.data.paths import safe_relpath
from porcelain.data.records import SPLITS, QuarantineEntry, Record, ValidatedDataset
from porcelain.data.splits import SPLIT_ALIASES, check_fractions, stratified_split
from porcelain.errors import ConfigError, DataError

__all__ = ["ProgressFn", "validate"]

_RESERVED = ("image", "split")
log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, dict], None]


@dataclass
class _Pending:
    row: int
    raw_image: str
    image: str
    labels: dict[str, str]
    split: str


@dataclass
class _ImageResult:
    sha256: str | None
    reason: str | None = None
    detail: str = ""
    phash: PerceptualHash | None = None


def _check_image(fs: Any, root_path: str, root_real: str | None, rel: str, min_side: int,
                 max_pixels: int, want_phash: bool = False) -> _ImageResult:
    """Read one image through ``fs``, hash it, verify that it decodes, and (optionally) its perceptual hash."""
    full = f"{root_path.rstrip('/')}/{rel}"
    if root_real is not None:  # local root: resolve symlinks and make sure we stay inside
        real = os.path.realpath(full)
        if real != root_real and not real.startswith(root_real.rstrip(os.sep) + os.sep):
            return _ImageResult(None, "path_escape", "resolves (through a symlink) outside the image root")
        full = real
    try:
        data = fs.cat_file(full)
    except FileNotFoundError:
        return _ImageResult(None, "missing_file", f"no such file under the image root: {rel}")
    except IsADirectoryError:
        return _ImageResult(None, "missing_file", f"{rel} is a directory, not an image file")
    except PermissionError as exc:
        return _ImageResult(None, "unreadable", f"permission denied: {exc}")
    except OSError as exc:
        return _ImageResult(None, "unreadable", f"{type(exc).__name__}: {exc}")
    sha = hashlib.sha256(data).hexdigest()
    try:
        img = decode_image(data, min_side=min_side, max_pixels=max_pixels)
    except ImageError as exc:
        return _ImageResult(sha, exc.reason, exc.detail)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a property of this one file
        return _ImageResult(sha, "corrupt", f"{type(exc).__name__}: {exc}")
    try:
        phash = perceptual_hash(img) if want_phash else None
    finally:
        img.close()
    return _ImageResult(sha, phash=phash)


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i: i + size]


def validate(
    manifest: str,
    root: str,
    *,
    tasks: list[str] | None = None,
    classes: dict[str, list[str]] | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    seed: int = 0,
    min_per_split: dict[str, int] | None = None,
    min_images: int = 20,
    storage_options: dict | None = None,
    read_workers: int = 8,
    on_record: ProgressFn | None = None,
    min_side: int = 8,
    max_pixels: int = MAX_PIXELS,
    fold_case: bool = False,
    near_duplicate_bits: int | None = NEAR_DUPLICATE_BITS,
) -> ValidatedDataset:
    """Validate a manifest against its image root; quarantine bad rows, split, and summarise.

    * ``tasks``: label columns to use (default: every column except ``image``/``split``).
    * ``classes``: allowed class names per task (any subset of tasks); other values are quarantined
      as ``unknown_label``. Tasks not in ``classes`` get the sorted set of labels found.
    * Splits come from the ``split`` column when there is one, else from :func:`stratified_split`
      over the full label tuple (seeded, independent of row order).
    * ``min_per_split``: minimum records per split; defaults to ``min_images`` for train and 1 for
      val/test (0 when their fraction is 0 and there is no split column).
    * ``storage_options`` go to fsspec for both the manifest and the root.
    * ``on_record(done, total, info)`` is called as images are checked.
    * ``min_side``/``max_pixels`` are passed to :func:`~porcelain.data.images.decode_image`
      (``max_pixels``: ``data.max_megapixels`` × 10⁶).
    * ``fold_case``: merge labels of a task that differ only in case into the most frequent spelling
      (with ``classes``: into the given spelling). Without it, such labels stay separate classes and
      a warning names them (logged, and in ``ValidatedDataset.warnings``).
    * ``near_duplicate_bits``: kept images in different splits whose perceptual hashes differ in at
      most this many of 256 bits are flagged (``ValidatedDataset.near_duplicates``, reason
      ``near_duplicate_across_splits``); ``None`` skips the perceptual hashing.

    Raises :class:`DataError` for an unusable manifest (no ``image`` column, an undecodable text
    encoding, a missing task column, a task with fewer than two classes, a ``Split`` column that
    would become a task) or when too few valid images remain, and :class:`ConfigError` for invalid
    arguments.
    """
    check_fractions(val_fraction, test_fraction)
    if read_workers < 1:
        raise ConfigError(f"read_workers must be >= 1, got {read_workers}")
    raw, header, rows = load_manifest(manifest, storage_options)
    has_split = "split" in header

    if tasks is None:
        task_list = [h for h in header if h and h not in _RESERVED]
        if not task_list:
            raise DataError(f"{manifest}: no label columns; the columns are {header} "
                            "(expected 'image' plus one column per task)")
    else:
        task_list = list(tasks)
        bad = [t for t in task_list if t in _RESERVED]
        if bad or not task_list or len(set(task_list)) != len(task_list):
            raise ConfigError(f"tasks must be distinct label column names, not {task_list}")
        missing = [t for t in task_list if t not in header]
        if missing:
            raise DataError(f"{manifest}: task column(s) {missing} not found; the columns are {header}")
    allowed: dict[str, set[str]] = {}
    if classes is not None:
        unknown = [t for t in classes if t not in task_list]
        if unknown:
            raise ConfigError(f"classes given for {unknown}, which are not tasks {task_list}")
        allowed = {t: {str(c).strip() for c in v} for t, v in classes.items()}
    if tasks is None:
        check_split_lookalikes(manifest, task_list, {t: [v.get(t, "") for _, v, _ in rows] for t in task_list})
    allowed_folded = {t: {c.casefold(): c for c in sorted(v)} for t, v in allowed.items()}
    warnings: list[str] = []

    quarantine: list[QuarantineEntry] = []
    pending: list[_Pending] = []
    first_row_of_path: dict[str, int] = {}

    # 1. Cheap per-row checks, no I/O.
    for number, values, extra in rows:
        raw_image = values.get("image", "")

        def reject(reason: str, detail: str, _n: int = number, _img: str = raw_image) -> None:
            quarantine.append(QuarantineEntry(_n, _img, reason, detail))

        if extra:
            reject("bad_row", f"{len(extra)} more non-empty cell(s) than the header's {len(header)} columns "
                              "(an unquoted comma?)")
            continue
        rel, problem = safe_relpath(raw_image)
        if problem is not None or rel is None:
            reject(*(problem or ("empty_path", "")))
            continue
        if rel in first_row_of_path:
            reject("duplicate_row", f"the same image path as row {first_row_of_path[rel]} (that row is kept)")
            continue
        first_row_of_path[rel] = number
        split = ""
        if has_split:
            split = SPLIT_ALIASES.get(values.get("split", "").lower(), "")
            if not split:
                reject("bad_split", f"split {values.get('split', '')!r} is not one of train, val, test")
                continue
        labels = {t: values.get(t, "") for t in task_list}
        empty = [t for t in task_list if not labels[t]]
        if empty:
            reject("empty_label", f"no label for task(s) {empty}")
            continue
        if fold_case:
            for t in allowed:
                labels[t] = allowed_folded[t].get(labels[t].casefold(), labels[t])
        wrong = [t for t in task_list if t in allowed and labels[t] not in allowed[t]]
        if wrong:
            t = wrong[0]
            near = allowed_folded[t].get(labels[t].casefold())
            hint = f" (it differs only in case from {near!r}: set data.fold_case: true)" if near else ""
            reject("unknown_label", f"task {t!r}: label {labels[t]!r} is not among its "
                                    f"{len(allowed[t])} classes {sorted(allowed[t])[:20]}{hint}")
            continue
        pending.append(_Pending(number, raw_image, rel, labels, split))

    # 1b. Labels that differ only in case: named in a warning, or merged (fold_case).
    for t in task_list:
        if t in allowed:
            continue  # given classes: a variant is either folded above or quarantined as unknown_label
        groups = case_variants(p.labels[t] for p in pending)
        if not groups:
            continue
        warnings.append(describe_variants(t, groups, folded=fold_case))
        log.warning("%s: %s", manifest, warnings[-1])
        if fold_case:
            mapping = fold_map(groups)
            for p in pending:
                p.labels[t] = mapping.get(p.labels[t], p.labels[t])

    # 2. Read, hash and decode every remaining image (threads: I/O, and Pillow releases the GIL).
    fs, root_path = fsspec.core.url_to_fs(root, **(storage_options or {}))
    root_real: str | None = None
    if isinstance(fs, LocalFileSystem):
        root_real = os.path.realpath(root_path)
        if not os.path.isdir(root_real):
            raise DataError(f"image root is not a directory: {root}")
    results: list[_ImageResult] = []
    total = len(pending)
    n_bad = len(quarantine)
    with ThreadPoolExecutor(max_workers=read_workers, thread_name_prefix="porcelain-validate") as pool:
        for chunk in _chunks(pending, max(64, 32 * read_workers)):
            want_phash = near_duplicate_bits is not None
            for res in pool.map(lambda p: _check_image(fs, root_path, root_real, p.image, min_side, max_pixels,
                                                       want_phash), chunk):
                results.append(res)
                n_bad += res.reason is not None
                if on_record is not None:
                    on_record(len(results), total, {"quarantined": n_bad})

    # 3. Content duplicates: same bytes in several rows.
    good: list[tuple[_Pending, str]] = []
    phashes: dict[str, PerceptualHash | None] = {}
    for p, res in zip(pending, results):
        if res.reason is not None or res.sha256 is None:
            quarantine.append(QuarantineEntry(p.row, p.raw_image, res.reason or "unreadable", res.detail))
        else:
            good.append((p, res.sha256))
            phashes[res.sha256] = res.phash
    by_sha: dict[str, list[_Pending]] = defaultdict(list)
    for p, sha in good:
        by_sha[sha].append(p)
    records: list[Record] = []
    kept: dict[str, _Pending] = {}
    for sha, group in by_sha.items():
        first = group[0]
        if any(p.labels != first.labels for p in group[1:]):
            for p in group:
                others = ", ".join(f"row {o.row} {_fmt_labels(o.labels, task_list)}" for o in group if o is not p)
                quarantine.append(QuarantineEntry(p.row, p.raw_image, "conflicting_duplicate",
                                                  f"identical image bytes with different labels: this row "
                                                  f"{_fmt_labels(p.labels, task_list)}; {others}"))
            continue
        for p in group[1:]:
            quarantine.append(QuarantineEntry(p.row, p.raw_image, "duplicate_image",
                                              f"identical image bytes and labels as row {first.row} "
                                              f"({first.image}), which is kept"))
        records.append(Record(image=first.image, labels=dict(first.labels), split=first.split, sha256=sha,
                              row=first.row))
        kept[sha] = first

    # 4. Splits, classes, order.
    if not has_split and records:
        splits = stratified_split([tuple(r.labels[t] for t in task_list) for r in records],
                                  [r.sha256 for r in records],
                                  val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
        for r, s in zip(records, splits):
            r.split = s
    records.sort(key=lambda r: r.sha256)
    quarantine.sort(key=lambda q: (q.row, q.reason))
    class_lists = {t: sorted(allowed[t]) if t in allowed else sorted({r.labels[t] for r in records})
                   for t in task_list}
    near = _near_duplicates(records, kept, phashes, near_duplicate_bits)
    if near:
        warnings.append(f"{len(near)} pair(s) of images in different splits look alike (perceptual hash within "
                        f"{near_duplicate_bits} of 256 bits): see near_duplicate_across_splits in the quarantine "
                        "report; they are kept")
        log.warning("%s: %s", manifest, warnings[-1])
    ds = ValidatedDataset(records=records, tasks=task_list, classes=class_lists, quarantine=quarantine,
                          manifest_sha256=hashlib.sha256(raw).hexdigest(), near_duplicates=near,
                          warnings=warnings)

    # 5. Enough left?
    required = {"train": min_images,
                "val": 1 if (has_split or val_fraction > 0) else 0,
                "test": 1 if (has_split or test_fraction > 0) else 0}
    if min_per_split:
        unknown_splits = [s for s in min_per_split if s not in SPLITS]
        if unknown_splits:
            raise ConfigError(f"min_per_split keys must be among {SPLITS}, got {unknown_splits}")
        required.update(min_per_split)
    have = Counter(r.split for r in records)
    short = {s: (have.get(s, 0), need) for s, need in required.items() if have.get(s, 0) < need}
    if short:
        raise DataError(_not_enough_message(manifest, root, ds, have, short, total, has_split))
    check_tasks_have_classes(manifest, {t: {r.labels[t] for r in records} for t in task_list}, len(records))
    return ds


def _near_duplicates(records: list[Record], kept: dict[str, _Pending], phashes: dict[str, PerceptualHash | None],
                     max_bits: int | None) -> list[QuarantineEntry]:
    """One entry per pair of kept records in different splits whose perceptual hashes are close."""
    if max_bits is None:
        return []
    hashed = [r for r in records if phashes.get(r.sha256) is not None]
    pairs = near_duplicate_pairs([phashes[r.sha256] for r in hashed], [r.split for r in hashed], max_bits=max_bits)
    out = []
    for i, j, dist in pairs:
        (pa, ra), (pb, rb) = sorted(((kept[r.sha256], r) for r in (hashed[i], hashed[j])), key=lambda pr: pr[0].row)
        out.append(QuarantineEntry(pb.row, pb.raw_image, "near_duplicate_across_splits",
                                   f"kept; looks like row {pa.row} ({pa.image}, in {ra.split}) while this one is in "
                                   f"{rb.split}: {dist} of 256 perceptual-hash bits differ"))
    return sorted(out, key=lambda q: (q.row, q.detail))


def _fmt_labels(labels: dict[str, str], tasks: Sequence[str]) -> str:
    return "(" + ", ".join(f"{t}={labels[t]}" for t in tasks) + ")"


def _not_enough_message(manifest: str, root: str, ds: ValidatedDataset, have: Counter, short: dict,
                        n_read: int, has_split: bool) -> str:
    parts = [f"{s}: {h} < {need}" for s, (h, need) in short.items()]
    msg = (f"{manifest}: not enough valid images ({'; '.join(parts)}). "
           f"{len(ds.records)} valid (train {have.get('train', 0)}, val {have.get('val', 0)}, "
           f"test {have.get('test', 0)}), {len(ds.quarantine)} quarantined")
    qc = ds.quarantine_counts()
    if qc:
        msg += " (" + ", ".join(f"{k}: {v}" for k, v in qc.items()) + ")"
    msg += "."
    if n_read and qc.get("missing_file", 0) == n_read:
        msg += f" No image was found under the root {root!r}: is the image root right?"
    if ds.quarantine:
        examples = "; ".join(f"row {q.row} {q.image!r}: {q.reason} ({q.detail})" for q in ds.quarantine[:5])
        msg += f" First problems: {examples}."
    if not has_split and ("val" in short or "test" in short):
        msg += (" Label combinations with 1–2 images all go to train: add a 'split' column, or more "
                "images per combination.")
    return msg
