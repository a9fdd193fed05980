"""Reading a manifest CSV: bytes from any fsspec URL, text encoding, delimiter, header and rows."""

from __future__ import annotations

import csv
import io

import fsspec

from porcelain.errors import DataError

__all__ = ["ManifestRow", "load_manifest", "read_manifest"]

ManifestRow = tuple[int, dict[str, str], list[str]]
"""``(row number, cells by column, extra non-empty cells beyond the header)``."""


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


def load_manifest(manifest: str, storage_options: dict | None
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
    _, header, rows = load_manifest(manifest, storage_options)
    return header, [values for _, values, _ in rows]
