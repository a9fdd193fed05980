"""Classifier model, class weights, sampler and training loop (tiny preset, a few steps on sample data)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import WeightedRandomSampler

from porcelain.data.sample import CLASSES, TASKS, plan_sample, render
from porcelain.errors import NonFiniteLossError, WeightsError
from porcelain.models.classifier import PRESETS, create_classifier, head_key, preprocess, resolve_classifier
from porcelain.models.weights import save_weights
from porcelain.train.classifier import (
    effective_number_weights,
    evaluate_macro_f1,
    macro_f1,
    predict,
    sample_weights,
    steps_for,
    train_classifier,
    weighting_counts,
)

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


def test_class_with_count_zero_gets_the_weight_of_the_rarest_class():
    # Counts are the real training counts; a (synthetic) image of a class with no real image must not
    # crash and gets the weight of the rarest counted class.
    labels = np.array([[0], [1], [2], [2]])
    assert weighting_counts(labels, [[8, 0, 2, 0]]) == [[8, 2, 2, 0]]  # class 3 is absent: stays 0
    w = sample_weights(labels, [[8, 0, 2, 0]], beta=0.9)
    assert torch.isfinite(w).all() and w[1] == w[2] == w[3] > w[0]
    assert weighting_counts(np.array([[1]]), [[0, 0]]) == [[0, 1]]  # no counts at all: uniform
    with pytest.raises(ValueError, match="must lie in"):
        sample_weights(np.array([[0], [2]]), [[1, 1]])


# ---------------------------------------------------------------------------- model


def test_presets_and_forward():
    assert {"mobilenetv3_large_100", "small_cnn", "resnet10t", "tiny"} <= set(PRESETS)
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


# ---------------------------------------------------------------------------- small-image backbones


def test_small_image_backbones_are_timm_models():
    import timm

    assert timm.is_model("porcelain_small_cnn")
    backbone = timm.create_model("porcelain_small_cnn", num_classes=0, pretrained=False)
    assert backbone.num_features == 256  # widths (32, 64, 128, 256), one conv per stage
    assert sum(isinstance(m, torch.nn.Conv2d) for m in backbone.modules()) == 4
    assert backbone(torch.zeros(2, 3, 32, 32)).shape == (2, 256)
    assert backbone.forward_features(torch.zeros(1, 3, 32, 32)).shape[-2:] == (4, 4)
    assert timm.data.resolve_model_data_config(backbone)["mean"] == timm.data.IMAGENET_DEFAULT_MEAN
    with pytest.raises(ValueError, match="no published weights"):
        timm.create_model("porcelain_small_cnn", pretrained=True)
    narrow = timm.create_model("porcelain_small_cnn", num_classes=5, widths=(8, 16), depth=(1, 2))
    assert narrow(torch.zeros(1, 3, 16, 16)).shape == (1, 5) and narrow.num_features == 16
    assert sum(isinstance(m, torch.nn.Conv2d) for m in narrow.modules()) == 3


def test_small_cnn_weights_round_trip(tmp_path):
    source = create_classifier("small_cnn", {"a": 3}, seed=0)
    save_weights(source.state_dict(), tmp_path / "w.safetensors")
    again = create_classifier("small_cnn", {"a": 3}, weights=tmp_path / "w.safetensors", seed=1)
    for k, v in source.backbone.state_dict().items():
        assert torch.equal(again.backbone.state_dict()[k], v), k


@pytest.mark.parametrize(("size", "weights", "expected", "words"), [
    (32, False, "small_cnn", "no pretrained weights"),
    (16, False, "small_cnn", "16 px"),
    (33, False, "resnet10t", "measured"),
    (64, False, "resnet10t", "64 px"),
    (224, False, "resnet10t", "96 px"),
    (32, True, "mobilenetv3_large_100", "weights given"),
    (224, True, "mobilenetv3_large_100", "paper"),
])
def test_auto_resolution(size, weights, expected, words):
    name, reason = resolve_classifier("auto", size, has_weights=weights)
    assert name == expected and words in reason and reason.startswith("auto")


def test_explicit_names_resolve_to_themselves():
    assert resolve_classifier("tiny", 32, has_weights=False)[0] == "tiny"
    assert resolve_classifier("resnet18", 224, has_weights=True) == ("resnet18", "resnet18: asked for")
    with pytest.raises(ValueError, match="unknown classifier"):
        resolve_classifier("no_such_model", 32, has_weights=False)
    model = create_classifier("auto", {"a": 3}, seed=0, image_size=32)
    assert type(model.backbone).__name__ == "SmallCNN"
    with pytest.raises(ValueError, match="image_size"):
        create_classifier("auto", {"a": 3})


# ---------------------------------------------------------------------------- planted task

PLANTED = {"colour": 3, "side": 2}


def _planted(n: int, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 6×6 square of pure red, green or blue (task colour) in the left or right half (task side),
    on dark noise: easy for a CNN, invisible to a model that has not learnt."""
    rng = np.random.default_rng(seed)
    colour, side = rng.integers(0, 3, n), rng.integers(0, 2, n)
    images = rng.integers(0, 60, (n, size, size, 3)).astype(np.uint8)
    half = size // 2
    for i in range(n):
        y0, x0 = rng.integers(0, size - 6), side[i] * half + rng.integers(0, half - 6 + 1)
        images[i, y0:y0 + 6, x0:x0 + 6, :] = 0
        images[i, y0:y0 + 6, x0:x0 + 6, colour[i]] = 255
    return images, np.stack([colour, side], axis=1).astype(np.int64)


def _planted_counts(labels: np.ndarray) -> list[list[int]]:
    return [np.bincount(labels[:, t], minlength=n).tolist() for t, n in enumerate(PLANTED.values())]


@pytest.fixture()
def narrow_cnn(monkeypatch):
    """The small CNN at test width (same class, 8-16-32 channels, one conv per stage)."""
    monkeypatch.setitem(PRESETS, "small_cnn_test", ("porcelain_small_cnn", {"widths": (8, 16, 32), "depth": 1}))
    return lambda seed=0: create_classifier("small_cnn_test", PLANTED, seed=seed)


def _count_training_forwards(model) -> list[int]:
    calls = [0]

    def hook(module, args):
        if module.training:
            calls[0] += 1

    model.register_forward_pre_hook(hook)
    return calls


def test_budget_is_steps_whatever_the_number_of_images(narrow_cnn):
    """50 and 200 images: exactly the same number of optimizer steps (and forward passes)."""
    images, labels = _planted(200)
    done = {}
    for n in (50, 200):
        model = narrow_cnn()
        forwards = _count_training_forwards(model)
        calls = []
        _, history = train_classifier(
            model, images[:n], labels[:n], tuple(PLANTED), counts=_planted_counts(labels[:n]), steps=7,
            batch_size=16, seed=0, device="cpu", progress=lambda d, t, info: calls.append((d, t)))
        done[n] = (history["steps"], history["budget"], len(history["step_loss"]), forwards[0], calls[-1])
        assert history["batch_size"] == 16 and not history["stopped_early"]
        assert history["selected_step"] == 7 and history["val_curve"] == [] and history["best_val_macro_f1"] is None
    assert done[50] == done[200] == (7, 7, 7, 7, (7, 7))
    # Also with the sampler, and with fewer images than a batch.
    _, history = train_classifier(narrow_cnn(), images[:10], labels[:10], tuple(PLANTED),
                                  counts=_planted_counts(labels[:10]), steps=5, batch_size=16,
                                  use_sampler=True, seed=0, device="cpu")
    assert history["steps"] == 5


def test_steps_for_epochs():
    assert steps_for(6, 97, 64) == 10  # ceil(6 * 97 / 64)
    assert steps_for(6, 97, 64, min_steps=600) == 600
    assert steps_for(1, 10, 64) == 1
    with pytest.raises(ValueError):
        steps_for(0, 10, 64)


def test_learning_rate_warms_up_then_follows_a_cosine(narrow_cnn):
    images, labels = _planted(64)
    _, history = train_classifier(narrow_cnn(), images, labels, tuple(PLANTED), counts=_planted_counts(labels),
                                  steps=40, warmup_steps=4, lr=1e-2, batch_size=16, seed=0, device="cpu")
    lr = history["lr_per_step"]
    assert lr[:4] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2])
    assert all(a >= b for a, b in zip(lr[3:], lr[4:])) and lr[-1] < 1e-4
    assert lr[4 + 18] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 18 / 36)))


def test_per_image_loss_weights_of_one_train_as_the_plain_loss_and_zero_weights_drop_images(narrow_cnn):
    """The adaptive arm's path: weights of 1 (and smoothing 0) follow the plain loss step for step;
    a head whose weight is 0 on every image never learns (its loss is 0); smoothing changes the loss."""
    images, labels = _planted(48)
    kw = dict(counts=_planted_counts(labels), steps=6, batch_size=16, seed=0, device="cpu")
    _, plain = train_classifier(narrow_cnn(), images, labels, tuple(PLANTED), **kw)
    ones = np.ones((48, len(PLANTED)), np.float32)
    _, weighted = train_classifier(narrow_cnn(), images, labels, tuple(PLANTED), sample_task_weights=ones,
                                   sample_label_smoothing=np.zeros(48, np.float32), **kw)
    np.testing.assert_allclose(weighted["step_loss"], plain["step_loss"], rtol=1e-4, atol=1e-5)
    off = ones.copy()
    off[:, 0] = 0
    _, dropped = train_classifier(narrow_cnn(), images, labels, tuple(PLANTED), sample_task_weights=off, **kw)
    first = list(PLANTED)[0]
    assert all(v == 0 for v in dropped["task_loss"][first]) and dropped["step_loss"][0] < plain["step_loss"][0]
    _, smooth = train_classifier(narrow_cnn(), images, labels, tuple(PLANTED),
                                 sample_label_smoothing=np.full(48, 0.2, np.float32), **kw)
    assert abs(smooth["step_loss"][0] - plain["step_loss"][0]) > 1e-4
    with pytest.raises(ValueError, match="sample_task_weights"):
        train_classifier(narrow_cnn(), images, labels, tuple(PLANTED), sample_task_weights=ones[:3], **kw)


def test_macro_f1_matches_torchmetrics():
    from torchmetrics.classification import MulticlassF1Score

    rng = np.random.default_rng(0)
    for n_classes in (2, 5, 10):
        target = rng.integers(0, n_classes - 1, 300)  # the last class is absent from the targets
        pred = np.where(rng.random(300) < 0.6, target, rng.integers(0, n_classes, 300))
        pred[pred == 0] = 1  # class 0: present in the targets, never predicted
        expected = MulticlassF1Score(num_classes=n_classes, average="macro")(torch.from_numpy(pred),
                                                                              torch.from_numpy(target))
        assert macro_f1(pred, target, n_classes) == pytest.approx(float(expected), abs=1e-6)


def test_small_cnn_learns_a_planted_task(narrow_cnn):
    images, labels = _planted(360, seed=0)
    train, test = slice(0, 240), slice(240, 360)
    model, history = train_classifier(narrow_cnn(), images[train], labels[train], tuple(PLANTED),
                                      counts=_planted_counts(labels[train]), steps=150, batch_size=32,
                                      lr=5e-3, hflip=False, seed=0, device="cpu")
    preds = predict(model, images[test], device="cpu")
    accuracy = [float((p == labels[test][:, t]).mean()) for t, p in enumerate(preds)]
    assert accuracy[0] > 0.9 and accuracy[1] > 0.9, accuracy  # chance: 0.33 and 0.5


def _wreck_heads(model) -> None:
    """Every head predicts class 0 for every image from now on (a bias of 100 outweighs what the few
    remaining steps can learn): a planted late checkpoint that is worse on val."""
    with torch.no_grad():
        for task in model.task_names:
            linear = model.heads[head_key(task)][1]
            linear.weight.zero_()
            linear.bias.zero_()
            linear.bias[0] = 100.0


def test_the_restored_checkpoint_is_the_best_on_val(narrow_cnn):
    images, labels = _planted(400, seed=1)
    train, val = (images[:200], labels[:200]), (images[200:], labels[200:])
    model = narrow_cnn()
    snapshots = {}

    def progress(done, total, info):
        snapshots[done] = {k: v.clone() for k, v in model.state_dict().items()}
        if done == 30:
            _wreck_heads(model)

    model, history = train_classifier(model, *train, tuple(PLANTED), counts=_planted_counts(train[1]), steps=40,
                                      batch_size=32, lr=5e-3, hflip=False, seed=0, device="cpu", val=val,
                                      eval_every=5, progress=progress)
    curve = history["val_curve"]
    assert [c["step"] for c in curve] == [5, 10, 15, 20, 25, 30, 35, 40]
    scores = [c["mean_macro_f1"] for c in curve]
    assert max(scores[:6]) > scores[-1] + 0.3  # the wrecked checkpoints are much worse
    best = int(np.argmax(scores))
    assert history["selected_step"] == curve[best]["step"] <= 30
    assert history["best_val_macro_f1"] == scores[best]
    again = evaluate_macro_f1(model, *val, tuple(PLANTED), device="cpu")
    assert np.mean(list(again.values())) == pytest.approx(scores[best], abs=1e-12)
    assert again == pytest.approx(curve[best]["per_task"])
    for k, v in model.state_dict().items():  # exactly the weights of the selected step
        assert torch.equal(v, snapshots[history["selected_step"]][k]), k
    assert history["steps"] == 40 and not history["stopped_early"]


def test_early_stopping_stops_after_patience_evaluations(narrow_cnn):
    images, labels = _planted(400, seed=2)
    train, val = (images[:200], labels[:200]), (images[200:], labels[200:])
    model = narrow_cnn()

    def progress(done, total, info):
        if done == 20:
            _wreck_heads(model)

    model, history = train_classifier(model, *train, tuple(PLANTED), counts=_planted_counts(train[1]),
                                      steps=200, batch_size=32, lr=5e-3, hflip=False, seed=0, device="cpu",
                                      val=val, eval_every=5, patience=3, progress=progress)
    curve = history["val_curve"]
    best = int(np.argmax([c["mean_macro_f1"] for c in curve]))
    assert history["stopped_early"] and history["budget"] == 200
    assert len(curve) == best + 1 + 3  # three evaluations without improvement, then stop
    assert history["steps"] == curve[-1]["step"] < 200 and len(history["step_loss"]) == history["steps"]
    assert history["selected_step"] == curve[best]["step"] <= 20
    assert len(history["loss"]) == len(history["loss_steps"]) and history["loss_steps"][-1] == history["steps"]


def test_default_eval_every_gives_about_twenty_evaluations(narrow_cnn):
    images, labels = _planted(120)
    _, history = train_classifier(narrow_cnn(), images[:60], labels[:60], tuple(PLANTED),
                                  counts=_planted_counts(labels[:60]), steps=43, batch_size=8, seed=0,
                                  device="cpu", val=(images[60:], labels[60:]))
    steps = [c["step"] for c in history["val_curve"]]
    assert history["eval_every"] == 3 and steps[:3] == [3, 6, 9] and steps[-1] == 43 and len(steps) == 15


def test_synthetic_images_of_a_class_without_real_counts_do_not_crash(narrow_cnn):
    images, labels = _planted(60)
    counts = _planted_counts(labels)
    counts[0][2] = 0  # "real" counts: no image of colour 2, but the training set has some
    _, history = train_classifier(narrow_cnn(), images, labels, tuple(PLANTED), counts=counts, steps=3,
                                  batch_size=16, use_sampler=True, seed=0, device="cpu")
    assert history["steps"] == 3 and all(math.isfinite(v) for v in history["step_loss"])


# ---------------------------------------------------------------------------- training


def test_training_lowers_the_loss_and_predicts(sample_data):
    images, labels, counts = sample_data
    model = create_classifier("tiny", NUM_CLASSES, seed=0)
    calls = []
    model, history = train_classifier(
        model, images, labels, TASKS, counts=counts, steps=18, batch_size=32, lr=1e-2, warmup_steps=0,
        seed=0, device="cpu", dtype="fp32", progress=lambda done, total, info: calls.append((done, total)),
    )
    assert history["steps"] == 18 and len(history["step_loss"]) == 18 and history["budget"] == 18
    assert len(history["loss"]) == 18 and history["log_every"] == 1  # ceil(18 / 20) = 1-step windows
    assert set(history["task_loss"]) == set(TASKS)
    # Sampled batches differ, so compare the mean of the last few steps with the first ones.
    assert np.mean(history["step_loss"][-4:]) < 0.85 * np.mean(history["step_loss"][:2])
    assert calls[-1] == (18, 18)
    assert history["lr"][0] == pytest.approx(1e-2) and history["lr"][-1] < history["lr"][0]
    assert not model.training
    preds = predict(model, images, batch_size=40, device="cpu", dtype="fp32")
    assert len(preds) == len(TASKS)
    for t, task in enumerate(TASKS):
        assert preds[t].shape == (len(images),) and preds[t].dtype == np.int64
        assert preds[t].min() >= 0 and preds[t].max() < NUM_CLASSES[task]


def test_deprecated_epochs_budget(sample_data):
    images, labels, counts = sample_data
    model = create_classifier("tiny", NUM_CLASSES, seed=0)
    _, history = train_classifier(model, images[:48], labels[:48], TASKS, counts=_counts(labels[:48]), epochs=2,
                                  batch_size=24, seed=0, device="cpu")
    assert history["steps"] == 4
    with pytest.raises(ValueError, match="not both"):
        train_classifier(model, images, labels, TASKS, counts=counts, steps=2, epochs=2)
    with pytest.raises(ValueError, match="steps="):
        train_classifier(model, images, labels, TASKS, counts=counts)


@pytest.mark.parametrize("use_sampler", [False, True])
def test_training_is_deterministic_given_seed(sample_data, use_sampler):
    images, labels, counts = sample_data
    images, labels = images[:48], labels[:48]
    counts = _counts(labels)
    val = sample_data[0][48:], sample_data[1][48:]
    runs = []
    for seed in (0, 0, 1):
        model = create_classifier("tiny", NUM_CLASSES, seed=0)
        model, history = train_classifier(model, images, labels, TASKS, counts=counts, steps=4,
                                          batch_size=24, lr=1e-3, seed=seed, device="cpu",
                                          use_sampler=use_sampler, val=val, eval_every=2)
        runs.append((history["step_loss"], history["val_curve"], model.state_dict()))
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
    for k, v in runs[0][2].items():
        assert torch.equal(v, runs[1][2][k]), k
    assert runs[0][0] != runs[2][0]


def test_runs_in_parallel_threads_match_runs_one_after_the_other(sample_data):
    """A sweep runs several trainings at once in threads: each must equal its run alone."""
    import threading

    images, labels, counts = sample_data
    images, labels = images[:48], labels[:48]
    counts = _counts(labels)

    def one(seed: int, out: dict) -> None:
        model = create_classifier("tiny", NUM_CLASSES, seed=seed)
        _, history = train_classifier(model, images, labels, TASKS, counts=counts, steps=6,
                                      batch_size=12, lr=1e-3, seed=seed, device="cpu", use_sampler=True)
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
        train_classifier(model, images, labels, TASKS, counts=counts, steps=6, batch_size=32,
                         seed=0, device="cpu", progress=poison)
    assert err.value.stage == "classifier training" and err.value.step == 3
    assert math.isnan(err.value.value)
    assert "classifier training" in str(err.value) and "step 3" in str(err.value)


def test_training_validates_inputs(sample_data):
    images, labels, counts = sample_data
    model = create_classifier("tiny", NUM_CLASSES, seed=0)
    with pytest.raises(ValueError, match="uint8"):
        train_classifier(model, images.astype(np.float32), labels, TASKS, counts=counts, steps=1)
    with pytest.raises(ValueError, match="has no head"):
        train_classifier(model, images, labels, ("a", "b", "c", "d"), counts=counts, steps=1)
    with pytest.raises(ValueError, match="steps must be"):
        train_classifier(model, images, labels, TASKS, counts=counts, steps=0)
    with pytest.raises(ValueError, match="patience"):
        train_classifier(model, images, labels, TASKS, counts=counts, steps=2, patience=0)
    with pytest.raises(ValueError, match="val images"):
        train_classifier(model, images, labels, TASKS, counts=counts, steps=2, val=(labels, labels))
