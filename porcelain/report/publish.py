"""What a run shows in the Prefect UI, read back from a written report (so that a cached report is
shown again): the Markdown with its figures embedded, and the results table."""

from __future__ import annotations

from typing import Any

from porcelain.storage import Store


def published_report(store: Store, written: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """``(markdown with figures as data: URIs, rows of the results table)`` of a report written by
    :func:`~porcelain.report.build.build_report` (``written`` is what it returned, or its cached copy)."""
    from porcelain.report.html import inline_figures

    base = written["key"]
    md = store.read_bytes(written["report"]).decode("utf-8")
    figures = {k.rsplit("/", 1)[-1]: store.read_bytes(k) for k in store.list(base) if k.endswith(".png")}
    table = store.read_json(f"{base}/table.json")["rows"] if store.exists(f"{base}/table.json") else []
    return inline_figures(md, figures), table


MAX_QUARANTINE_ROWS = 500


def quarantine_rows(store: Store, key: str | None) -> list[dict[str, str]]:
    """The rows of a run's ``quarantine.csv`` (row, image, reason, detail; at most
    :data:`MAX_QUARANTINE_ROWS`, the file holds them all), for a table in the UI; ``[]`` when none."""
    import csv
    import io

    if not key or not store.exists(key):
        return []
    rows = list(csv.DictReader(io.StringIO(store.read_bytes(key).decode("utf-8"))))
    return rows[:MAX_QUARANTINE_ROWS]


def slug(text: str) -> str:
    """Lowercase letters, digits and dashes: what Prefect allows in artifact keys."""
    import re

    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", text.lower())).strip("-") or "porcelain"


def artifact_key(name: str, what: str) -> str:
    """An artifact key for one config (``what`` of run ``name``), so the Artifacts page keeps one
    history per config."""
    return f"{slug(name)}-{what}"
