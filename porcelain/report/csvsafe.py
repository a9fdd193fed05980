"""CSV output that is safe to open in a spreadsheet (no formula / DDE injection).

Labels and file names come from user manifests. A cell such as ``=HYPERLINK("http://x", "y")`` or
``@SUM(1+1)*cmd|' /C calc'!A0`` written back verbatim into a report would be executed as a formula
by Excel, LibreOffice or Google Sheets. :func:`csv_safe` prefixes such cells with a single quote
(the OWASP recommendation), which spreadsheets display as text; plain numbers such as ``-1.5`` or
``+3`` are left alone so that numeric columns stay numeric.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import IO, Any

__all__ = ["FORMULA_PREFIXES", "csv_safe", "write_csv"]

FORMULA_PREFIXES: tuple[str, ...] = (
    "=", "+", "-", "@", "\t", "\r", "\n",
    # Full-width forms that spreadsheets in CJK locales also treat as formula starts.
    "\uff1d", "\uff0b", "\uff0d", "\uff20",
)
"""A cell that starts with one of these is escaped (unless it is a plain number)."""

_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def csv_safe(value: Any) -> str:
    """``value`` as a string that a spreadsheet will show as text, never evaluate.

    ``None`` becomes ``""``; floats keep their ``repr``; strings that start with a formula
    character get a leading ``'`` unless the whole cell is a plain decimal number.
    """
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    if text.startswith(FORMULA_PREFIXES) and not _NUMBER.fullmatch(text):
        return "'" + text
    return text


def write_csv(rows: Iterable[Mapping[str, Any]], fileobj: IO[str] | IO[bytes],
              fieldnames: Sequence[str]) -> None:
    """Write ``rows`` (dicts) as CSV with a header, every cell (header included) through :func:`csv_safe`.

    ``fileobj`` may be a text file (open it with ``newline=""``) or a binary file (UTF-8 is written).
    Keys missing from a row become empty cells; keys not in ``fieldnames`` raise ``ValueError``.
    """
    fieldnames = list(fieldnames)
    text, wrapper = _as_text(fileobj)
    try:
        writer = csv.writer(text, lineterminator="\r\n")
        writer.writerow([csv_safe(f) for f in fieldnames])
        allowed = set(fieldnames)
        for i, row in enumerate(rows):
            extra = set(row) - allowed
            if extra:
                raise ValueError(f"row {i} has keys not in fieldnames: {sorted(map(str, extra))}")
            writer.writerow([csv_safe(row.get(f)) for f in fieldnames])
    finally:
        if wrapper is not None:
            wrapper.flush()
            wrapper.detach()


def _as_text(fileobj: IO[str] | IO[bytes]) -> tuple[IO[str], io.TextIOWrapper | None]:
    """A text view of ``fileobj``; the wrapper (to detach afterwards) when ``fileobj`` is binary."""
    if isinstance(fileobj, io.TextIOBase):
        return fileobj, None
    mode = getattr(fileobj, "mode", "")
    if isinstance(fileobj, io.RawIOBase | io.BufferedIOBase) or (isinstance(mode, str) and "b" in mode):
        wrapper = io.TextIOWrapper(fileobj, encoding="utf-8", newline="")  # type: ignore[arg-type]
        return wrapper, wrapper
    return fileobj, None  # type: ignore[return-value]
