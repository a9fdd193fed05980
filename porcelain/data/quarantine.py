"""The quarantine report: why each rejected row was set aside, and the rows flagged for a look."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from typing import IO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from porcelain.data.images import REASONS as IMAGE_REASONS
from porcelain.data.records import QuarantineEntry
from porcelain.report.csvsafe import write_csv

__all__ = ["FLAG_REASONS", "QUARANTINE_FIELDS", "QUARANTINE_REASONS", "QuarantineEntry", "write_quarantine_csv"]

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
"""Every reason code that :func:`~porcelain.data.validation.validate` can put in the quarantine."""

FLAG_REASONS: dict[str, str] = {
    "near_duplicate_across_splits": "kept, but its image looks like (perceptual hash) an image in another "
                                    "split: several photographs of one object in train and test "
                                    "inflate the test scores",
}
"""Reasons of rows that are *kept* but reported in the quarantine CSV (``ValidatedDataset.near_duplicates``)."""

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
