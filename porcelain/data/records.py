"""What validation produces: usable records, quarantined rows, and the dataset that holds them.

:meth:`ValidatedDataset.content_hash` is the cache key of every downstream stage: it depends on the
image bytes, labels, splits, tasks and classes only, never on where the files live, and never on
the quarantine, the near-duplicate flags or the warnings.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

__all__ = ["SPLITS", "QuarantineEntry", "Record", "ValidatedDataset"]

SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class QuarantineEntry:
    """One rejected (or, for a flag, reported) manifest row. ``row`` is 1-based over data rows (the header is row 0)."""

    row: int
    image: str
    reason: str
    detail: str


@dataclass
class Record:
    """One usable image: its path relative to the root, its labels, split and content hash, and the
    manifest row it came from (1-based; 0 when unknown), which orders the packed shards and is in no hash."""

    image: str
    labels: dict[str, str]
    split: str
    sha256: str
    row: int = field(default=0, compare=False)


@dataclass
class ValidatedDataset:
    """The outcome of :func:`~porcelain.data.validation.validate`. ``records`` are sorted by ``sha256``.

    * ``quarantine``: rows set aside, one :class:`QuarantineEntry` each (not in ``records``);
    * ``near_duplicates``: pairs of *kept* records in different splits whose images look alike
      (reason ``near_duplicate_across_splits``), one entry per pair, naming both rows; flagged only;
    * ``warnings``: things worth a look that changed nothing (or that ``fold_case`` fixed), as sentences.
    """

    records: list[Record]
    tasks: list[str]
    classes: dict[str, list[str]]
    quarantine: list[QuarantineEntry] = field(default_factory=list)
    manifest_sha256: str = ""
    near_duplicates: list[QuarantineEntry] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

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

    @property
    def n_near_duplicates(self) -> int:
        """Pairs of kept images in different splits that look alike (see :attr:`near_duplicates`)."""
        return len(self.near_duplicates)
