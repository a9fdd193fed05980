"""Manifests: read, validate and split a labelled image dataset.

A dataset is a manifest CSV plus an image root (a local folder or any fsspec URL, ``s3://`` included).
The manifest has an ``image`` column (a path relative to the root), one column per classification
task (any number, any names) and optionally a ``split`` column (``train``/``val``/``test``).

:func:`validate` reads every image once, and returns a :class:`ValidatedDataset`: the usable records,
the discovered tasks and classes, and a quarantine list with one :class:`QuarantineEntry` per
rejected row (see :data:`QUARANTINE_REASONS`). One bad row never stops the run; too few good rows do,
with a :class:`~porcelain.errors.DataError` that says what was wrong.

:meth:`ValidatedDataset.content_hash` is the cache key of every downstream stage: it depends on the
image bytes, labels, splits, tasks and classes only, never on where the files live.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from porcelain.data.images import REASONS as IMAGE_REASONS
from porcelain.data.images import ImageError, decode_image
from porcelain.errors import ConfigError, DataError
from porcelain.report.csvsafe import write_csv

__all__ = [
    "QUARANTINE_FIELDS",
    "QUARANTINE_REASONS",
    "SPLITS",
    "QuarantineEntry",
    "Record",
    "ValidatedDataset",
    "read_manifest",
    "safe_relpath",
    "shard",
    "stratified_split",
    "validate",
    "write_quarantine_csv",
]

SPLITS: tuple[str, ...] = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "dev": "val", "test": "test", "testing": "test"}
_RESERVED = ("image", "split")

QUARANTINE_REASONS: dict[str, str] = {
    "bad_row": "the row has more cells than the header",
    "empty_path": "the image cell is empty",
    "path_escape": "the image path is absolute, has '..', a drive letter or URL scheme, or a symlink "
                   "that leaves the image root",
    "duplicate_row": "the same image path appeared in an earlier row (the first row is kept)",
    "bad_split": "the split value is not train, val or test",
    "empty_label": "a task's label cell is empty",
    "unknown_label": "a label is not among the classes given for its task",
    "missing_file": "the image file does not exist under the root",
    "unreadable": "the image file exists but could not be read (permissions, I/O error)",
    **IMAGE_REASONS,
    "duplicate_image": "the same image bytes with the same labels appeared in an earlier row",
    "conflicting_duplicate": "the same image bytes appear in several rows with different labels "
                             "(every such row is quarantined: which label is right is unknown)",
}
"""Every reason code that :func:`validate` can put in the quarantine, with an explanation."""

ProgressFn = Callable[[int, int, dict], None]


# --------------------------------------------------------------------------------------------------
# Data classes


@dataclass(frozen=True)
class QuarantineEntry:
    """One rejected manifest row. ``row`` is 1-based over data rows (the header is row 0)."""

    row: int
    image: str
    reason: str
    detail: str


@dataclass
class Record:
    """One usable image: its path relative to the root, its labels, split and content hash."""

    image: str
    labels: dict[str, str]
    split: str
    sha256: str


@dataclass
class ValidatedDataset:
    """The outcome of :func:`validate`. ``records`` are sorted by ``sha256`` (a content order)."""

    records: list[Record]
    tasks: list[str]
    classes: dict[str, list[str]]
    quarantine: list[QuarantineEntry] = field(default_factory=list)
    manifest_sha256: str = ""

    def content_hash(self) -> str:
        """SHA-256 over the sorted (image sha256, labels, split) of every record, the tasks and classes.

        Independent of the image root, the file names, the manifest's row order and the quarantine:
        moving or renaming the dataset keeps the hash; changing one label or one pixel changes it.
        """
        rows = sorted([r.sha256, [r.labels[t] for t in self.tasks], r.split] for r in self.records)
        payload = {"format": 1, "tasks": list(self.tasks),
                   "classes": {t: list(self.classes[t]) for t in self.tasks}, "records": rows}
        blob = json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def split_records(self, split: str | None = None) -> list[Record]:
        """The records of one split (all records when ``split`` is ``None``), in :attr:`records` order."""
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
        return [r for r in self.records if split is None or r.split == split]

    def label_matrix(self, split: str | None = None) -> np.ndarray:
        """``int64`` array ``N×T``: class index (into :attr:`classes`) of each record × task."""
        index = {t: {c: i for i, c in enumerate(self.classes[t])} for t in self.tasks}
        recs = self.split_records(split)
        out = np.empty((len(recs), len(self.tasks)), dtype=np.int64)
        for i, r in enumerate(recs):
            for j, t in enumerate(self.tasks):
                out[i, j] = index[t][r.labels[t]]
        return out

    def counts(self, task: str, split: str | None = "train") -> list[int]:
        """Images per class of ``task`` in ``split`` (``None``: all), aligned with ``classes[task]``."""
        if task not in self.classes:
            raise KeyError(f"unknown task {task!r}; tasks are {self.tasks}")
        c = Counter(r.labels[task] for r in self.split_records(split))
        return [c.get(name, 0) for name in self.classes[task]]

    def quarantine_counts(self) -> dict[str, int]:
        """Quarantined rows per reason code."""
        return dict(sorted(Counter(q.reason for q in self.quarantine).items()))


# --------------------------------------------------------------------------------------------------
# Reading the manifest


def _decode_manifest(raw: bytes, manifest: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        bad = raw[exc.start: exc.start + 4]
        raise DataError(
            f"{manifest}: not valid UTF-8 at byte offset {exc.start} (line {line}, bytes {bad!r}). "
            "Re-save the manifest as UTF-8 (in Excel: 'CSV UTF-8 (Comma delimited)'; the file was "
            "probably saved as GBK/GB18030, Big5 or Latin-1)."
        ) from None


def _pick_delimiter(text: str) -> str:
    """``,`` unless the header only parses into an ``image`` column with ``;`` or a tab."""
    first = text.split("\n", 1)[0]
    for delim in (",", "\t", ";"):
        header = next(csv.reader([first], delimiter=delim), [])
        if "image" in [h.strip() for h in header]:
            return delim
    return ","


def _load_manifest(manifest: str, storage_options: dict | None
                   ) -> tuple[bytes, list[str], list[tuple[int, dict[str, str], list[str]]]]:
    """Raw bytes, header, and ``(row number, cells by column, extra cells)`` for each non-blank row."""
    fs, path = fsspec.core.url_to_fs(manifest, **(storage_options or {}))
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        raise DataError(f"manifest not found: {manifest}") from None
    except IsADirectoryError:
        raise DataError(f"manifest is a directory, not a CSV file: {manifest}") from None
    text = _decode_manifest(raw, manifest)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_pick_delimiter(text))
    try:
        header_cells = next(reader, None)
        if header_cells is None or not any(c.strip() for c in header_cells):
            raise DataError(f"{manifest}: the manifest is empty (no header row)")
        header = [h.strip() for h in header_cells]
        dupes = sorted({h for h in header if h and header.count(h) > 1})
        if dupes:
            raise DataError(f"{manifest}: duplicate column names {dupes}")
        if "image" not in header:
            near = [h for h in header if h.lower() in ("image", "images", "path", "file", "filename")]
            hint = f"; did you mean {near[0]!r}? (rename it to 'image')" if near else ""
            raise DataError(f"{manifest}: no 'image' column; the columns are {header}{hint}")
        rows: list[tuple[int, dict[str, str], list[str]]] = []
        for number, cells in enumerate(reader, start=1):
            if not any(c.strip() for c in cells):
                continue  # blank line (still counted, so that row numbers match the file)
            values = {h: (cells[j].strip() if j < len(cells) else "") for j, h in enumerate(header)}
            extra = [c for c in cells[len(header):] if c.strip()]
            rows.append((number, values, extra))
    except csv.Error as exc:
        raise DataError(f"{manifest}: cannot parse CSV near line {reader.line_num}: {exc}") from None
    return raw, header, rows


def read_manifest(manifest: str, storage_options: dict | None = None) -> tuple[list[str], list[dict[str, str]]]:
    """The header and the rows (dicts of stripped cells) of a UTF-8 manifest CSV (BOM allowed).

    Blank lines are skipped; short rows are padded with ``""``. Raises :class:`DataError` when the
    file is missing, not UTF-8 (naming the byte offset), empty, or has no ``image`` column.
    """
    _, header, rows = _load_manifest(manifest, storage_options)
    return header, [values for _, values, _ in rows]


# --------------------------------------------------------------------------------------------------
# Paths

_SCHEME_OR_DRIVE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def safe_relpath(image: str) -> tuple[str | None, tuple[str, str] | None]:
    """Normalise a manifest path; ``(path, None)`` if it stays under the root, else ``(None, (reason, detail))``.

    Backslashes count as separators, ``.`` and empty segments are dropped. Refused (``path_escape``):
    absolute paths, ``~``, any ``..`` segment, a drive letter or URL scheme (``C:``, ``s3://``,
    ``file:``) and control characters.
    """
    if not image:
        return None, ("empty_path", "the image cell is empty")
    if _CONTROL.search(image):
        return None, ("path_escape", "the path contains control characters")
    p = image.replace("\\", "/")
    if _SCHEME_OR_DRIVE.match(p):
        return None, ("path_escape", "paths must be relative to the image root; this one has a drive "
                                     "letter or URL scheme")
    if p.startswith("/"):
        return None, ("path_escape", "absolute path; paths must be relative to the image root")
    if p.startswith("~"):
        return None, ("path_escape", "home-directory path; paths must be relative to the image root")
    parts = [s for s in p.split("/") if s not in ("", ".")]
    if ".." in parts:
        return None, ("path_escape", "'..' segments are not allowed; paths must stay under the image root")
    if not parts:
        return None, ("empty_path", "the image path has no file name")
    return "/".join(parts), None


# --------------------------------------------------------------------------------------------------
# Splits


def _rank(seed: int, ident: str) -> str:
    return hashlib.sha256(f"{seed}\x00{ident}".encode()).hexdigest()


def _largest_remainder(exact: dict[Any, float], capacity: dict[Any, int], seed: int) -> dict[Any, int]:
    """Integer quotas ≤ capacity whose total is ``round(sum(exact))`` (Hamilton's method)."""
    quota = {k: min(int(np.floor(v)), capacity[k]) for k, v in exact.items()}
    target = int(np.floor(sum(exact.values()) + 0.5))
    order = sorted(exact, key=lambda k: (-(exact[k] - np.floor(exact[k])), _rank(seed, repr(k))))
    missing = target - sum(quota.values())
    for k in order:
        if missing <= 0:
            break
        if quota[k] < capacity[k]:
            quota[k] += 1
            missing -= 1
    return quota


def stratified_split(keys: Sequence[tuple[str, ...]], ids: Sequence[str], *, val_fraction: float = 0.15,
                     test_fraction: float = 0.2, seed: int = 0) -> list[str]:
    """A seeded split (``"train"``/``"val"``/``"test"`` per item), stratified by ``keys``.

    Items are grouped by key (the full label tuple). Groups of 1–2 items go to train entirely, so
    that rare classes are learnable. In larger groups every split gets about its fraction, at least
    one item stays in train, and the per-group roundings are chosen (largest remainder) so that the
    totals match the fractions of the eligible items. Within a group, items are ordered by a seeded
    hash of their id: the result depends on ``(keys, ids, seed)`` and not on the order of the items.
    ``ids`` should be unique (image sha256).
    """
    if len(keys) != len(ids):
        raise ValueError("keys and ids must have the same length")
    _check_fractions(val_fraction, test_fraction)
    groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        groups[tuple(k)].append(i)
    out = ["train"] * len(keys)
    eligible = {k: sorted(idx, key=lambda i: _rank(seed, ids[i])) for k, idx in groups.items() if len(idx) >= 3}
    if not eligible:
        return out
    n = {k: len(v) for k, v in eligible.items()}
    test = _largest_remainder({k: n[k] * test_fraction for k in eligible}, {k: n[k] - 1 for k in eligible}, seed)
    val = _largest_remainder({k: n[k] * val_fraction for k in eligible},
                             {k: n[k] - 1 - test[k] for k in eligible}, seed + 1)
    for k, idx in eligible.items():
        for pos, i in enumerate(idx):
            out[i] = "test" if pos < test[k] else "val" if pos < test[k] + val[k] else "train"
    return out


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in "
                          "[0, 1) and add up to less than 1")


# --------------------------------------------------------------------------------------------------
# Validation


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


def _check_image(fs: Any, root_path: str, root_real: str | None, rel: str, min_side: int,
                 max_pixels: int) -> _ImageResult:
    """Read one image through ``fs``, hash it and verify that it decodes."""
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
        decode_image(data, min_side=min_side, max_pixels=max_pixels).close()
    except ImageError as exc:
        return _ImageResult(sha, exc.reason, exc.detail)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a property of this one file
        return _ImageResult(sha, "corrupt", f"{type(exc).__name__}: {exc}")
    return _ImageResult(sha)


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
    max_pixels: int = 64_000_000,
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
    * ``min_side``/``max_pixels`` are passed to :func:`~porcelain.data.images.decode_image`.

    Raises :class:`DataError` for an unusable manifest (no ``image`` column, not UTF-8, a missing task
    column) or when too few valid images remain, and :class:`ConfigError` for invalid arguments.
    """
    _check_fractions(val_fraction, test_fraction)
    if read_workers < 1:
        raise ConfigError(f"read_workers must be >= 1, got {read_workers}")
    raw, header, rows = _load_manifest(manifest, storage_options)
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
            split = _SPLIT_ALIASES.get(values.get("split", "").lower(), "")
            if not split:
                reject("bad_split", f"split {values.get('split', '')!r} is not one of train, val, test")
                continue
        labels = {t: values.get(t, "") for t in task_list}
        empty = [t for t in task_list if not labels[t]]
        if empty:
            reject("empty_label", f"no label for task(s) {empty}")
            continue
        wrong = [t for t in task_list if t in allowed and labels[t] not in allowed[t]]
        if wrong:
            t = wrong[0]
            reject("unknown_label", f"task {t!r}: label {labels[t]!r} is not among its "
                                    f"{len(allowed[t])} classes {sorted(allowed[t])[:20]}")
            continue
        pending.append(_Pending(number, raw_image, rel, labels, split))

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
            for res in pool.map(lambda p: _check_image(fs, root_path, root_real, p.image, min_side, max_pixels),
                                chunk):
                results.append(res)
                n_bad += res.reason is not None
                if on_record is not None:
                    on_record(len(results), total, {"quarantined": n_bad})

    # 3. Content duplicates: same bytes in several rows.
    good: list[tuple[_Pending, str]] = []
    for p, res in zip(pending, results):
        if res.reason is not None or res.sha256 is None:
            quarantine.append(QuarantineEntry(p.row, p.raw_image, res.reason or "unreadable", res.detail))
        else:
            good.append((p, res.sha256))
    by_sha: dict[str, list[_Pending]] = defaultdict(list)
    for p, sha in good:
        by_sha[sha].append(p)
    records: list[Record] = []
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
        records.append(Record(image=first.image, labels=dict(first.labels), split=first.split, sha256=sha))

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
    ds = ValidatedDataset(records=records, tasks=task_list, classes=class_lists, quarantine=quarantine,
                          manifest_sha256=hashlib.sha256(raw).hexdigest())

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
    return ds


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


# --------------------------------------------------------------------------------------------------
# Output helpers


QUARANTINE_FIELDS: tuple[str, ...] = ("row", "image", "reason", "detail")


def write_quarantine_csv(entries: Iterable[QuarantineEntry], dest: str | os.PathLike | IO[str] | IO[bytes],
                         storage_options: dict | None = None) -> None:
    """Write the quarantine as CSV (``row,image,reason,detail``), every cell through ``csv_safe``.

    ``dest`` is a local path or fsspec URL (written in one piece, parent folders created), or an open
    text/binary file object.
    """
    rows = ({"row": e.row, "image": e.image, "reason": e.reason, "detail": e.detail} for e in entries)
    if isinstance(dest, str | os.PathLike):
        buf = io.StringIO(newline="")
        write_csv(rows, buf, QUARANTINE_FIELDS)
        fs, path = fsspec.core.url_to_fs(os.fspath(dest), **(storage_options or {}))
        if isinstance(fs, LocalFileSystem):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fs.pipe_file(path, buf.getvalue().encode("utf-8"))
    else:
        write_csv(rows, dest, QUARANTINE_FIELDS)


def shard(records: Sequence[Record], shard_size: int) -> list[list[Record]]:
    """Split records into lists of at most ``shard_size``, in sha256 order (deterministic in content)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    ordered = sorted(records, key=lambda r: (r.sha256, r.image))
    return [ordered[i: i + shard_size] for i in range(0, len(ordered), shard_size)]
