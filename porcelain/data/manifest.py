"""Manifests: read, validate and split a labelled image dataset (the public entry points, re-exported).

A dataset is a manifest CSV plus an image root (a local folder or any fsspec URL, ``s3://`` included).
The manifest has an ``image`` column (a path relative to the root), one column per classification
task (any number, any names) and optionally a ``split`` column (``train``/``val``/``test``).

The work is done in focused modules, all re-exported here:

* :mod:`porcelain.data.manifest_csv` – reading the CSV (encoding, delimiter, header, rows);
* :mod:`porcelain.data.paths` – image paths that cannot leave the root;
* :mod:`porcelain.data.validation` – :func:`validate`: rows and images checked, bad rows quarantined;
* :mod:`porcelain.data.labels` – label checks: case variants, single-class tasks, ``Split`` columns;
* :mod:`porcelain.data.neardup` – perceptual hashes and near-duplicates across splits;
* :mod:`porcelain.data.splits` – the seeded stratified split and sharding;
* :mod:`porcelain.data.records` – :class:`Record`, :class:`QuarantineEntry`, :class:`ValidatedDataset`;
* :mod:`porcelain.data.quarantine` – the reason codes and the quarantine CSV.
"""

from __future__ import annotations

from porcelain.data.manifest_csv import read_manifest
from porcelain.data.paths import safe_relpath
from porcelain.data.quarantine import FLAG_REASONS, QUARANTINE_FIELDS, QUARANTINE_REASONS, write_quarantine_csv
from porcelain.data.records import SPLITS, QuarantineEntry, Record, ValidatedDataset
from porcelain.data.splits import shard, stratified_split
from porcelain.data.validation import ProgressFn, validate

__all__ = [
    "FLAG_REASONS",
    "QUARANTINE_FIELDS",
    "QUARANTINE_REASONS",
    "SPLITS",
    "ProgressFn",
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
