"""Classifier model, class weights, sampler and training loop (tiny preset, a few steps on sample data)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import WeightedRandomSampler

from porcelain.data.sample import CLASSES, TASKS, plan_sample, render
from porcelain.errors import NonFiniteLossError, WeightsError
from porcelain.models.classifier import PRESETS, create_classifier, head_key, preprocess
from porcelain.models.weights import save_weights
from porcelain.train.classifier import effective_number_weights, predict, sample_weights, train_classifier

NUM_CLASSES = {t: len(CLASSES[t]) for t in TASKS}


def _labels(items) -> np.ndarray:
    return np.array([[CLASSES[t].index(it.labels[t]) for t in TASKS] for it in items], dtype=np.int64)


def _counts(labels: np.ndarray) -> list[list[int]]:
    return [np.bincount(labels[:, t], minlength=len(CLASSES[task])).tolist() for t, task in enumerate(TASKS)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core machine two threads can be 30x slower under contention."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def sample_data():
    items = plan_sample(96, seed=0)
    images = np.stack([render(it.labels, 32, it.seed) for it in items])
    labels = _labels(items)
    return images, labels, _counts(labels)


# ---------------------------------------------------------------------------- effective number


def test_effective_number_beta_zero_is_uniform():
    w = effective_number_weights([500, 20, 3], beta=0.0)
    assert torch.allclose(w, torch.ones(3))


def test_effective_number_known_value():
    # beta=0.5: raw weights (1-.5)/(1-.5^1) = 1 and (1-.5)/(1-.5^2) = 2/3, normalised to sum 2.
    w = effective_number_weights([1, 2], beta=0.5)
    assert torch.allclose(w, torch.tensor([1.2, 0.8]), atol=1e-6)
    assert w.dtype == torch.float32


@pytest.mark.parametrize("beta", [1.0, 1 - 1e-9])
def test_effective_number_beta_to_one_is_inverse_frequency(beta):
    counts = [100, 10, 1]
    inv = torch.tensor([1 / 100, 1 / 10, 1.0], dtype=torch.float64)
    expected = (inv * 3 / inv.sum()).float()
    assert torch.allclose(effective_number_weights(counts, beta), expected, rtol=1e-5)


def test_effective_number_default_beta_between_limits():
    w = effective_number_weights([1000, 10], beta=0.999)
    assert w.sum().item() == pytest.approx(2.0)
    ratio = (w[1] / w[0]).item()
    assert 1.0 < ratio < 100.0  # less extreme than inverse frequency
    assert ratio == pytest.approx((1 - 0.999**1000) / (1 - 0.999**10), rel=1e-5)


def test_effective_number_zero_counts():
    w = effective_number_weights([50, 0, 5, 0], beta=0.999)
    assert torch.isfinite(w).all()
    assert w[1] == 0 and w[3] == 0
    assert w.sum().item() == pytest.approx(4.0)
    assert w[2] > w[0] > 0
    with pytest.raises(ValueError, match="all class counts are zero"):
        effective_number_weights([0, 0])
    with pytest.raises(ValueError):
        effective_number_weights([3, -1])
    with pytest.raises(ValueError):
        effective_number_weights([3, 1], beta=1.5)


# ---------------------------------------------------------------------------- sampler weights


def test_sample_weights_mean_over_tasks():
    labels = np.array([[0, 0], [0, 1], [1, 1]])
    counts = [[2, 1], [1, 2]]
    w = sample_weights(labels, counts, beta=0.0)  # uniform per-class weights -> every image 1
    assert torch.allclose(w, torch.ones(3, dtype=torch.float64))
    w = sample_weights(labels, counts, beta=1.0)  # inverse frequency, normalised to sum 2 per task
    a = effective_number_weights(counts[0], 1.0).double()
    b = effective_number_weights(counts[1], 1.0).double()
    expected = torch.stack([(a[0] + b[0]) / 2, (a[0] + b[1]) / 2, (a[1] + b[1]) / 2])
    assert torch.allclose(w, expected)


def test_sampler_favours_rare_classes():
    labels = _labels(plan_sample(400, seed=1))
    counts = _counts(labels)
    glaze = TASKS.index("glaze")
    rare = int(np.argmin(counts[glaze]))
    weights = sample_weights(labels, counts, beta=0.999)
    gen = torch.Generator().manual_seed(0)
    drawn = np.array(list(WeightedRandomSampler(weights, 10_000, replacement=True, generator=gen)))
    before = (labels[:, glaze] == rare).mean()
    after = (labels[drawn, glaze] == rare).mean()
    assert after > 1.5 * before  # mean over 4 tasks dilutes the per-task weight: ~1.8x here
    common = int(np.argmax(counts[glaze]))
    assert (labels[drawn, glaze] == common).mean() < (labels[:, glaze] == common).mean()


def test_sample_weights_reject_inconsistent_labels():
    with pytest.raises(ValueError, match="training count 0"):
        sample_weights(np.array([[0], [1]]), [[2, 0]])
    with pytest.raises(ValueError, match="must lie in"):
        sample_weights(np.array([[0], [2]]), [[1, 1]])


# ---------------------------------------------------------------------------- model


def test_presets_and_forward():
    assert "mobilenetv3_large_100" in PRESETS and "tiny" in PRESETS
    model = create_classifier("tiny", NUM_CLASSES, seed=0).eval()
    images = np.zeros((2, 32, 32, 3), np.uint8)
    out = model(model.preprocess(images))
    assert list(out) == list(TASKS)  # "type" works as a task name despite nn.Module.type
    assert {t: tuple(v.shape) for t, v in out.items()} == {t: (2, n) for t, n in NUM_CLASSES.items()}
    with pytest.raises(ValueError, match="unknown classifier"):
        create_classifier("no_such_model", NUM_CLASSES)


def test_preprocess_normalises_with_imagenet_stats():
    x = preprocess(np.full((1, 4, 4, 3), 255, np.uint8), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert x.shape == (1, 3, 4, 4) and x.dtype == torch.float32
    assert x[0, 0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229)
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((1, 4, 4, 3), np.float32), (0, 0, 0), (1, 1, 1))


def test_create_classifier_loads_backbone_weights_strictly(tmp_path):
    source = create_classifier("tiny", NUM_CLASSES, seed=1)
    state = dict(source.backbone.state_dict())
    # An ImageNet checkpoint carries the 1000-class head: it is ignored.
    state["classifier.weight"] = torch.zeros(1000, source.feature_dim)
    state["classifier.bias"] = torch.zeros(1000)
    path = tmp_path / "backbone.safetensors"
    save_weights(state, path)
    model = create_classifier("tiny", NUM_CLASSES, weights=str(path), seed=2)
    for k, v in source.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v), k

    save_weights(source.state_dict(), tmp_path / "whole_model.safetensors")  # backbone.* + heads.*
    again = create_classifier("tiny", {"glaze": 5}, weights=tmp_path / "whole_model.safetensors")
    assert torch.equal(again.backbone.conv_head.weight, source.backbone.conv_head.weight)

    no_counters = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    save_weights(no_counters, tmp_path / "no_counters.safetensors")
    create_classifier("tiny", NUM_CLASSES, weights=tmp_path / "no_counters.safetensors")

    extra = dict(state, **{"blocks.99.conv.weight": torch.zeros(1)})
    save_weights(extra, tmp_path / "extra.safetensors")
    with pytest.raises(WeightsError, match="unexpected keys: blocks.99.conv.weight"):
        create_classifier("tiny", NUM_CLASSES, weights=tmp_path / "extra.safetensors")

    missing = {k: v for k, v in state.items() if k != "conv_head.weight"}
    save_weights(missing, tmp_path / "missing.safetensors")
    with pytest.raises(WeightsError, match="missing keys: conv_head.weight"):
        create_classifier("tiny", NUM_CLASSES, weights=tmp_path / "missing.safetensors")

    wrong = dict(state, **{"conv_head.bias": torch.zeros(7)})
    save_weights(wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(WeightsError, match="shape mismatch"):
        create_classifier("tiny", NUM_CLASSES, weights=tmp_path / "wrong.safetensors")

    with pytest.raises(WeightsError, match="looked at"):
        create_classifier("tiny", NUM_CLASSES, weights=tmp_path / "absent.safetensors")


def test_seeded_creation_is_deterministic_and_keeps_global_rng():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = create_classifier("tiny", {"glaze": 5}, seed=7)
    assert torch.equal(torch.rand(3), expected_next)
    b = create_classifier("tiny", {"glaze": 5}, seed=7)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


# ---------------------------------------------------------------------------- training


def test_training_lowers_the_loss_and_predicts(sample_data):
    images, labels, counts = sample_data
    model = create_classifier("tiny", NUM_CLASSES, seed=0)
    calls = []
    model, history = train_classifier(
        model, images, labels, TASKS, counts=counts, epochs=6, batch_size=32, lr=1e-2, seed=0,
        device="cpu", dtype="fp32", progress=lambda done, total, info: calls.append((done, total)),
    )
    assert history["steps"] == 18 and len(history["loss"]) == 6 and len(history["step_loss"]) == 18
    assert set(history["task_loss"]) == set(TASKS)
    # Default path (weighted sampler, augmentation, weighted loss): the sampled batches differ, so
    # compare the mean of the last two epochs with the first.
    assert np.mean(history["loss"][-2:]) < 0.85 * history["loss"][0]
    assert calls[-1] == (18, 18)
    assert history["lr"][0] == pytest.approx(1e-2) and history["lr"][-1] < history["lr"][0]
    assert not model.training
    preds = predict(model, images, batch_size=40, device="cpu", dtype="fp32")
    assert len(preds) == len(TASKS)
    for t, task in enumerate(TASKS):
        assert preds[t].shape == (len(images),) and preds[t].dtype == np.int64
        assert preds[t].min() >= 0 and preds[t].max() < NUM_CLASSES[task]


def test_training_is_deterministic_given_seed(sample_data):
    images, labels, counts = sample_data
    images, labels = images[:48], labels[:48]
    counts = _counts(labels)
    runs = []
    for seed in (0, 0, 1):
        model = create_classifier("tiny", NUM_CLASSES, seed=0)
        model, history = train_classifier(model, images, labels, TASKS, counts=counts, epochs=1,
                                          batch_size=24, lr=1e-3, seed=seed, device="cpu")
        runs.append((history["step_loss"], model.state_dict()))
    assert runs[0][0] == runs[1][0]
    for k, v in runs[0][1].items():
        assert torch.equal(v, runs[1][1][k]), k
    assert runs[0][0] != runs[2][0]


def test_runs_in_parallel_threads_match_runs_one_after_the_other(sample_data):
    """A sweep runs several trainings at once in threads: each must equal its run alone."""
    import threading

    images, labels, counts = sample_data
    images, labels = images[:48], labels[:48]
    counts = _counts(labels)

    def one(seed: int, out: dict) -> None:
        model = create_classifier("tiny", NUM_CLASSES, seed=seed)
        _, history = train_classifier(model, images, labels, TASKS, counts=counts, epochs=2,
                                      batch_size=12, lr=1e-3, seed=seed, device="cpu")
        out[seed] = history["step_loss"]

    alone: dict[int, list[float]] = {}
    for seed in (0, 1, 2):
        one(seed, alone)
    together: dict[int, list[float]] = {}
    threads = [threading.Thread(target=one, args=(seed, together)) for seed in (0, 1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    assert alone[0] != alone[1]


def test_dropout_draws_from_its_generator_not_the_global_rng():
    from porcelain.models.classifier import SeededDropout, set_dropout_generator

    drop = SeededDropout(0.5).train()
    x = torch.ones(1000)
    set_dropout_generator(drop, torch.Generator().manual_seed(3))
    before = torch.random.get_rng_state()
    a = drop(x)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG was not touched
    set_dropout_generator(drop, torch.Generator().manual_seed(3))
    assert torch.equal(drop(x), a)
    assert set(a.unique().tolist()) == {0.0, 2.0} and 400 < int((a == 0).sum()) < 600
    assert torch.equal(drop.eval()(x), x)


def test_non_finite_loss_raises_at_once(sample_data):
    images, labels, counts = sample_data
    model = create_classifier("tiny", NUM_CLASSES, seed=0)
    head = model.heads[head_key("glaze")][1]

    def poison(done, total, info):
        if done == 2:  # after the second step, break the glaze head
            with torch.no_grad():
                head.weight.fill_(math.nan)

    with pytest.raises(NonFiniteLossError) as err:
        train_classifier(model, images, labels, TASKS, counts=counts, epochs=2, batch_size=32,
                         seed=0, device="cpu", progress=poison)
    assert err.value.stage == "classifier training" and err.value.step == 3
    assert math.isnan(err.value.value)
    assert "classifier training" in str(err.value) and "step 3" in str(err.value)


def test_training_validates_inputs(sample_data):
    images, labels, counts = sample_data
    model = create_classifier("tiny", NUM_CLASSES, seed=0)
    with pytest.raises(ValueError, match="uint8"):
        train_classifier(model, images.astype(np.float32), labels, TASKS, counts=counts, epochs=1)
    with pytest.raises(ValueError, match="has no head"):
        train_classifier(model, images, labels, ("a", "b", "c", "d"), counts=counts, epochs=1)
