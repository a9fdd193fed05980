"""Stable Diffusion img2img (porcelain.diffusion.img2img) and SD as the refiner of sgd_mix and sip:
offline, CPU, on the tiny random pipeline of tests/sd_fixtures.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from porcelain.config import RuntimeConfig, SamplingConfig, config_from_dict
from porcelain.diffusion.api import generate_sd_images, label_prompts
from porcelain.diffusion.img2img import img2img, refine_sd_images, sd_prompts
from porcelain.diffusion.txt2img import generate
from porcelain.errors import ConfigError
from porcelain.hashing import stable_hash
from porcelain.storage.store import Store
from porcelain.synthesizers import get, parse_config
from tests.sd_fixtures import RES, one_thread, sample_data, shared_run, tiny_base, tiny_settings  # noqa: F401

WEIGHTS = {"form": 1.0, "origin": 0.5}


def _sources(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, RES, RES, 3), dtype=np.uint8)


def _edit(pipe, images, prompts, seeds, cfg, **kw):
    inf = cfg.inference
    args = dict(strength=0.5, steps=inf.steps, guidance=inf.guidance, negative_prompt="blurry",
                batch_size=inf.batch_size, lora_scale=inf.lora_scale, adapter_weights=WEIGHTS, output="float")
    args.update(kw)
    return np.stack(img2img(pipe, images, prompts, seeds, **args))


# -- the strength limits ----------------------------------------------------------------------------


def test_strength_zero_returns_the_sources_unchanged(shared_run):
    run = shared_run
    src = run.images[:3]
    out, prov = refine_sd_images(run.store, run.ref, run.cfg, src, run.labels[:3], [1, 2, 3], strength=0.0,
                                 device="cpu")
    assert out.dtype == np.uint8 and np.array_equal(out, src) and out is not src
    assert [p["strength"] for p in prov] == [0.0] * 3 and prov[0]["refiner"] == "sd_lora"
    low = img2img(run.pipe, src, ["a vase"] * 3, [1, 2, 3], strength=0.0, steps=4)
    assert all(np.array_equal(a, b) and a is not b for a, b in zip(low, src))
    with pytest.raises(ValueError, match="no denoising step"):  # 0 < S with floor(S * steps) = 0
        img2img(run.pipe, src, ["a vase"] * 3, [1, 2, 3], strength=0.1, steps=4)


def test_strength_one_equals_txt2img_with_the_same_prompts_and_seeds(shared_run):
    run = shared_run
    labels, seeds = run.labels[3:6], [31, 32, 33]
    # Through the kinds' entry point: the sd_lora kind's prompts, class tokens and adapter weights.
    refined, prov = refine_sd_images(run.store, run.ref, run.cfg, _sources(3), labels, seeds, strength=1.0,
                                     device="cpu")
    drawn, drawn_prov = generate_sd_images(run.store, run.ref, labels, seeds, run.cfg, device="cpu")
    assert np.array_equal(refined, np.stack(drawn))  # bit for bit
    assert [p["prompt"] for p in prov] == [p["prompt"] for p in drawn_prov]
    assert "<glaze_" in prov[0]["prompt"]  # the learned class tokens
    assert [p["seed"] for p in prov] == seeds and prov[0]["guidance"] == run.cfg.inference.guidance
    # The low-level call on the in-memory pipeline, other sources: still txt2img (the source is discarded).
    inf, prompts = run.cfg.inference, [p["prompt"] for p in prov]
    full = _edit(run.pipe, _sources(3, seed=9), prompts, seeds, run.cfg, strength=1.0)
    ref = np.stack(generate(run.pipe, prompts, seeds, negative_prompt="blurry", steps=inf.steps,
                            guidance=inf.guidance, batch_size=inf.batch_size, lora_scale=inf.lora_scale,
                            adapter_weights=WEIGHTS, height=RES, width=RES, output="float"))
    assert np.array_equal(full, ref)
    # Below 1 the source matters, and the shared pipeline's own scheduler was left as it was.
    a = _edit(run.pipe, _sources(3, seed=1), prompts, seeds, run.cfg, strength=0.5)
    b = _edit(run.pipe, _sources(3, seed=2), prompts, seeds, run.cfg, strength=0.5)
    assert float(np.abs(a - b).max()) > 1e-2
    assert len(run.pipe.scheduler.timesteps) == inf.steps


def test_same_seed_same_image_whatever_the_batch_and_guidance_groups(shared_run):
    run = shared_run
    src, prompts, seeds = _sources(3), ["celadon vase", "copper red jar", "white bowl"], [5, 6, 7]
    one = _edit(run.pipe, src, prompts, seeds, run.cfg, batch_size=1)
    three = _edit(run.pipe, src, prompts, seeds, run.cfg, batch_size=3)
    np.testing.assert_allclose(one, three, rtol=0, atol=1e-5)
    last = _edit(run.pipe, src[2:], prompts[2:], seeds[2:], run.cfg, batch_size=4)  # a shard of the last image
    np.testing.assert_allclose(last[0], one[2], rtol=0, atol=1e-5)
    other_seed = _edit(run.pipe, src[:1], prompts[:1], [99], run.cfg)
    assert float(np.abs(other_seed[0] - one[0]).max()) > 1e-2
    # Per-image guidance (SIP): images are grouped by scale, each as if drawn alone at its own.
    mixed = _edit(run.pipe, src, prompts, seeds, run.cfg, guidance=[5.0, 2.0, 5.0])
    np.testing.assert_allclose(mixed[[0, 2]], one[[0, 2]], rtol=0, atol=1e-5)
    alone = _edit(run.pipe, src[1:2], prompts[1:2], seeds[1:2], run.cfg, guidance=2.0)
    np.testing.assert_allclose(mixed[1], alone[0], rtol=0, atol=1e-5)
    assert float(np.abs(mixed[1] - one[1]).max()) > 1e-3


def test_out_of_memory_halves_the_batch_and_retries(shared_run):
    run = shared_run
    src, prompts, seeds = _sources(5), ["a vase"] * 5, [20, 21, 22, 23, 24]
    calls: list[int] = []

    def oom_above_two(module, args, kwargs):
        n = args[0].shape[0] // 2  # classifier-free guidance doubles the batch
        calls.append(n)
        if n > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    handle = run.pipe.unet.register_forward_pre_hook(oom_above_two, with_kwargs=True)
    try:
        got = _edit(run.pipe, src, prompts, seeds, run.cfg, batch_size=8)
    finally:
        handle.remove()
    steps = int(0.5 * run.cfg.inference.steps)
    assert calls == [5, 4] + [2] * steps + [2] * steps + [1] * steps
    np.testing.assert_allclose(got, _edit(run.pipe, src, prompts, seeds, run.cfg, batch_size=1), rtol=0, atol=1e-5)


def test_sip_prompt_is_the_label_phrase_weighted_by_repetition_then_the_caption(shared_run, tiny_base):
    run = shared_run
    labels = run.labels[:2]
    phrases, negative, weights, mode = label_prompts(run.ref, run.cfg, labels)
    assert weights == WEIGHTS and mode == "textual_inversion" and negative and "," in phrases[0]
    captions = ["a vase,  on a table", ""]
    prompts, *_ = sd_prompts(run.ref, run.cfg, labels, captions, label_weight=2)
    # the phrase verbatim (the LoRA's training prompt, commas kept), the caption as one part
    assert prompts == [f"{phrases[0]}, {phrases[0]}, a vase on a table", phrases[1]]
    tok = run.pipe.tokenizer
    assert len(tok(prompts[0]).input_ids) > tok.model_max_length  # two long phrases would cut the caption off
    fitted, *_ = sd_prompts(run.ref, run.cfg, labels, captions, label_weight=2, tokenizer=tok)
    assert fitted == [f"{phrases[0]}, a vase on a table", phrases[1]]
    short = tiny_settings(tiny_base, prompts={"template": "{glaze}"})
    (phrase,), *_ = label_prompts(run.ref, short, labels[:1])
    kept, *_ = sd_prompts(run.ref, short, labels[:1], ["a jar"], label_weight=3, caption_weight=2, tokenizer=tok)
    assert kept == [f"{phrase}, {phrase}, {phrase}, a jar, a jar"]
    with pytest.raises(ValueError, match="label_weight"):
        sd_prompts(run.ref, run.cfg, labels, captions, label_weight=0)


# -- SD as the refiner of sgd_mix and sip ----------------------------------------------------------


@pytest.fixture(scope="module")
def kind_data(tmp_path_factory, tiny_base):
    """A 40-image sample dataset packed at the tiny pipeline's resolution, and an SD refiner config."""
    from porcelain.augment.captions import build_tiny_blip
    from porcelain.data.ingest import ingest_dataset, pack_data_shard
    from porcelain.data.source import materialize_sample
    from porcelain.evaluate.clip import build_tiny_clip

    root = tmp_path_factory.mktemp("sd_kinds")
    store = Store(str(root / "store"))
    src = materialize_sample(store, 40, RES, 0)
    data = ingest_dataset(store, src["manifest"], src["root"], min_images=10)
    for i in range(data["n_shards"]):
        pack_data_shard(store, data["data_hash"], i, data["n_shards"], RES)
    build_tiny_clip(root / "clip", seed=0)
    blip = str(build_tiny_blip(root / "blip", seed=0, image_size=RES))
    sd = tiny_settings(tiny_base, class_tokens="textual_inversion").model_dump(mode="json")
    return store, data, sd, f"local-dir:{root / 'clip'}", blip


def _named(data, row):
    return {t: data["classes"][t][int(v)] for t, v in zip(data["tasks"], row)}


def _check_provenance(store, data, prov, src, seed, first_index, strength):
    from porcelain.data.ingest import load_split, split_ids
    from porcelain.synthesizers.sd_lora import image_seed

    ids = split_ids(store, data["data_hash"], "train")
    _, labels = load_split(store, data["data_hash"], RES, data["n_shards"], "train")
    for j, (i, p) in enumerate(zip(src, prov)):
        assert p["source"] == ids[i] and p["labels"] == _named(data, labels[i])  # the source's label
        assert p["refiner"] == "sd_lora" and p["strength"] == strength
        assert p["seed"] == image_seed(seed, first_index + j) and p["index"] == first_index + j
        assert "<glaze_" in p["prompt"] and p["negative_prompt"]


def test_sgd_mix_refined_by_sd_lora_shares_the_training_of_an_sd_lora_entry(kind_data, monkeypatch):
    store, data, sd, _, _ = kind_data
    rt = RuntimeConfig(device="cpu", threads=1)
    cfg = parse_config({"kind": "sgd_mix", "refiner": "sd_lora", "sd": sd, "saliency": "spectral", "candidates": 3,
                        "strength": 0.5})
    syn = get("sgd_mix")
    ref = syn.prepare(store, data, cfg, rt)
    assert ref.meta["resolution"] == RES and "textual_inversion" in ref.files
    src = np.array([0, 3, 5])
    out, prov, steps = syn.augment(store, ref, cfg, src, seed=11, first_index=2, strength=0.5, runtime=rt)
    assert out.shape == (3, RES, RES, 3) and out.dtype == np.uint8
    assert list(steps) == ["source", "saliency", "mask", "target", "mix", "refined"]
    assert steps["mix"].shape == out.shape and not np.array_equal(out, steps["mix"])
    _check_provenance(store, data, prov, src, 11, 2, 0.5)
    assert all(p["guidance"] == sd["inference"]["guidance"] and p["target"] != p["source"] for p in prov)
    same, _, _ = syn.augment(store, ref, cfg, src, seed=11, first_index=2, strength=0.0, runtime=rt)
    assert np.array_equal(same, steps["mix"])  # S = 0 keeps the mix
    tail, _, _ = syn.augment(store, ref, cfg, src[1:], seed=11, first_index=3, strength=0.5, runtime=rt)
    assert int(np.abs(tail.astype(int) - out[1:].astype(int)).max()) <= 1  # a run split into calls
    # An sd_lora entry with the same settings finds the refiner's training instead of training again.
    import porcelain.diffusion.api as api

    monkeypatch.setattr(api, "train_pipeline", lambda *a, **k: pytest.fail("trained a second time"))
    entry = get("sd_lora").prepare(store, data, parse_config({"kind": "sd_lora", **sd}), rt)
    refiner = ref.meta["refiner"]
    assert entry.key == refiner["key"] and {n: f.sha256 for n, f in entry.files.items()} == \
        {n: f["sha256"] for n, f in refiner["files"].items()}
    # A shard names the refiner and its weights.
    from porcelain.data.ingest import load_split

    _, labels = load_split(store, data["data_hash"], RES, data["n_shards"], "train")
    spec = syn.plan(store, data, cfg, {tuple(labels[0].tolist()): 2}, 8, 1)[0]
    shard = syn.generate(store, ref, spec, cfg, rt)
    assert len(shard.images) == 2 and shard.shard["refiner"] == "sd_lora"
    assert shard.shard["weights_sha256"]["textual_inversion"] == ref.files["textual_inversion"].sha256
    assert all(p["labels"] == _named(data, labels[0]) for p in shard.provenance)


def test_sip_refined_by_sd_lora_prompts_label_and_caption_with_clip_guidance(kind_data):
    store, data, sd, clip, blip = kind_data
    rt = RuntimeConfig(device="cpu", threads=1)
    cfg = parse_config({"kind": "sip", "refiner": "sd_lora", "sd": sd, "clip": clip, "captioner": blip,
                        "n_beam": 1, "n_sample": 1, "label_weight": 2, "strength": 0.5})
    assert cfg.guidance_range == (4.0, 10.0)  # SD's default range: its guidance is off at <= 1
    syn = get("sip")
    ref = syn.prepare(store, data, cfg, rt)
    src = np.arange(6)
    out, prov, steps = syn.augment(store, ref, cfg, src, seed=5, first_index=0, strength=0.5, runtime=rt)
    assert out.shape == (6, RES, RES, 3) and out.dtype == np.uint8 and list(steps) == ["source", "refined"]
    _check_provenance(store, data, prov, src, 5, 0, 0.5)
    phrases, *_ = label_prompts(ref.meta["ref"], cfg.sd, [p["labels"] for p in prov])
    from porcelain.diffusion.api import cached_pipeline

    pipe = cached_pipeline(store, ref.meta["ref"], cfg.sd, device="cpu")
    tok = pipe.tokenizer
    for p, phrase in zip(prov, phrases):
        cap = " ".join(p["caption"].replace(",", " ").split())
        assert cap and p["prompt"].startswith(f"{phrase}, ") and p["prompt"].endswith(f", {cap}")
        twice = f"{phrase}, {phrase}, {cap}"  # label_weight 2, unless the caption would not fit
        assert p["prompt"] == (twice if len(tok(twice).input_ids) <= 77 else f"{phrase}, {cap}")
        assert 4.0 <= p["guidance"] <= 10.0
    assert len({p["guidance"] for p in prov}) > 1  # guidance follows each source's CLIP similarity
    # Each image is the low-level img2img of its source alone, with its prompt, guidance and seed.
    inf = cfg.sd.inference
    k = 4
    alone = img2img(pipe, steps["source"][k:k + 1], [prov[k]["prompt"]], [prov[k]["seed"]], strength=0.5,
                    steps=inf.steps, guidance=prov[k]["guidance"], negative_prompt=prov[k]["negative_prompt"],
                    lora_scale=inf.lora_scale, adapter_weights=prov[k]["adapter_weights"])[0]
    assert int(np.abs(alone.astype(int) - out[k].astype(int)).max()) <= 1


# -- config -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sgd_mix", "sip"])
def test_sd_refiner_config_errors_name_the_key(kind):
    def err(entry):
        with pytest.raises(ConfigError) as e:
            config_from_dict({"synthesizers": [{"kind": kind, **entry}]})
        return str(e.value)

    msg = err({"refiner": "sd_lora"})
    assert f"synthesizers.0 (kind {kind}): sd:" in msg and "`sd.base`" in msg
    assert "`sd.base`" in err({"refiner": "sd_lora", "sd": {"resolution": 64}})
    assert "sd.lora.rankk: unknown key" in err({"refiner": "sd_lora", "sd": {"base": "sd21", "lora": {"rankk": 2}}})
    assert "`sd:` is read only with `refiner: sd_lora`" in err({"sd": {"base": "sd21"}})
    assert "`generator:` configures the closed-set refiner" in err(
        {"refiner": "sd_lora", "sd": {"base": "sd21"}, "generator": {"train_steps": 7}})
    assert "refiner: Input should be 'closed_set' or 'sd_lora'" in err({"refiner": "dalle"})
    # The flow validates the dumped config again (every field present, defaults included): it must pass.
    cfg = config_from_dict({"synthesizers": [{"kind": kind, "refiner": "sd_lora", "sd": {"base": "sd21"}}]})
    again = config_from_dict(cfg.model_dump(mode="json"))
    assert again.synthesizers == cfg.synthesizers and again.synthesizers[0].sd.base == "sd21"


def test_closed_set_refiner_keeps_its_identities():
    """The default refiner's cache keys are those of before the refiner option (same images, no version bump)."""
    from porcelain.diffusion.prompts import load_vocabulary, vocabulary_hash
    from porcelain.synthesizers.closed_set import ClosedSetConfig

    closed = ClosedSetConfig().prepare_identity()
    sampling = SamplingConfig().model_dump(mode="json", exclude={"batch_size"})
    sgd = parse_config({"kind": "sgd_mix"})
    before = {"kind": "sgd_mix", "refiner": closed, "saliency": "gradcam", "saliency_task": None}
    assert sgd.prepare_identity() == before
    assert stable_hash(sgd.identity()) == stable_hash({**before, "strength": 0.5, "candidates": 30, "sampling": sampling})
    sip = parse_config({"kind": "sip"})
    before = {"kind": "sip", "refiner": closed, "clip": None, "captioner": None, "n_beam": 3, "n_sample": 2,
              "vocabulary": vocabulary_hash(load_vocabulary("sample")), "label_weight": 2}
    assert sip.prepare_identity() == before
    assert sip.identity() == {**before, "strength": 0.5, "guidance": "clip", "w_min": 0.25, "w_max": 1.5,
                              "sim_lo": None, "sim_hi": None, "sampling": sampling}
    assert sip.resolution == sgd.resolution == sgd.generator.resolution
