"""Progress of long task bodies (generator training) as a progress artifact in the Prefect UI."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prefect.artifacts import create_progress_artifact, update_progress_artifact

from porcelain.progress import reporting_to
from porcelain.report.publish import slug


@contextlib.contextmanager
def progress_artifact(what: str) -> Iterator[None]:
    """A progress artifact keyed ``what`` that follows every ``LogProgress`` line inside the block."""
    artifact = create_progress_artifact(0.0, key=slug(what), description=what)

    def update(done: int, total: int, info: dict) -> None:
        loss = info.get("loss")
        extra = f", loss {loss:.4g}" if isinstance(loss, float) else ""
        update_progress_artifact(artifact, 100.0 * done / max(total, 1),
                                 description=f"{info.get('label', what)}: {done}/{total}{extra}")

    with reporting_to(update):
        yield
