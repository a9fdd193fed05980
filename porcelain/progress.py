"""Progress reporting that stays readable in logs (one line every N%, no carriage returns)."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from collections.abc import Callable, Iterator

log = logging.getLogger("porcelain")

ProgressFn = Callable[[int, int, dict], None]

# Where else progress goes (e.g. a progress artifact in the Prefect UI), set by the caller of a stage.
_also: contextvars.ContextVar[ProgressFn | None] = contextvars.ContextVar("porcelain_progress", default=None)


@contextlib.contextmanager
def reporting_to(fn: ProgressFn) -> Iterator[None]:
    """Within this block every :class:`LogProgress` line is also passed to ``fn(done, total, info)``."""
    token = _also.set(fn)
    try:
        yield
    finally:
        _also.reset(token)


class LogProgress:
    """Call with ``(done, total, info)``; logs at most ``every`` times over the whole run, plus the end."""

    def __init__(self, label: str, every: int = 10, logger: logging.Logger | None = None):
        self.label, self.every, self.log = label, max(1, every), logger or log
        self.start = time.monotonic()
        self.last_bucket = -1

    def __call__(self, done: int, total: int, info: dict | None = None) -> None:
        total = max(total, 1)
        bucket = int(done * self.every / total)
        if bucket == self.last_bucket and done < total:
            return
        self.last_bucket = bucket
        elapsed = time.monotonic() - self.start
        eta = elapsed / max(done, 1) * (total - done)
        extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in (info or {}).items())
        bar = "#" * int(20 * done / total)
        self.log.info("%s [%-20s] %d/%d %3.0f%% %.0fs elapsed, eta %.0fs %s",
                      self.label, bar, done, total, 100 * done / total, elapsed, eta, extra)
        also = _also.get()
        if also is not None:
            try:
                also(done, total, {"label": self.label, **(info or {})})
            except Exception as e:  # showing progress must never fail the work
                self.log.debug("progress report failed: %s", e)


def null_progress(done: int, total: int, info: dict | None = None) -> None:
    """A progress callback that does nothing."""
