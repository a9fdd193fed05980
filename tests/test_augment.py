"""Building blocks of the image-conditioned synthesizers (SGD-Mix, SIP): saliency, masks, mixing,
SDEdit on the closed-set generator, BLIP captions, semantic drift. Offline, CPU, tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from porcelain.augment.captions import (
    CaptionerNotFoundError,
    build_tiny_blip,
    caption_images,
    choose_caption,
    load_captioner,
    sip_prompt,
)
from porcelain.augment.drift import drift_by_strength, label_drift, pixel_distance
from porcelain.augment.masks import foreground_mask, normalize_map, otsu_threshold, union_mask
from porcelain.augment.mixing import choose_targets, mix, mix_pairs
from porcelain.augment.saliency import gradcam_maps, spectral_residual_maps
from porcelain.generate.img2img import denoising_steps, guidance_from_similarity, img2img
from porcelain.generate.sampling import sample_images
from porcelain.models.classifier import MultiTaskClassifier
from porcelain.models.generator import create_generator

torch.set_num_threads(1)


# ---------------------------------------------------------------- masks


def _levels(counts: dict[float, int]) -> np.ndarray:
    return np.concatenate([np.full(n, v) for v, n in counts.items()]).reshape(10, -1)


def test_otsu_splits_three_levels_where_between_class_variance_is_largest():
    # {0}×50 | {0.6}×10, {1}×40: split after 0 gives w0·w1·(mu0-mu1)² = .25·.92² = .212 > .194 after 0.6
    a = _levels({0.0: 50, 0.6: 10, 1.0: 40})
    t = otsu_threshold(a)
    assert 0.0 <= t < 0.6
    assert foreground_mask(a).sum() == 50  # 0.6 and 1 are foreground
    # {0}×40, {0.4}×10 | {1}×50: the mirror image, so 0.4 joins the background
    b = _levels({0.0: 40, 0.4: 10, 1.0: 50})
    assert 0.4 <= otsu_threshold(b) < 1.0
    assert foreground_mask(b).sum() == 50


def test_foreground_mask_normalises_per_map_and_constant_map_is_empty():
    two = np.zeros((2, 4, 4))
    two[0, :2] = 5.0  # values 0/5: top half salient
    two[1, :, 3] = -1.0  # values -1/0: all but the last column salient
    masks = foreground_mask(two)
    assert masks.dtype == bool and masks.shape == (2, 4, 4)
    assert masks[0, :2].all() and not masks[0, 2:].any()
    assert masks[1, :, :3].all() and not masks[1, :, 3].any()
    assert not foreground_mask(np.full((3, 3), 7.0)).any()
    n = normalize_map(two)
    assert n.min() == 0.0 and n[0].max() == 1.0 and n[1].max() == 1.0


def test_union_mask():
    a = np.array([[True, False], [False, False]])
    b = np.array([[False, False], [False, True]])
    assert union_mask(a, b).tolist() == [[True, False], [False, True]]
    with pytest.raises(ValueError):
        union_mask(a, b[:1])


# ---------------------------------------------------------------- mixing


def _blob_maps(centres: list[tuple[int, int]], size: int = 12) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return np.stack([np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / 20.0) for r, c in centres]).astype(np.float32)


def test_choose_targets_picks_the_nearest_map_but_never_the_source():
    centres = [(2, 2), (2, 9), (9, 2), (9, 9), (3, 3), (7, 9)]
    maps = _blob_maps(centres) * np.arange(1, 7)[:, None, None]  # scale differs: maps are normalised first
    ids = [f"img{i}" for i in range(6)]
    got = choose_targets(maps, maps, n_candidates=6, seed=0, source_ids=ids, pool_ids=ids)
    assert got.tolist() == [4, 5, 4, 5, 0, 3]  # nearest blob other than itself
    # the pool need not be the sources; without ids nothing is excluded
    assert choose_targets(maps[:1], maps, n_candidates=6, seed=0).tolist() == [0]


def test_one_candidate_is_a_seeded_random_target():
    maps = _blob_maps([(r, c) for r in range(0, 12, 3) for c in range(0, 12, 3)])  # 16 maps
    ids = [str(i) for i in range(16)]
    a = choose_targets(maps, maps, n_candidates=1, seed=7, source_ids=ids, pool_ids=ids)
    assert a.tolist() == choose_targets(maps, maps, n_candidates=1, seed=7, source_ids=ids, pool_ids=ids).tolist()
    b = choose_targets(maps, maps, n_candidates=1, seed=8, source_ids=ids, pool_ids=ids)
    assert (a != b).any()
    assert (a != np.arange(16)).all() and (b != np.arange(16)).all()
    nearest = choose_targets(maps, maps, n_candidates=16, seed=7, source_ids=ids, pool_ids=ids)
    assert (a != nearest).sum() >= 8  # random, not the nearest
    # source i's draw does not depend on the other sources
    assert choose_targets(maps[3:4], maps, n_candidates=1, seed=7, source_ids=ids[3:4], pool_ids=ids)[0] != 3


def test_mix_takes_the_source_inside_the_mask_and_keeps_its_labels():
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (2, 6, 6, 3), dtype=np.uint8)
    tgt = rng.integers(0, 256, (2, 6, 6, 3), dtype=np.uint8)
    m_src = np.zeros((2, 6, 6), bool)
    m_src[:, 1:3, 1:3] = True
    m_tgt = np.zeros((2, 6, 6), bool)
    m_tgt[0, 4:, 4:] = True
    mask = union_mask(m_src, m_tgt)
    labels = np.array([[1, 0], [2, 3]])
    out, lab, prov = mix_pairs(src, labels, tgt, mask, source_ids=["s0", "s1"], target_ids=["t0", "t1"])
    assert (out[mask] == src[mask]).all() and (out[~mask] == tgt[~mask]).all()
    assert out.dtype == np.uint8
    assert lab.tolist() == labels.tolist() and lab is not labels
    assert [(p.source_id, p.target_id) for p in prov] == [("s0", "t0"), ("s1", "t1")]
    assert prov[0].mask_area == pytest.approx(8 / 36) and prov[1].mask_area == pytest.approx(4 / 36)
    single = mix(src[0], tgt[0], mask[0])
    assert (single == out[0]).all()


# ---------------------------------------------------------------- img2img (SDEdit)


@pytest.fixture(scope="module")
def tiny_generator():
    return create_generator("tiny", num_classes=[2, 3], resolution=16, seed=0)


def _sources() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8), np.array([[0, 1], [1, 2], [0, 0], [1, 3], [2, 1]])


def test_img2img_limits_strength_zero_and_one(tiny_generator):
    imgs, labels = _sources()
    same = img2img(tiny_generator, imgs, labels, strength=0.0, steps=4, seed=3, device="cpu")
    assert same.dtype == np.uint8 and (same == imgs).all() and same is not imgs
    full = img2img(tiny_generator, imgs, labels, strength=1.0, steps=4, guidance=0.5, seed=3, batch_size=5,
                   device="cpu")
    ref = sample_images(tiny_generator, labels, steps=4, guidance=0.5, seed=3, batch_size=5, device="cpu")
    assert (full == ref).all()


def test_img2img_is_batch_independent_and_moves_further_with_strength(tiny_generator):
    imgs, labels = _sources()
    a = img2img(tiny_generator, imgs, labels, strength=0.5, steps=4, seed=3, batch_size=5, device="cpu")
    b = img2img(tiny_generator, imgs, labels, strength=0.5, steps=4, seed=3, batch_size=2, device="cpu")
    c = img2img(tiny_generator, imgs, labels, strength=0.5, steps=4, seed=4, batch_size=5, device="cpu")
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert np.abs(a.astype(int) - c.astype(int)).max() > 1
    tail = img2img(tiny_generator, imgs[2:], labels[2:], strength=0.5, steps=4, seed=3, first_index=2, device="cpu")
    assert np.abs(a[2:].astype(int) - tail.astype(int)).max() <= 1  # a run split into calls
    dist = [pixel_distance(img2img(tiny_generator, imgs, labels, strength=s, steps=4, seed=3, device="cpu"),
                           imgs).mean() for s in (0.25, 0.5, 1.0)]
    assert 0 < dist[0] < dist[1] < dist[2]
    assert denoising_steps(0.3, 10) == 3 and denoising_steps(1.0, 7) == 7
    with pytest.raises(ValueError, match="no denoising step"):
        img2img(tiny_generator, imgs, labels, strength=0.1, steps=4, device="cpu")


def test_img2img_with_a_guidance_per_image_equals_each_image_at_its_own_guidance(tiny_generator):
    imgs, labels = _sources()
    w = np.array([0.0, 0.5, 1.5, 3.0, 0.25])
    batch = img2img(tiny_generator, imgs, labels, strength=0.75, steps=4, guidance=w, seed=3, batch_size=2,
                    device="cpu")
    for i, wi in enumerate(w):
        alone = img2img(tiny_generator, imgs[[i]], labels[[i]], strength=0.75, steps=4, guidance=float(wi), seed=3,
                        first_index=i, device="cpu")[0]
        assert np.abs(batch[i].astype(int) - alone.astype(int)).max() <= 1
    one = img2img(tiny_generator, imgs, labels, strength=0.75, steps=4, guidance=0.5, seed=3, device="cpu")
    assert np.abs(batch[1].astype(int) - one[1].astype(int)).max() <= 1  # w = 0.5 for image 1 in both
    assert np.abs(batch[3].astype(int) - one[3].astype(int)).max() > 1  # 3.0 is not 0.5
    with pytest.raises(ValueError, match="4 guidance scales for 5 images"):
        img2img(tiny_generator, imgs, labels, strength=0.75, steps=4, guidance=w[:4], device="cpu")


def test_guidance_from_similarity_is_clipped_linear_and_non_increasing():
    kw = dict(lo=0.2, hi=0.3, w_min=1.0, w_max=5.0)
    assert guidance_from_similarity(0.1, **kw) == 5.0 and guidance_from_similarity(0.4, **kw) == 1.0
    assert guidance_from_similarity(0.25, **kw) == pytest.approx(3.0)
    w = guidance_from_similarity(np.linspace(0, 0.5, 11), **kw)
    assert (np.diff(w) <= 0).all() and w.shape == (11,)


# ---------------------------------------------------------------- saliency


def _patch_data(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """32 px grey noise; label 1 has a bright 8×8 patch at one of four places (returned)."""
    x = rng.integers(70, 130, (n, 32, 32, 3)).astype(np.uint8)
    y = rng.integers(0, 2, n)
    where = rng.integers(0, 4, n)
    for i in np.flatnonzero(y == 1):
        r, c = [(4, 4), (4, 20), (20, 4), (20, 20)][where[i]]
        x[i, r:r + 8, c:c + 8] = (240, 40, 40)
    return x, y, where


def test_gradcam_highlights_the_planted_discriminative_patch():
    rng = np.random.default_rng(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        backbone = timm.create_model("porcelain_small_cnn", num_classes=0, widths=(8, 16, 32))
        model = MultiTaskClassifier(backbone, {"noise": 2, "patch": 2}, drop_rate=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(40):
        x, y, _ = _patch_data(32, rng)
        out = model(model.preprocess(x))
        loss = torch.nn.functional.cross_entropy(out["patch"], torch.as_tensor(y))
        loss = loss + torch.nn.functional.cross_entropy(out["noise"], torch.as_tensor(rng.integers(0, 2, 32)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y, where = _patch_data(24, np.random.default_rng(1))
    pos = np.flatnonzero(y == 1)
    maps = gradcam_maps(model, x[pos], 1, classes=np.ones(len(pos), np.int64), batch_size=64)
    assert maps.shape == (len(pos), 32, 32) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1
    for m, k in zip(maps, where[pos]):
        r, c = [(4, 4), (4, 20), (20, 4), (20, 20)][k]
        inside = np.zeros((32, 32), bool)
        inside[r:r + 8, c:c + 8] = True
        assert m[inside].mean() > m[~inside].mean() + 0.2
    assert model.training  # mode restored
    again = gradcam_maps(model, x[pos], 1, classes=np.ones(len(pos), np.int64), batch_size=3)
    np.testing.assert_allclose(again, maps, atol=1e-5)


def test_spectral_residual_highlights_a_bright_square():
    imgs = np.full((2, 48, 40, 3), 60, np.uint8)
    boxes = [(8, 20, 22, 34), (28, 40, 4, 16)]
    for i, (r0, r1, c0, c1) in enumerate(boxes):
        imgs[i, r0:r1, c0:c1] = 230
    maps = spectral_residual_maps(imgs)
    assert maps.shape == (2, 48, 40) and maps.dtype == np.float32 and maps.max() == pytest.approx(1.0)
    for m, (r0, r1, c0, c1) in zip(maps, boxes):
        inside = np.zeros(m.shape, bool)
        inside[r0:r1, c0:c1] = True
        assert m[inside].mean() > 2 * m[~inside].mean()
        fg = foreground_mask(m)
        assert fg[inside].mean() > 3 * fg[~inside].mean()
    assert not spectral_residual_maps(np.full((1, 16, 16, 3), 90, np.uint8)).any()  # flat: nothing salient


def _mask_quality(images: np.ndarray, objects: np.ndarray) -> tuple[float, float]:
    """Mean share of each object's pixels inside the Otsu mask of its spectral map, and of the mask on the object."""
    masks = np.stack([foreground_mask(m) for m in spectral_residual_maps(images)])
    hit = (masks & objects).sum((1, 2))
    return float((hit / objects.sum((1, 2))).mean()), float((hit / np.maximum(masks.sum((1, 2)), 1)).mean())


def test_spectral_masks_find_digits_and_vessels_that_touch_the_frame():
    """Objects that fill their frame (digit scans, vessels cut by the edge) make the FFT's periodic
    wrap-around a jump that plain spectral residual takes for the salient thing: its Otsu masks covered
    9% of the digits' strokes and 24% of the sample's vessels. Mirrored at the edges, they cover most of
    both, and land on the object more often than a mask placed at random would (its share of the image)."""
    from porcelain.data import sample
    from porcelain.data.digits import load_digits_data

    digits = load_digits_data(size=32, seed=0).splits["train"][0][:60]
    strokes = digits[..., 0] < 128  # dark strokes on white
    recall, precision = _mask_quality(digits, strokes)
    assert recall > 0.45 and precision > strokes.mean() + 0.15
    items = list(sample.plan_sample(60, 0))
    vessels = np.stack([sample.render(it.labels, 32, it.seed) for it in items])
    body = np.stack([sample.vessel_mask(it.labels, 32, it.seed) for it in items])
    recall, precision = _mask_quality(vessels, body)
    assert recall > 0.6 and precision > body.mean() + 0.3


# ---------------------------------------------------------------- captions


def test_tiny_blip_loads_through_the_real_loader_and_gives_the_asked_captions(tmp_path):
    path = build_tiny_blip(tmp_path / "blip")
    assert (path / "model.safetensors").is_file() and (path / "vocab.txt").is_file()
    cap = load_captioner(path, device="cpu")
    imgs = np.random.default_rng(0).integers(0, 256, (3, 20, 20, 3), dtype=np.uint8)
    out = caption_images(cap, imgs, n_beam=2, n_sample=3, max_new_tokens=5, seed=1, batch_size=2)
    assert len(out) == 3 and all(len(c) == 5 for c in out)
    assert all(isinstance(t, str) and t for c in out for t in c)
    assert caption_images(cap, imgs, n_beam=2, n_sample=3, max_new_tokens=5, seed=1, batch_size=2) == out
    with pytest.raises(CaptionerNotFoundError, match="blip-image-captioning-base"):
        load_captioner(tmp_path / "absent", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaptionerNotFoundError, match="hf download"):
        load_captioner(tmp_path / "empty", device="cpu")


def test_choose_caption_takes_the_best_score_and_prompt_repeats_by_weight():
    image = np.zeros((4, 4, 3), np.uint8)
    caps = ["a bowl", "a blue vase on a table", "a vase", "a blue vase"]

    def score(img, texts):  # a known scorer: the number of words, NaN for one caption
        return [len(t.split()) if t != "a vase" else float("nan") for t in texts]

    assert choose_caption(image, caps, score) == ("a blue vase on a table", 6.0)
    with pytest.raises(ValueError):
        choose_caption(image, [], score)
    p = sip_prompt("a ming vase", "blue, white porcelain", label_weight=2, caption_weight=1)
    assert p == "a ming vase, a ming vase, blue white porcelain"
    assert sip_prompt("a ming vase", "x", label_weight=1, caption_weight=0) == "a ming vase"
    with pytest.raises(ValueError):
        sip_prompt("a ming vase", "x", label_weight=1.5)  # type: ignore[arg-type]


# ---------------------------------------------------------------- drift


def test_drift_shares_and_distances_per_strength():
    labels = np.array([[0, 1], [1, 1], [2, 0], [1, -1]])  # -1: unknown, left out
    same = [labels[:, 0], np.array([1, 1, 0, 5])]  # predict() style: one array per task
    half = np.array([[0, 0], [2, 1], [2, 1], [0, 1]])
    assert label_drift(same, labels).tolist() == [0.0, 0.0]
    np.testing.assert_allclose(label_drift(half, labels), [0.5, 2 / 3])
    src = np.zeros((4, 2, 2, 3), np.uint8)
    far = src.copy()
    far[:, 0] = 20  # half the pixels +20: RMS = sqrt(400/2)
    rows = drift_by_strength([0.0, 0.5], [same, half], [src, far], src, labels, ["a", "b"])
    assert rows[0].label_drift == {"a": 0.0, "b": 0.0} and rows[0].rms_mean == 0.0
    assert rows[1].label_drift["a"] == 0.5 and rows[1].rms_mean == pytest.approx(np.sqrt(200))
    assert rows[1].to_dict()["n"] == 4
    assert np.isnan(label_drift(np.zeros((2, 1), int), np.full((2, 1), -1)))[0]
