"""Reading a manifest CSV: bytes from any fsspec URL, text encoding, delimiter, header and rows."""

from __future__ import annotations

import codecs
import csv
import io

import fsspec

from porcelain.errors import DataError

__all__ = ["ManifestRow", "decode_manifest", "detect_encoding", "load_manifest", "read_manifest"]

ManifestRow = tuple[int, dict[str, str], list[str]]
"""``(row number, cells by column, extra non-empty cells beyond the header)``."""


_BOMS: tuple[tuple[bytes, str, str], ...] = (
    (codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32 LE"),  # before UTF-16 LE: it starts with the same two bytes
    (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32 BE"),
    (codecs.BOM_UTF8, "utf-8", "UTF-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16 LE"),
    (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16 BE"),
)


def detect_encoding(raw: bytes) -> tuple[str, str, int]:
    """``(codec, name, BOM length)`` of a manifest's bytes: from its byte-order mark, else UTF-8.

    Excel's "Unicode Text" export is UTF-16 LE with a BOM (and tab-separated). Without a BOM, text
    whose first bytes alternate with NULs (``i\x00m\x00…``) is read as BOM-less UTF-16.
    """
    for bom, codec, name in _BOMS:
        if raw.startswith(bom):
            return codec, name, len(bom)
    head = raw[:64]
    even, odd = head[0::2], head[1::2]
    if len(head) >= 8:  # a header row is mostly ASCII: in UTF-16 every other byte is NUL
        if odd.count(0) >= 0.8 * len(odd) and even.count(0) <= 0.2 * len(even):
            return "utf-16-le", "UTF-16 LE (no BOM)", 0
        if even.count(0) >= 0.8 * len(even) and odd.count(0) <= 0.2 * len(odd):
            return "utf-16-be", "UTF-16 BE (no BOM)", 0
    return "utf-8", "UTF-8", 0


def decode_manifest(raw: bytes, manifest: str) -> str:
    """The manifest's text: UTF-8 (BOM optional), or UTF-16/UTF-32 announced by a BOM."""
    codec, name, skip = detect_encoding(raw)
    body = raw[skip:]
    try:
        return body.decode(codec)
    except UnicodeDecodeError as exc:
        offset = exc.start + skip
        if codec != "utf-8":
            raise DataError(
                f"{manifest}: the file is marked as {name} but is not valid {name} at byte offset {offset} "
                f"(bytes {raw[offset: offset + 4]!r}); it may be cut off or mixed with another encoding. "
                "Re-save the manifest as UTF-8 (in Excel: 'CSV UTF-8 (Comma delimited)')."
            ) from None
        line = raw[:offset].count(b"\n") + 1
        bad = raw[offset: offset + 4]
        raise DataError(
            f"{manifest}: not valid UTF-8 at byte offset {offset} (line {line}, bytes {bad!r}). "
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
    text = decode_manifest(raw, manifest)
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
    """The header and the rows (dicts of stripped cells) of a manifest CSV.

    UTF-8 (with or without BOM), or UTF-16/UTF-32 with a BOM (Excel's "Unicode Text"); comma,
    tab or semicolon separated (whichever gives an ``image`` column).

    Blank lines are skipped; short rows are padded with ``""``. Raises :class:`DataError` when the
    file is missing, not UTF-8 (naming the byte offset), empty, or has no ``image`` column.
    """
    _, header, rows = load_manifest(manifest, storage_options)
    return header, [values for _, values, _ in rows]
