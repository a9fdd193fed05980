"""Quality filters and evidence blocks: faithfulness, memorisation, CLIP, texture, chain and top-up,
FID/KID, the equivalence scale and the adaptive loss weight. Offline, CPU, one thread, tiny models."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import timm
import torch

from porcelain.errors import WeightsError
from porcelain.evaluate.adaptive import synthetic_loss_weight, synthetic_loss_weights
from porcelain.evaluate.clip import (
    TINY_CLIP_CFG,
    build_tiny_clip,
    clip_scores,
    image_text_similarity_matrix,
    load_clip,
    save_clip,
)
from porcelain.evaluate.equivalence import equivalence_scale
from porcelain.evaluate.fid import (
    ClassifierFeatures,
    distribution_distances,
    extract_features,
    fid_from_features,
    kid_from_features,
    real_floor,
)
from porcelain.filter.chain import FilterResult, run_chain, top_up_plan
from porcelain.filter.clip_score import clip_score_filter
from porcelain.filter.faithfulness import faithfulness_filter
from porcelain.filter.memorisation import calibrate, memorisation_filter
from porcelain.filter.texture import glcm_features, texture_filter, texture_table
from porcelain.models.classifier import MultiTaskClassifier

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------ faithfulness


def test_faithfulness_drops_the_wrong_class_per_task_thresholds():
    probs = {"dynasty": np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.55, 0.45]]),
             "kiln": np.array([[0.1, 0.8, 0.1], [0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.2, 0.6, 0.2]])}
    intended = {"dynasty": np.array([0, 0, 0, 0]), "kiln": np.array([1, 1, 2, 1])}
    r = faithfulness_filter(probs, intended, {"dynasty": 0.5, "kiln": 0.5})
    assert r.keep.tolist() == [True, False, False, True]
    assert r.reasons[1].startswith("kiln: p(1)=0.20 < 0.50, predicted 0 (0.70)")
    assert "dynasty" in r.reasons[2] and "kiln" not in r.reasons[2]
    assert r.reasons[0] == "" and r.reasons[3] == ""
    # A stricter dynasty threshold drops the ambiguous image; a task left out is not checked.
    assert faithfulness_filter(probs, intended, {"dynasty": 0.6}).keep.tolist() == [True, True, False, False]
    with pytest.raises(ValueError, match="intended values"):
        faithfulness_filter(probs, {"dynasty": np.array([0, 0, 2, 0]), "kiln": intended["kiln"]}, 0.5)


# ------------------------------------------------------------------------------------------ memorisation


def test_exact_copy_is_flagged_a_different_image_is_not():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    test = rng.integers(0, 256, (30, 16, 16, 3), dtype=np.uint8)
    other = rng.integers(0, 256, (1, 16, 16, 3), dtype=np.uint8)
    generated = np.concatenate([train[7:8], other])
    feats = lambda x: x.reshape(len(x), -1)[:, ::7].astype(np.float32) / 255  # a stand-in feature space
    r = memorisation_filter(generated, train, test, feats(generated), feats(train), feats(test), q=1.0)
    assert r.flagged.tolist() == [True, False]
    assert r.pixel_distance[0] == 0.0 and r.pixel_nearest[0] == 7 and r.feature_distance[0] == 0.0
    assert r.pixel_distance[1] > r.pixel_threshold > 0
    verdict = r.as_filter()
    assert verdict.keep.tolist() == [False, True] and "train #7" in verdict.reasons[0]
    # Pixels only: same verdict; a slightly perturbed copy is still closer than any real test image.
    nudged = np.clip(train[7:8].astype(int) + 2, 0, 255).astype(np.uint8)
    r2 = memorisation_filter(np.concatenate([nudged, other]), train, test)
    assert r2.flagged.tolist() == [True, False] and r2.feature_distance is None
    # thresholds calibrated once on the real images give the same verdicts and distances, with no test images
    cal = calibrate(train, test, feats(train), feats(test), q=1.0)
    r3 = memorisation_filter(generated, train, None, feats(generated), feats(train), q=1.0, calibration=cal)
    assert (cal.pixel, cal.feature) == (r.pixel_threshold, r.feature_threshold)
    assert r3.flagged.tolist() == r.flagged.tolist() and np.array_equal(r3.feature_distance, r.feature_distance)
    with pytest.raises(ValueError, match="q = 1.0"):
        memorisation_filter(generated, train, calibration=cal, q=5.0)
    with pytest.raises(ValueError, match="no feature threshold"):
        memorisation_filter(generated, train, None, feats(generated), feats(train), calibration=calibrate(train, test))


# ------------------------------------------------------------------------------------------ CLIP

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def _colour_images(rng: np.random.Generator, per: int) -> tuple[np.ndarray, list[str]]:
    imgs, words = [], []
    for word, rgb in COLOURS.items():
        base = np.array(rgb, np.float64)[None, None, None, :]
        x = base + rng.normal(0, 20, (per, 32, 32, 3))
        imgs.append(np.clip(x, 0, 255).astype(np.uint8))
        words += [f"a {word} square"] * per
    return np.concatenate(imgs), words


def _train_tiny_clip(model, preprocess, tokenizer, steps: int = 40) -> None:
    rng = np.random.default_rng(1)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    labels = torch.arange(len(COLOURS))
    for _ in range(steps):
        imgs, words = _colour_images(rng, 1)
        img = torch.nn.functional.normalize(model.encode_image(preprocess(imgs)), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(tokenizer(words)), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T
        loss = (torch.nn.functional.cross_entropy(logits, labels)
                + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def colour_clip():
    """The tiny CLIP trained to tell the four colours apart (built and trained once per module)."""
    model, preprocess, tokenizer = build_tiny_clip(seed=0)
    _train_tiny_clip(model, preprocess, tokenizer)
    return model, preprocess, tokenizer


def test_tiny_clip_trained_scores_matching_pairs_higher_and_round_trips_through_safetensors(tmp_path, colour_clip):
    import open_clip

    model, preprocess, tokenizer = colour_clip
    imgs, words = _colour_images(np.random.default_rng(2), 3)
    texts = [f"a {w} square" for w in COLOURS]
    sim = image_text_similarity_matrix(model, preprocess, tokenizer, imgs, texts)
    truth = np.repeat(np.arange(len(COLOURS)), 3)
    assert (sim.argmax(1) == truth).all()
    match = clip_scores(model, preprocess, tokenizer, imgs, words)
    mismatch = clip_scores(model, preprocess, tokenizer, imgs, [texts[(t + 1) % 4] for t in truth])
    assert (match > mismatch).all()
    np.testing.assert_allclose(match, sim[np.arange(len(imgs)), truth], atol=1e-5)

    # Saved as safetensors, loaded back through open_clip's loader: as a local-dir folder ...
    folder = save_clip(model, TINY_CLIP_CFG, tmp_path / "tiny")
    m2, p2, t2 = load_clip(f"local-dir:{folder}")
    np.testing.assert_allclose(clip_scores(m2, p2, t2, imgs, words), match, atol=1e-5)
    # ... and as a registered architecture name with a weights file (load_clip's other path).
    (tmp_path / "porcelain-test-tiny-clip.json").write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(tmp_path / "porcelain-test-tiny-clip.json")
    m3, p3, t3 = load_clip("porcelain-test-tiny-clip", folder / "open_clip_model.safetensors")
    np.testing.assert_allclose(clip_scores(m3, p3, t3, imgs, words), match, atol=1e-5)

    # Pickles are refused; a missing file says what to download.
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    with pytest.raises(WeightsError, match="pickled"):
        load_clip("porcelain-test-tiny-clip", tmp_path / "tiny.pt")
    with pytest.raises(WeightsError, match="download"):
        load_clip("ViT-B-32", tmp_path / "absent.safetensors")
    with pytest.raises(WeightsError, match="download"):
        load_clip("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")

    # The CLIP-score filter on these scores: absolute and relative (per class) thresholds.
    verdict, thr = clip_score_filter(np.concatenate([match, mismatch]), float(np.min(match)))
    assert verdict.keep[:len(match)].all() and thr == {None: float(np.min(match))}
    verdict, thr = clip_score_filter(mismatch, real_scores=match, percentile=0.0,
                                     groups=list(truth), real_groups=list(truth))
    assert not verdict.keep.any() and set(thr) == set(range(4))
    assert verdict.reasons[0].startswith("CLIP score")


# ------------------------------------------------------------------------------------------ texture


def test_glcm_contrast_checkerboard_above_flat_and_texture_table():
    checker = (np.indices((16, 16)).sum(0) % 2 * 255).astype(np.uint8)
    images = np.stack([np.repeat(checker[..., None], 3, -1), np.full((16, 16, 3), 120, np.uint8)])
    f = glcm_features(images)
    assert f["contrast"][0] > f["contrast"][1] == 0.0
    assert f["contrast"][0] == pytest.approx(24.5)  # 49 at 0° and 90°, 0 on the diagonals
    assert f["homogeneity"][1] == 1.0 and f["homogeneity"][0] == pytest.approx(0.51)

    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    smooth = np.clip(120 + rng.normal(0, 8, (12, 16, 16, 3)), 0, 255).astype(np.uint8)
    syn, real = glcm_features(smooth), glcm_features(noisy)
    rows = texture_table(syn, ["a"] * 12, real, ["a"] * 12)
    by_stat = {r["statistic"]: r for r in rows}
    assert by_stat["contrast"]["ks"] == 1.0 and by_stat["contrast"]["ks_p"] < 1e-4
    assert by_stat["contrast"]["synthetic_mean"] < by_stat["contrast"]["real_mean"]


def test_texture_filter_drops_flat_and_noise_images_among_real_like_ones():
    rng = np.random.default_rng(0)
    real = np.concatenate([_waves(rng, 40), _waves(rng, 3)])
    real_labels = {"kind": ["wave"] * 40 + ["rare"] * 3}
    generated = np.concatenate([_waves(rng, 8), np.full((1, 32, 32, 3), 128, np.uint8),
                                rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)])
    verdict, bounds = texture_filter(glcm_features(generated), {"kind": ["wave"] * 10}, glcm_features(real),
                                     real_labels, q=0.02)
    assert verdict.keep[8:].tolist() == [False, False] and verdict.keep[:8].sum() >= 7
    assert "kind=wave: contrast 0.000 outside" in verdict.reasons[8] and "homogeneity" in verdict.reasons[9]
    assert bounds[("kind", "wave")]["n_real"] == 40 and not bounds[("kind", "wave")]["pooled"]
    # a value with fewer than MIN_REAL real images takes its bounds from all real images
    _, pooled = texture_filter(glcm_features(generated[:1]), {"kind": ["rare"]}, glcm_features(real), real_labels, 0.02)
    assert pooled[("kind", "rare")]["pooled"] and pooled[("kind", "rare")]["n_real"] == 43
    with pytest.raises(ValueError, match="q must"):
        texture_filter(glcm_features(generated), {"kind": ["wave"] * 10}, glcm_features(real), real_labels, 0.5)


def test_texture_summary_and_its_report_table_stay_short_for_many_classes():
    from porcelain.filter.texture import texture_summary
    from porcelain.report.build import MAX_TEXTURE_CLASSES, _cell, _texture_section

    rng = np.random.default_rng(1)
    real = rng.integers(0, 256, (60, 16, 16, 3), dtype=np.uint8)
    smooth = np.clip(120 + rng.normal(0, 8, (40, 16, 16, 3)), 0, 255).astype(np.uint8)
    classes = {"kind": [f"c{i}" for i in range(20)]}
    tex = texture_summary(smooth, np.arange(40)[:, None] % 20, real, np.arange(60)[:, None] % 20, ["kind"], classes)
    rows = {(r["class"], r["statistic"]): r for r in tex["tasks"]["kind"]}
    assert rows[("(all)", "contrast")]["ks"] == 1.0 and rows[("(all)", "contrast")]["n_real"] == 60
    assert rows[("c3", "homogeneity")]["n_synthetic"] == 2 and rows[("c3", "homogeneity")]["ks_p"] is not None
    lines = _texture_section(json.loads(json.dumps(tex)), ["kind"], _cell)
    table = [x for x in lines if x.startswith("| kind |")]
    assert len(table) == MAX_TEXTURE_CLASSES + 1 and "14 more classes" in table[-1]
    assert any(x.startswith("| all | all images | 40 / 60 |") for x in lines)


# ------------------------------------------------------------------------------------------ the filter stage


def _stored_data(store, images: np.ndarray, labels: list[str], splits: list[str]) -> dict:
    """A one-task dataset ``colour`` packed at 32 px in ``store``: what the filter stage reads of the real data."""
    import hashlib

    from safetensors.numpy import save as st_save

    from porcelain.data.ingest import dataset_key, pack_key

    h, classes = "d" * 16, {"colour": list(COLOURS)}
    shas = [hashlib.sha256(x.tobytes() + bytes([i % 256])).hexdigest() for i, x in enumerate(images)]
    records = [{"image": f"{i}.png", "sha256": sha, "split": sp, "labels": {"colour": lab}}
               for i, (sha, sp, lab) in enumerate(zip(shas, splits, labels))]
    store.write_json(f"{dataset_key(h)}/dataset.json", {"data_hash": h, "tasks": ["colour"], "classes": classes,
                                                       "root": "", "records": records})
    store.write_json(f"{dataset_key(h)}/packs.json", {"packs": [{"id": "p" + h, "sha256": shas}]})
    store.write_bytes(pack_key("p" + h, 32), st_save({"images": images}))
    return {"data_hash": h, "tasks": ["colour"], "classes": classes, "n_shards": 1}


def _stored_shard(store, images: np.ndarray, combo: list[int]):
    """A generated shard of ``images`` (one combination), as the shard writer leaves it."""
    from PIL import Image

    from porcelain.results import ShardRef

    keys = []
    for x in images:
        buf = io.BytesIO()
        Image.fromarray(x).save(buf, format="PNG")
        keys.append(store.put_object(buf.getvalue(), "png"))
    key = f"synthetic/test/shards/{'-'.join(map(str, combo))}-{keys[0][-12:-4]}.json"
    store.write_json(key, {"images": [{"index": i, "key": k} for i, k in enumerate(keys)],
                           "provenance": {"combo": combo}})
    return ShardRef(key=key, n=len(images), combo=combo, start=0, synthesizer="test")


def _stored_reference(store) -> dict:
    """A random small-CNN reference classifier of the ``colour`` task, stored as the reference stage does."""
    from porcelain.models.classifier import create_classifier
    from porcelain.models.weights import weights_bytes

    model = create_classifier("small_cnn", {"colour": len(COLOURS)}, seed=0)
    blob = weights_bytes(model.state_dict())
    import hashlib

    return {"weights": store.put_object(blob, "safetensors", prefix="weights"),
            "weights_sha256": hashlib.sha256(blob).hexdigest(), "architecture": "small_cnn",
            "num_classes": {"colour": len(COLOURS)}, "tasks": ["colour"], "image_size": 32}


def test_filter_stage_chains_texture_and_clip_score_and_the_report_shows_each_step(tmp_path, colour_clip):
    """The stage on a constructed shard of red squares: a flat and a noise image fail texture (against
    real red squares), two green squares of a red square's grain pass texture but fail the CLIP score with "a red square"
    (threshold: percentile of the real red squares' scores); the rest are kept. Real CLIP scores are
    stored once and reused; the report's section gives pass rates per step and a grid of the rejected."""
    from PIL import Image

    from porcelain.config import FilterConfig, RuntimeConfig
    from porcelain.errors import ConfigError
    from porcelain.filter.stage import filter_shard, filter_summary
    from porcelain.report.build import _cell, _filter_section, _rejected_grid
    from porcelain.report.plots import score_histograms
    from porcelain.storage import Store

    model, _, _ = colour_clip
    folder = save_clip(model, TINY_CLIP_CFG, tmp_path / "clip")
    (tmp_path / "vocab.yaml").write_text('template: "a {colour} square"\n')
    store = Store(str(tmp_path / "store"))
    rng = np.random.default_rng(5)

    def squares(word: str, n: int, lo: float, hi: float) -> np.ndarray:  # noise of a std in [lo, hi] per image
        sd = rng.uniform(lo, hi, (n, 1, 1, 1))
        return np.clip(np.array(COLOURS[word], float) + sd * rng.standard_normal((n, 32, 32, 3)), 0, 255).astype(np.uint8)

    # real images of every texture from smooth to grainy, so that a real-like image lies well inside
    real = np.concatenate([squares(w, 30, 5, 35) for w in COLOURS])
    data = _stored_data(store, real, [w for w in COLOURS for _ in range(30)], ["train", "test"] * (len(real) // 2))
    red = squares("red", 6, 10, 15)
    generated = np.concatenate([red, np.full((1, 32, 32, 3), COLOURS["red"], np.uint8),
                                rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8), squares("green", 2, 10, 15)])
    shard = _stored_shard(store, generated, [0])
    runtime = RuntimeConfig(device="cpu", threads=1)
    reference = {"image_size": 32, "weights_sha256": "none (no step loads it)"}
    clip = {"clip_score": 5.0, "clip": f"local-dir:{folder}", "vocabulary": str(tmp_path / "vocab.yaml")}

    both = FilterConfig(texture=0.02, **clip)
    ref = filter_shard(store, data, shard, reference, both, runtime)
    doc = store.read_json(ref.filter_key)
    assert doc["steps"] == ["texture", "clip_score"]
    assert doc["filter"][6:] == ["texture", "texture", "clip_score", "clip_score"]
    assert doc["keep"][:6] == [True] * 6 and ref.kept == [0, 1, 2, 3, 4, 5]
    assert doc["reasons"][6].startswith("colour=red: contrast 0.000 outside [")
    assert doc["reasons"][8].startswith("CLIP score")
    assert doc["passes"]["texture"]["reached"] == 10 and doc["passes"]["texture"]["passed"] == 8
    assert doc["passes"]["clip_score"]["per_value"]["colour"]["0"] == [8, 6]
    clip_scores_ = doc["scores"]["clip_score"]["values"]["score"]
    thr = doc["scores"]["clip_score"]["thresholds"]["score"]
    assert clip_scores_[6] is None and len(thr) == 1  # not reached; one phrase, one threshold
    assert min(clip_scores_[:6]) >= thr[0] > max(clip_scores_[8:])
    # the threshold is the percentile of the real red squares' scores with "a red square", stored once
    stored = store.read_json(store.list("clipscores")[0])
    red_real = [sc for ph, sc in zip(stored["phrases"], stored["scores"]) if ph == "a red square"]
    assert len(red_real) == 15 and thr[0] == pytest.approx(np.percentile(red_real, 5.0))
    only_clip = filter_shard(store, data, shard, reference, FilterConfig(**clip), runtime)
    assert len(store.list("clipscores")) == 1
    assert store.read_json(only_clip.filter_key)["filter"][8:] == ["clip_score", "clip_score"]
    with pytest.raises(ConfigError, match="filters.texture_tasks"):
        filter_shard(store, data, shard, reference, FilterConfig(texture=0.02, texture_tasks=["shape"]), runtime)

    # the whole chain: faithfulness (a random reference: a low bar) and memorisation in pixels and in the
    # reference's features; an exact copy of a real train image is a near copy in both spaces
    card = _stored_reference(store)
    copy = _stored_shard(store, np.concatenate([real[:1], red[:3]]), [0])
    full = FilterConfig(faithfulness=0.01, memorisation=1.0, memorisation_space="pixels+features", texture=0.02, **clip)
    doc = store.read_json(filter_shard(store, data, copy, card, full, runtime).filter_key)
    assert doc["steps"] == ["faithfulness", "memorisation", "texture", "clip_score"]
    assert doc["filter"][0] == "memorisation" and "feature distance 0.0000" in doc["reasons"][0]
    mem = doc["scores"]["memorisation"]
    assert mem["values"]["feature_distance"][0] < 1e-6 < mem["thresholds"]["feature_distance"][0]
    # what the memorisation step needs from the real images (thresholds, train features) is stored
    # once and shared by every shard: a second shard adds no object under memorisation/, and its
    # thresholds are the real test-to-train percentiles, as the filter computes them unaided
    other = _stored_shard(store, np.concatenate([real[4:5], red[3:]]), [0])
    doc2 = store.read_json(filter_shard(store, data, other, card, full, runtime).filter_key)
    assert len(store.list("memorisation")) == 1 and doc2["filter"][0] == "memorisation"
    assert doc2["scores"]["memorisation"]["thresholds"] == mem["thresholds"]
    train, test = real[0::2], real[1::2]  # the stored data's split alternates train, test
    assert mem["thresholds"]["pixel_distance"][0] == pytest.approx(memorisation_filter(red, train, test).pixel_threshold)

    # the report's part: pass rate per step, per task value and per combination; histograms; the grid
    summary = filter_summary(store, [ref], {(0,): 6}, data["classes"], data["tasks"])
    assert summary["by_step"] == {"texture": {"reached": 10, "passed": 8}, "clip_score": {"reached": 8, "passed": 6}}
    assert [r["filter"] for r in summary["rejected"]] == ["texture", "clip_score", "texture", "clip_score"]
    figs = {"rejected-test.png": _rejected_grid(store, summary["rejected"], data, 32),
            "filter-scores-test.png": score_histograms([
                (f"{step}: {k}", v["passed"], v["dropped"], v["thresholds"])
                for step in summary["steps"] for k, v in summary["scores"][step].items()])}
    section = "\n".join(_filter_section(summary, both.model_dump(mode="json"), "test", figs, _cell))
    assert "Chain: texture 0.02, clip_score 5.0." in section
    assert "texture 80% (8/10), clip_score 75% (6/8)" in section
    assert "| colour=red | 10 | 6 | 60% | 80% (8/10) | 75% (6/8) |" in section
    assert "| red | 10 | 6 | 80% (8/10) | 75% (6/8) |" in section and "`rejected-test.png`" in section
    grid = Image.open(io.BytesIO(figs["rejected-test.png"]))
    assert grid.size[0] > 300 and grid.size[1] > 150 and np.asarray(grid.convert("L")).std() > 10
    assert Image.open(io.BytesIO(figs["filter-scores-test.png"])).size[0] > 300


def test_clip_score_threshold_per_phrase_and_all_real_images_for_rare_phrases():
    real = np.concatenate([np.linspace(0.20, 0.30, 20), [0.05, 0.06]])
    real_groups = ["common"] * 20 + ["rare"] * 2
    verdict, thr = clip_score_filter(np.array([0.21, 0.19, 0.10, 0.04]), real_scores=real, percentile=5.0,
                                     groups=["common", "common", "rare", "rare"], real_groups=real_groups, min_group=10)
    assert thr["common"] == pytest.approx(np.percentile(real[:20], 5.0))
    assert thr["rare"] == pytest.approx(np.percentile(real, 5.0))  # two real images: all real images' percentile
    assert verdict.keep.tolist() == [True, False, True, False] and verdict.reasons[3].endswith("(of all real images)")
    with pytest.raises(ValueError, match="no real scores"):
        clip_score_filter(np.array([0.1]), real_scores=real, groups=["new"], real_groups=real_groups)


def test_filter_config_keys():
    from porcelain.config import FilterConfig, config_from_dict
    from porcelain.errors import ConfigError

    assert not FilterConfig().enabled and not FilterConfig(texture_tasks=["glaze"]).enabled
    assert FilterConfig(texture=0.05).enabled and FilterConfig(clip_score=5, clip="local-dir:/m").enabled
    for bad, key in (({"clip_score": 5}, "filters.clip_score needs filters.clip"),
                     ({"clip": "local-dir:/m"}, "filters.clip is set"),
                     ({"clip_score": 5, "clip": "ViT-B-32"}, "filters.clip must be 'local-dir:"),
                     ({"texture": 0.5}, "filters.texture"), ({"clip_score": 60, "clip": "local-dir:/m"}, "clip_score"),
                     ({"memorisation_space": "pixels+features"}, "filters.memorisation_space applies")):
        with pytest.raises(ConfigError, match=key):
            config_from_dict({"filters": bad})


# ------------------------------------------------------------------------------------------ chain, top-up


def test_chain_runs_on_survivors_and_counts_pass_rates():
    combos = [("a", 0), ("a", 0), ("a", 1), ("b", 1), ("b", 1), ("b", 0)]
    seen: list[list[int]] = []

    def first(idx: np.ndarray) -> FilterResult:
        seen.append(idx.tolist())
        keep = idx % 2 == 0  # drops images 1, 3, 5
        return FilterResult(keep, tuple("" if k else "odd" for k in keep))

    def second(idx: np.ndarray) -> FilterResult:
        seen.append(idx.tolist())
        keep = idx != 4
        return FilterResult(keep, tuple("" if k else "four" for k in keep))

    r = run_chain([("parity", first), ("not4", second)], combos, {"kind": [c[0] for c in combos]})
    assert seen == [[0, 1, 2, 3, 4, 5], [0, 2, 4]]
    assert r.keep.tolist() == [True, False, True, False, False, False]
    assert r.failed_at.tolist() == [-1, 0, -1, 0, 1, 0]
    assert r.reasons[1] == "parity: odd" and r.reasons[4] == "not4: four"
    assert (r.overall["parity"].reached, r.overall["parity"].passed) == (6, 3)
    assert r.overall["not4"].rate == pytest.approx(2 / 3)
    assert r.per_combo["not4"][("b", 1)].rate == 0.0 and r.per_combo["not4"][("a", 0)].rate == 1.0
    assert math.isnan(r.per_combo["not4"][("b", 0)].rate)  # none reached it
    assert r.per_class["parity"]["kind"]["b"].passed == 1
    assert r.kept_per_combo(combos) == {("a", 0): 1, ("a", 1): 1, ("b", 1): 0, ("b", 0): 0}


def test_top_up_meets_the_planned_count():
    planned = {"a": 20, "b": 12, "c": 5}
    accept = {"a": 0.5, "b": 0.25, "c": 1.0}  # the filter keeps every 2nd / 4th / every image
    attempts = {k: planned[k] for k in planned}
    kept = {k: int(attempts[k] * accept[k]) for k in planned}
    for _ in range(5):
        plan = top_up_plan(kept, planned, attempts, max_attempts=1000)
        for k, p in plan.items():
            attempts[k] += p.more
            kept[k] = int(attempts[k] * accept[k])
    assert all(kept[k] >= planned[k] for k in planned)
    assert attempts == {"a": 40, "b": 48, "c": 5}  # exactly what the yields require
    final = top_up_plan(kept, planned, attempts, 1000)
    assert all(p.more == 0 for p in final.values()) and final["b"].attempts_per_kept == 4.0
    # Nothing kept yet: double; the cap bounds the total and says so.
    capped = top_up_plan({"x": 0, "y": 2}, {"x": 10, "y": 10}, {"x": 10, "y": 10}, {"x": 100, "y": 30})
    assert capped["x"].more == 10 and not capped["x"].capped
    assert capped["y"].more == 20 and capped["y"].capped and capped["y"].expected_kept == 6


# ------------------------------------------------------------------------------------------ FID / KID


def _extractor() -> ClassifierFeatures:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        backbone = timm.create_model("porcelain_small_cnn", pretrained=False, num_classes=0,
                                     widths=(8, 16, 32, 64), depth=1)
        return ClassifierFeatures(MultiTaskClassifier(backbone, {"kind": 2}))


def _waves(rng: np.random.Generator, n: int) -> np.ndarray:
    yy, xx = np.mgrid[:32, :32]
    out = np.empty((n, 32, 32, 3))
    for i in range(n):
        wave = 0.5 + 0.5 * np.sin(xx / rng.uniform(2, 6) + yy / rng.uniform(2, 6))
        out[i] = rng.uniform(40, 255, 3) * wave[..., None]
    return out.astype(np.uint8)


def test_fid_and_kid_zero_on_self_and_growing_with_noise():
    rng = np.random.default_rng(0)
    ex = _extractor()
    images = _waves(rng, 120)
    real = extract_features(ex, images)
    assert real.shape == (120, 64)
    fids, kids = [fid_from_features(real, real)], [kid_from_features(real, real, subsets=20)[0]]
    for sigma in (10, 30, 80):
        noisy = np.clip(images + rng.normal(0, sigma, images.shape), 0, 255).astype(np.uint8)
        f = extract_features(ex, noisy)
        fids.append(fid_from_features(real, f))
        kids.append(kid_from_features(real, f, subsets=20)[0])
    assert abs(fids[0]) < 1e-6 and abs(kids[0]) < 1e-3
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    assert all(a < b for a, b in zip(kids, kids[1:])), kids
    assert fids[1] > 1e-3 and kids[-1] > 10 * abs(kids[0])

    # Per task value, the extractor's name beside every number; KID's subset adapts to 5 images.
    labels = {"kind": ["x"] * 115 + ["y"] * 5}
    noisy = np.clip(images + rng.normal(0, 30, images.shape), 0, 255).astype(np.uint8)
    out = distribution_distances(ex, images, labels, noisy, labels, subsets=10)
    assert out["extractor"] == ex.name == "porcelain_small_cnn pooled features (64-d)"
    y = out["per_value"]["kind"]["y"]
    assert y.kid_subset_size == 5 and y.n_real == 5 and y.extractor == ex.name and math.isfinite(y.kid_mean)
    assert out["overall"].fid == pytest.approx(fid_from_features(real, extract_features(ex, noisy)))
    floor = real_floor(ex, images[:60], {"kind": ["x"] * 60}, images[60:], {"kind": ["x"] * 60}, subsets=10)
    assert 0 < floor["overall"].fid < out["overall"].fid
    lone = distribution_distances(ex, images[:1], {"kind": ["x"]}, noisy[:3], {"kind": ["x"] * 3})
    assert lone["overall"].as_dict()["fid"] is None  # fewer than 2 real images: not a number


# ------------------------------------------------------------------------------------------ equivalence, adaptive


def test_equivalence_recovers_a_known_exchange_rate():
    real_curve = lambda n: 0.9 - 2.0 * np.power(n, -0.5)
    k, n_base = 4.0, 100  # 4 synthetic images are worth one real image
    rng = np.random.default_rng(0)
    real = {n: list(real_curve(n) + rng.normal(0, 0.002, 3)) for n in (25, 50, 100, 200, 400, 800)}
    syn = {m: list(real_curve(n_base + m / k) + rng.normal(0, 0.002, 3)) for m in (0, 100, 200, 400, 800, 1600)}
    r = equivalence_scale(real, syn, n_base, n_boot=100)
    assert r["synthetic_per_real"] == pytest.approx(k, rel=0.10)
    assert r["marginal_synthetic_per_real"] == pytest.approx(k, rel=0.10)
    lo, hi = r["interval"]["synthetic_per_real"]
    assert lo <= r["synthetic_per_real"] <= hi and r["n_boot_failed"] == 0
    # Noise-free, the fit is exact.
    exact = equivalence_scale({n: [float(real_curve(n))] for n in real},
                              {m: [float(real_curve(n_base + m / k))] for m in syn}, n_base, n_boot=5)
    assert exact["synthetic_per_real"] == pytest.approx(k, rel=0.01)
    # Synthetic images that do nothing are worth (next to) no real image; ones that hurt, none at any rate.
    flat = equivalence_scale(real, {m: [float(real_curve(n_base))] * 3 for m in syn}, n_base, n_boot=5)
    assert flat["synthetic_per_real"] > 100 * k
    hurt = equivalence_scale(real, {m: [float(real_curve(n_base)) - 1e-5 * m] * 3 for m in syn}, n_base, n_boot=5)
    assert hurt["synthetic_per_real"] == math.inf and hurt["real_equivalent"] < 0


def test_adaptive_weight_is_zero_for_the_task_whose_synthetic_labels_were_scrambled():
    """val predictions of an arm trained with one task's synthetic labels scrambled: that task's val
    macro-F1 falls for every seed, its weight is 0; the untouched task keeps a weight above 0."""
    from porcelain.evaluate.adaptive import val_weights

    rng = np.random.default_rng(0)
    y = np.stack([rng.integers(0, 4, 300), rng.integers(0, 3, 300)], 1)

    def noisy(labels, k, p):  # predictions right with probability p
        wrong = rng.random(len(labels)) > p
        return np.where(wrong, rng.integers(0, k, len(labels)), labels)

    base = [{"shape": noisy(y[:, 0], 4, 0.85), "glaze": noisy(y[:, 1], 3, 0.8)} for _ in range(3)]
    scrambled = [{"shape": noisy(y[:, 0], 4, 0.85), "glaze": noisy(y[:, 1], 3, 0.45)} for _ in range(3)]
    deltas, weights, reasons = val_weights(y, ["shape", "glaze"], {"shape": 4, "glaze": 3}, base, scrambled,
                                           n_boot=300)
    assert weights["glaze"] == 0.0 and deltas["glaze"]["high"] < 0 and "hurts" in reasons["glaze"]
    assert weights["shape"] > 0 and deltas["shape"]["low"] < 0 < deltas["shape"]["high"]


def test_a_zero_loss_weight_leaves_an_image_out_of_that_head_exactly():
    import torch

    from porcelain.train.classifier import weighted_task_loss

    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(8, 3, generator=g), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    cw = torch.tensor([0.5, 1.0, 2.0])
    keep = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.float32)
    ref = torch.nn.functional.cross_entropy(logits[:4], target[:4], weight=cw)
    assert torch.allclose(weighted_task_loss(logits, target, cw, keep), ref)
    full = torch.nn.functional.cross_entropy(logits, target, weight=cw)  # all ones: PyTorch's weighted mean
    assert torch.allclose(weighted_task_loss(logits, target, cw, torch.ones(8)), full)
    assert weighted_task_loss(logits, target, cw, torch.zeros(8)) == 0
    # smoothing ε: PyTorch's label smoothing for that image (unweighted classes, one image at a time)
    eps = torch.tensor([0.1] * 8)
    for i in range(3):
        smooth = torch.nn.functional.cross_entropy(logits[i:i + 1], target[i:i + 1], label_smoothing=0.1)
        assert torch.allclose(weighted_task_loss(logits[i:i + 1], target[i:i + 1], None, torch.ones(1), eps[:1]), smooth)
    mixed = torch.tensor([0.0] * 4 + [0.1] * 4)  # real images stay hard
    assert torch.allclose(weighted_task_loss(logits, target, cw, keep, mixed), ref)


def test_equivalence_from_sweep_runs_recovers_the_rate_of_constructed_runs():
    """Runs shaped as the sweep writes them: real-only on shares of the real set, the baseline, and a
    synthesizer's arms on the full base; scores on a known curve with 3 synthetic = 1 real."""
    from porcelain.evaluate.equivalence import scale_from_runs

    curve = lambda n: 0.9 - 2.0 * np.power(n, -0.5)
    k, n_base, runs = 3.0, 120, []
    for seed in (0, 1, 2):
        for frac in (0.25, 0.5, 1.0):
            n = int(n_base * frac)
            runs.append({"arm": "100:0" if frac == 1.0 else f"real {frac:.0%}", "ratio": "100:0", "seed": seed,
                         "synthesizer": None, "real_fraction": frac, "n_real": n, "n_synthetic": 0,
                         "metrics": {"per_task": {"t": {"macro_f1": float(curve(n))}}}})
        for m in (60, 120, 240, 480):
            runs.append({"arm": f"gen 1:{m / n_base:g}", "ratio": f"1:{m / n_base:g}", "seed": seed,
                         "synthesizer": "gen", "real_fraction": 1.0, "n_real": n_base, "n_synthetic": m,
                         "metrics": {"per_task": {"t": {"macro_f1": float(curve(n_base + m / k))}}}})
    q = scale_from_runs(runs, ["t"], "100:0", n_boot=20)
    assert q["n_base"] == n_base and q["real_sizes"] == [30, 60]
    r = q["by"]["gen"]["t"]
    assert r["synthetic_per_real"] == pytest.approx(k, rel=0.05) and r["real_curve"] in ("power", "log")
    # without learning-curve runs there is nothing to fit, and the report is told why
    assert "real_fractions" in scale_from_runs([x for x in runs if x["real_fraction"] == 1.0], ["t"], "100:0")["skipped"]


def test_real_subset_keeps_every_combination_in_proportion():
    from porcelain.train.sweep import real_subset

    labels = np.array([[0, 0]] * 40 + [[1, 0]] * 8 + [[1, 1]] * 1)
    keep = real_subset(labels, 0.25, seed=0)
    combos = [tuple(r) for r in labels[keep].tolist()]
    assert combos.count((0, 0)) == 10 and combos.count((1, 0)) == 2 and combos.count((1, 1)) == 1
    assert (real_subset(labels, 0.25, seed=0) == keep).all() and not (real_subset(labels, 0.25, seed=1) == keep).all()


def test_adaptive_weight_zero_when_val_delta_interval_below_zero():
    weights = synthetic_loss_weights({"hurts": (-0.04, -0.07, -0.01), "strong": (0.05, 0.02, 0.08),
                                      "helps": (0.01, 0.002, 0.02), "maybe": (0.01, -0.01, 0.03),
                                      "maybe_not": (-0.01, -0.03, 0.01), "unknown": (math.nan, math.nan, math.nan)})
    assert {t: w for t, (w, _) in weights.items()} == {"hurts": 0.0, "strong": 2.0, "helps": 1.0, "maybe": 1.0,
                                                       "maybe_not": 0.5, "unknown": 1.0}
    assert "hurts" in weights["hurts"][1]
    with pytest.raises(ValueError, match="reversed"):
        synthetic_loss_weight(0.0, 0.1, -0.1)
