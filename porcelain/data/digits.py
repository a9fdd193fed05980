"""A second built-in dataset: scikit-learn's 1797 bundled 8×8 digit scans as a few-shot, long-tailed set.

Three tasks per image:

* ``digit``  – ``"0"`` … ``"9"``;
* ``loops``  – closed loops of the numeral: ``"none"``, ``"one"`` or ``"two"``. 0, 6 and 9 have one,
  8 has two. **4 counts as one**: the writers of this set (UCI "optical recognition of handwritten
  digits") draw 4 mostly closed, and a rule per digit keeps the task a function of the digit. 2 is
  counted as none (its loop, when drawn, is open in most scans); 1, 3, 5, 7 have none;
* ``parity`` – ``"even"`` or ``"odd"``.

Split (:func:`load_digits_data`): the train split is *few-shot and long-tailed*. A seeded permutation
ranks the ten digits from common to rare; the digit of rank ``r`` gets
``round(shots · imbalance^(-r/9))`` train images (half up, at least 1): ``shots`` for the commonest,
``shots / imbalance`` (rounded) for the rarest. With the defaults (25, 10): 25, 19, 15, 12, 9, 7, 5, 4,
3, 3 = 102 train images. Every other image goes to val (1/3) or test (2/3), stratified by digit. Which
images of a digit go where is seeded too: the split depends only on ``(shots, imbalance, seed)``.

Pixels: the 0..16 ink levels are upscaled to ``size`` px with bicubic interpolation (on floats,
then clipped) and drawn as a **dark digit on white** (255 = paper, 0 = full ink), the way a scanned
page looks; three equal channels (uint8 RGB), since the pipeline is RGB.

The set is bundled with scikit-learn (``sklearn.datasets.load_digits``): nothing is downloaded.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from porcelain.data.records import SPLITS
from porcelain.errors import ConfigError

if TYPE_CHECKING:
    from porcelain.storage import Store

__all__ = [
    "CLASSES",
    "LOOPS",
    "SPLITS",
    "TASKS",
    "DigitsData",
    "digits_manifest_rows",
    "load_digits_data",
    "materialize_digits",
    "train_counts",
    "write_digits",
]

TASKS: tuple[str, ...] = ("digit", "loops", "parity")
LOOPS: dict[int, str] = {0: "one", 1: "none", 2: "none", 3: "none", 4: "one", 5: "none", 6: "one",
                         7: "none", 8: "two", 9: "one"}
"""Closed loops per digit (4 drawn closed, 2 open: see the module docstring)."""
CLASSES: dict[str, list[str]] = {
    "digit": [str(d) for d in range(10)],
    "loops": sorted(set(LOOPS.values())),   # none, one, two
    "parity": ["even", "odd"],
}
_VAL_SHARE = 1 / 3  # of the images not in train; the rest is test
_FORMAT = 1         # bump when the pixels, labels or split rule change


@dataclass(frozen=True)
class DigitsData:
    """The digits set, split. ``splits[s] = (images uint8 N×H×W×3, labels int64 N×3)``.

    Label column ``j`` indexes ``classes[tasks[j]]``. ``indices[s]`` are the rows of scikit-learn's
    ``load_digits()`` (0..1796) of each image, in the same order (ascending).
    """

    tasks: tuple[str, ...]
    classes: dict[str, list[str]]
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    indices: dict[str, np.ndarray] | None = None


def labels_of(digit: int) -> dict[str, str]:
    """The three labels of a digit: ``{"digit": "8", "loops": "two", "parity": "even"}``."""
    d = int(digit)
    return {"digit": str(d), "loops": LOOPS[d], "parity": "even" if d % 2 == 0 else "odd"}


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn; imported late (slow import)

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32)
    images.setflags(write=False)
    target = np.asarray(bunch.target, dtype=np.int64)
    target.setflags(write=False)
    return images, target


def _check(size: int, shots: int, imbalance: float) -> None:
    if not 8 <= int(size) <= 512:
        raise ConfigError(f"digits size must be in [8, 512] px, got {size}")
    if not 1 <= int(shots) <= 100:
        raise ConfigError(f"digits shots must be in [1, 100] (the rarest digit has 174 scans, and val/test "
                          f"need the rest), got {shots}")
    if not (1.0 <= float(imbalance) <= 100.0):
        raise ConfigError(f"digits imbalance must be in [1, 100], got {imbalance}")


def train_counts(shots: int = 25, imbalance: float = 10.0) -> list[int]:
    """Train images per rank (0 = commonest): ``round(shots · imbalance^(-r/9))``, half up, ≥ 1."""
    _check(32, shots, imbalance)
    return [max(1, int(np.floor(shots * float(imbalance) ** (-r / 9) + 0.5 + 1e-9))) for r in range(10)]


def _upscale(ink: np.ndarray, size: int) -> np.ndarray:
    """8×8 ink levels 0..16 → ``size×size×3`` uint8, dark ink on white."""
    f = Image.fromarray(np.ascontiguousarray(ink, dtype=np.float32), "F")
    if size != ink.shape[0]:
        f = f.resize((size, size), Image.Resampling.BICUBIC)
    level = np.clip(np.asarray(f, dtype=np.float32) / 16.0, 0.0, 1.0)
    grey = np.floor(255.0 * (1.0 - level) + 0.5).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def _assign(target: np.ndarray, shots: int, imbalance: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split index per image (0 train, 1 val, 2 test) and the digit order from common to rare."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0xD161])
    order = rng.permutation(10)
    counts = train_counts(shots, imbalance)
    split = np.empty(len(target), dtype=np.int64)
    for rank, digit in enumerate(order):
        idx = np.flatnonzero(target == digit)
        idx = idx[rng.permutation(len(idx))]
        n_train = counts[rank]
        rest = idx[n_train:]
        n_val = int(np.floor(len(rest) * _VAL_SHARE + 0.5))
        split[idx[:n_train]] = 0
        split[rest[:n_val]] = 1
        split[rest[n_val:]] = 2
    return split, order


def load_digits_data(size: int = 32, shots: int = 25, imbalance: float = 10.0, seed: int = 0) -> DigitsData:
    """The digits set at ``size`` px with the seeded few-shot long-tailed split (module docstring)."""
    _check(size, shots, imbalance)
    ink, target = _raw()
    split, _ = _assign(target, shots, imbalance, seed)
    index = {t: {c: i for i, c in enumerate(CLASSES[t])} for t in TASKS}
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    indices: dict[str, np.ndarray] = {}
    for s_i, name in enumerate(SPLITS):
        rows = np.flatnonzero(split == s_i)
        images = np.empty((len(rows), size, size, 3), dtype=np.uint8)
        labels = np.empty((len(rows), len(TASKS)), dtype=np.int64)
        for k, row in enumerate(rows):
            images[k] = _upscale(ink[row], size)
            lab = labels_of(int(target[row]))
            labels[k] = [index[t][lab[t]] for t in TASKS]
        splits[name] = (images, labels)
        indices[name] = rows
    return DigitsData(tasks=TASKS, classes={t: list(CLASSES[t]) for t in TASKS}, splits=splits, indices=indices)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr), "RGB").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def digits_manifest_rows(data: DigitsData) -> list[tuple[str, bytes, dict[str, str]]]:
    """``(image name, PNG bytes, manifest row)`` for every image, train then val then test."""
    out = []
    for name in SPLITS:
        images, labels = data.splits[name]
        rows = data.indices[name] if data.indices is not None else np.arange(len(images))
        for img, lab, row in zip(images, labels, rows):
            file = f"images/{int(row):04d}.png"
            cells = {t: data.classes[t][int(lab[j])] for j, t in enumerate(data.tasks)}
            out.append((file, _png(img), {"image": file, **cells, "split": name}))
    return out


def _manifest_bytes(rows: list[dict[str, str]]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["image", *TASKS, "split"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8")


def materialize_digits(store: Store, size: int = 32, shots: int = 25, imbalance: float = 10.0,
                       seed: int = 0) -> dict[str, str]:
    """Write the digits set under ``samples/<hash>/`` of ``store`` (once); its manifest and root URIs.

    Like :func:`porcelain.data.source.materialize_sample`: images first, ``manifest.csv`` (with a
    ``split`` column) last, so the folder is complete once the manifest exists.
    """
    from porcelain.hashing import stable_hash

    _check(size, shots, imbalance)
    key = {"dataset": "digits", "size": int(size), "shots": int(shots), "imbalance": float(imbalance),
           "seed": int(seed), "v": _FORMAT}
    base = f"samples/{stable_hash(key)}"
    manifest = f"{base}/manifest.csv"
    if not store.exists(manifest):
        rows = []
        for file, png, row in digits_manifest_rows(load_digits_data(size, shots, imbalance, seed)):
            store.write_bytes(f"{base}/{file}", png)
            rows.append(row)
        store.write_bytes(manifest, _manifest_bytes(rows))  # last: the set exists once this does
    return {"manifest": store.uri(manifest), "root": store.uri(base)}


def write_digits(out_dir: str | Path, size: int = 32, shots: int = 25, imbalance: float = 10.0,
                 seed: int = 0) -> Path:
    """Write ``manifest.csv`` (image, digit, loops, parity, split) and ``images/*.png``; the manifest path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for file, png, row in digits_manifest_rows(load_digits_data(size, shots, imbalance, seed)):
        (out / file).write_bytes(png)
        rows.append(row)
    manifest = out / "manifest.csv"
    tmp = manifest.with_suffix(".csv.tmp")
    tmp.write_bytes(_manifest_bytes(rows))
    tmp.replace(manifest)
    return manifest
