"""The label-faithfulness judge (fast: tiny, trivially separable images)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from porcelain.errors import DataError
from porcelain.evaluate.faithfulness import (
    Judge,
    judge_accuracy,
    judge_predict,
    label_faithfulness,
    train_judge,
)

NUM_CLASSES = [2, 3]


def _data(n: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Task 0: red vs blue image; task 1: a bright bar in the top, middle or bottom third."""
    rng = np.random.default_rng(seed)
    labels = np.stack([rng.integers(0, 2, n), rng.integers(0, 3, n)], 1).astype(np.int64)
    imgs = np.zeros((n, 12, 12, 3))
    imgs[labels[:, 0] == 0] = [200, 30, 30]
    imgs[labels[:, 0] == 1] = [30, 30, 200]
    for i, band in enumerate(labels[:, 1]):
        imgs[i, 4 * band:4 * band + 4, :, 1] = 255
    imgs += rng.normal(0, 10, imgs.shape)
    return np.clip(imgs, 0, 255).astype(np.uint8), labels


@pytest.fixture(scope="module")
def judge() -> Judge:
    images, labels = _data()
    return train_judge(images, labels, NUM_CLASSES, epochs=6, seed=0, batch_size=32, lr=1e-2, device="cpu")


def test_judge_learns_separable_tasks(judge):
    images, labels = _data(60, seed=1)
    acc = judge_accuracy(judge, images, labels)
    assert set(acc) == {0, 1}
    assert acc[0] >= 0.95 and acc[1] >= 0.95, acc
    pred = judge_predict(judge, images)
    assert pred.shape == (60, 2) and pred.dtype == np.int64


def test_faithfulness_counts_agreement_and_skips_null(judge):
    images, labels = _data(60, seed=2)
    assert label_faithfulness(judge, images, labels)[0] >= 0.95
    wrong = labels.copy()
    wrong[:, 0] = 1 - wrong[:, 0]  # every image "generated" for the other colour
    assert label_faithfulness(judge, images, wrong)[0] <= 0.05
    nulls = labels.copy()
    nulls[:30, 0] = NUM_CLASSES[0]  # task left free for half of the images: not counted
    nulls[:, 1] = NUM_CLASSES[1]
    f = label_faithfulness(judge, images, nulls)
    assert f[0] >= 0.95 and np.isnan(f[1])
    with pytest.raises(DataError):  # null is not a valid label for real images
        judge_accuracy(judge, images, nulls)


def test_judge_is_deterministic_in_seed():
    images, labels = _data(48)
    a = train_judge(images, labels, NUM_CLASSES, epochs=1, seed=3, batch_size=16, device="cpu")
    b = train_judge(images, labels, NUM_CLASSES, epochs=1, seed=3, batch_size=16, device="cpu")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_input_validation(judge):
    images, labels = _data(8)
    with pytest.raises(DataError):
        judge_accuracy(judge, images.astype(np.float32), labels)
    with pytest.raises(DataError):
        judge_accuracy(judge, images, labels[:, :1])
    with pytest.raises(DataError):
        train_judge(images, labels + 5, NUM_CLASSES, epochs=1)
