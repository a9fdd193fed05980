"""Stable Diffusion + LoRA library (porcelain.diffusion): offline, CPU, on a tiny random pipeline."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from porcelain.data import digits as digits_data
from porcelain.data import sample as sample_data_module
from porcelain.diffusion import lora as lora_ops
from porcelain.diffusion.api import generate_sd_images, load_trained_pipeline, train_sd_lora
from porcelain.diffusion.checkpoint import checkpoint_key, read_checkpoint
from porcelain.diffusion.loading import BaseModelNotFoundError, base_model_hash, load_pipeline
from porcelain.diffusion.prompts import (
    Vocabulary,
    class_token,
    load_vocabulary,
    missing_descriptors,
    prompt_for,
    template_fields,
)
from porcelain.diffusion.settings import SdLoraSettings, parse_settings, resolve_base_alias
from porcelain.diffusion.textual_inversion import embeddings_state
from porcelain.diffusion.tiny import CLIP_VOCAB_SIZE
from porcelain.diffusion.txt2img import generate
from porcelain.errors import ConfigError
from porcelain.models.weights import load_weights
from porcelain.storage.store import Store
from tests.sd_fixtures import RES, one_thread, sample_data, shared_run, tiny_base, tiny_settings  # noqa: F401

PROMPTS = ["Chinese porcelain vase, celadon glaze", "a jar with copper red glaze", "a white bowl"]


def _gen(pipe, prompts, seeds, cfg: SdLoraSettings, **kw):
    inf = cfg.inference
    args = dict(negative_prompt="blurry", steps=inf.steps, guidance=inf.guidance, batch_size=inf.batch_size,
                lora_scale=inf.lora_scale, height=RES, width=RES, output="float")
    args.update(kw)
    return np.stack(generate(pipe, prompts, seeds, **args))


# -- tiny pipeline, loading, tokenizer -------------------------------------------------------------


def test_tiny_pipeline_saves_and_loads_through_load_pipeline(tiny_base, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = load_pipeline(str(tiny_base), device="cpu")
    assert isinstance(pipe, StableDiffusionPipeline)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.safety_checker is None
    assert pipe.unet.dtype == torch.float32
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer) == CLIP_VOCAB_SIZE
    assert pipe.vae_scale_factor == 4
    # The base hash is a content identity: stable, and changed by a change of the weights.
    h = base_model_hash(pipe)
    assert h == base_model_hash(tiny_base)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_base, copy)
    assert base_model_hash(copy) == h
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    assert base_model_hash(copy) != h


def test_missing_base_names_what_to_download(tmp_path):
    with pytest.raises(BaseModelNotFoundError) as e:
        load_pipeline(str(tmp_path / "nowhere"), device="cpu")
    msg = str(e.value)
    assert "huggingface-cli download stabilityai/stable-diffusion-2-1-base" in msg and "`base`" in msg
    with pytest.raises(BaseModelNotFoundError) as e:
        load_pipeline("porcelain-tests/no-such-model", device="cpu")
    msg = str(e.value)
    assert "huggingface-cli download porcelain-tests/no-such-model --local-dir" in msg
    assert "HF_HOME" in msg and "`base`" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseModelNotFoundError, match="model_index.json"):
        load_pipeline(str(tmp_path / "empty"), device="cpu")
    assert resolve_base_alias("sd21") == "stabilityai/stable-diffusion-2-1-base"
    assert resolve_base_alias("SD15") == "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_rebuilt_tokenizer_is_the_real_clip_bpe(tiny_base):
    import open_clip

    pipe = load_pipeline(str(tiny_base), device="cpu")
    tok = pipe.tokenizer
    assert len(tok) == CLIP_VOCAB_SIZE
    ids = tok("moon white glaze").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<|startoftext|>", "moon</w>", "white</w>", "glaze</w>",
                                              "<|endoftext|>"]
    # Same ids as open_clip's own (independent) BPE implementation, on a harder text too.
    text = "Qing-dynasty copper_red meiping, 18th c. Jingdezhen!"
    ref = open_clip.get_tokenizer("ViT-B-32")([text])[0]
    ours = tok(text).input_ids
    assert ours == [int(i) for i in ref[: len(ours)]]
    assert tok.model_max_length == 77


# -- settings ---------------------------------------------------------------------------------------


def test_settings_validation_names_the_key():
    with pytest.raises(ConfigError, match=r"lora\.rank"):
        parse_settings({"lora": {"rank": 0}})
    with pytest.raises(ConfigError, match=r"inference\.stepz"):
        parse_settings({"inference": {"stepz": 3}})
    with pytest.raises(ConfigError, match=r"adapters\[1\]\.name"):
        parse_settings({"adapters": [{"name": "a", "tasks": ["glaze"]}, {"name": "bad name", "tasks": ["type"]}]})
    with pytest.raises(ConfigError, match=r"synthesizer\.resolution"):
        parse_settings({"resolution": 100}, prefix="synthesizer.")
    cfg = parse_settings({"base": "sd15"})
    assert cfg.base_id == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert cfg.inference.lora_scale == 0.4 and cfg.lora.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    assert [a.name for a in cfg.adapter_specs()] == ["all"]


# -- prompts ----------------------------------------------------------------------------------------


def test_prompt_template_fallback_and_unknown_task():
    vocab = Vocabulary(template="{glaze}, {type}, porcelain", negative_prompt="blurry",
                       descriptors={"glaze": {"moon_white": "moon white glaze with pale blue"}},
                       templates={"form": "{type} only"})
    labels = {"glaze": "moon_white", "type": "tall_vase", "kiln": "ding"}
    assert prompt_for(labels, vocab) == "moon white glaze with pale blue, tall vase, porcelain"
    assert prompt_for(labels, vocab, adapter="form") == "tall vase only"
    assert prompt_for(labels, vocab, adapter="other") == prompt_for(labels, vocab)
    assert prompt_for(labels, vocab, class_tokens="dreambooth") == (
        "<glaze_moon_white> moon white glaze with pale blue, <type_tall_vase> tall vase, porcelain")
    with pytest.raises(ConfigError, match="dynasty"):
        prompt_for(labels, vocab, template="{dynasty} dynasty, {glaze}")
    with pytest.raises(ConfigError, match="template"):
        template_fields("{glaze!r} {type:>3}")
    assert class_token("Glaze", "Moon White") == "<glaze_moon_white>"


def test_shipped_vocabularies_cover_every_label():
    for name, classes in (("sample", sample_data_module.CLASSES), ("digits", digits_data.CLASSES)):
        vocab = load_vocabulary(name)
        assert missing_descriptors(vocab, classes) == [], name
        for t in [vocab.template, *vocab.templates.values()]:
            assert set(template_fields(t)) <= set(classes), (name, t)
        assert set(template_fields(vocab.template)) == set(classes), name
    sample_vocab = load_vocabulary("sample")
    for it in sample_data_module.plan_sample(40, seed=1):
        p = prompt_for(it.labels, sample_vocab)
        assert sample_vocab.descriptors["glaze"][it.labels["glaze"]] in p
    digits_vocab = load_vocabulary("digits")
    p = prompt_for(digits_data.labels_of(8), digits_vocab)
    assert "eight (8)" in p and "two closed loops" in p and "even" in p
    with pytest.raises(ConfigError, match="neither a built-in"):
        load_vocabulary("no_such_vocabulary")


# -- training ---------------------------------------------------------------------------------------


def _base_view(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Base tensors of a (possibly peft-wrapped) module state, under their original names."""
    return {k.replace(".base_layer", ""): v for k, v in state.items() if ".lora_" not in k}


def test_training_changes_only_adapter_weights(shared_run):
    pipe = shared_run.pipe
    for comp in ("unet", "vae", "text_encoder"):
        before = shared_run.base_state[comp]
        after = _base_view(getattr(pipe, comp).state_dict())
        assert set(after) == set(before), comp
        for k, v in before.items():
            a = after[k]
            if comp == "text_encoder" and k.endswith("token_embedding.weight"):
                assert a.shape[0] > v.shape[0]  # class tokens added at the end
                a = a[: v.shape[0]]
            assert torch.equal(a, v), f"{comp}.{k} changed"
    # ... and the adapters did train (lora_B starts at zero).
    for name in ("form", "origin"):
        state = lora_ops.lora_state_dict(pipe, name)
        assert any(k.startswith("unet.") for k in state)
        assert any(float(v.abs().max()) > 0 for k, v in state.items() if ".lora_B." in k), name
    a, b = (lora_ops.lora_state_dict(pipe, n) for n in ("form", "origin"))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    trainable = [n for c in ("unet", "text_encoder", "vae") for n, p in getattr(pipe, c).named_parameters()
                 if p.requires_grad]
    assert trainable == []


def test_textual_inversion_changes_only_new_rows_and_reloads(shared_run, tiny_base):
    pipe = shared_run.pipe
    tokens = shared_run.ref["weights"]["textual_inversion"]["tokens"]
    assert "<glaze_celadon>" in tokens and "<dynasty_song>" in tokens
    assert len(pipe.tokenizer) == CLIP_VOCAB_SIZE + len(tokens)
    ids = pipe.tokenizer("<glaze_celadon> celadon").input_ids
    plain = pipe.tokenizer("celadon").input_ids
    assert ids[1] >= CLIP_VOCAB_SIZE and ids[2:] == plain[1:]  # one new token, then the word's BPE pieces
    learned = embeddings_state(pipe, tokens)
    # Initialised from the descriptor's embedding, then trained: not equal to the initialisation.
    fresh = load_pipeline(str(tiny_base), device="cpu")
    emb = fresh.text_encoder.get_input_embeddings().weight
    init_ids = fresh.tokenizer("celadon glaze, jade green with fine crackle", add_special_tokens=False).input_ids
    with torch.no_grad():
        init = emb[init_ids].mean(0)
    assert not torch.allclose(learned["<glaze_celadon>"], init)
    assert float((learned["<glaze_celadon>"] - init).abs().max()) < 1.0
    # Stored, and reloaded into a fresh pipeline's tokenizer + text encoder.
    w = shared_run.ref["weights"]["textual_inversion"]
    state, meta = load_weights(shared_run.store.read_verified(w["key"], w["sha256"]))
    assert sorted(state) == tokens and all(torch.equal(state[t], learned[t]) for t in tokens)
    from porcelain.diffusion.textual_inversion import load_class_tokens

    load_class_tokens(fresh, state, meta)
    assert fresh.tokenizer("<glaze_celadon> celadon").input_ids == ids
    re_learned = embeddings_state(fresh, tokens)
    assert all(torch.equal(re_learned[t], learned[t]) for t in tokens)
    prompt = ["<glaze_celadon> celadon glaze, <type_vase> vase"]
    with torch.no_grad():
        a = pipe.text_encoder(pipe.tokenizer(prompt, return_tensors="pt").input_ids)[0]
        b = fresh.text_encoder(fresh.tokenizer(prompt, return_tensors="pt").input_ids)[0]
    assert torch.equal(a, b)


def test_saved_lora_reloads_and_reproduces_images_exactly(shared_run):
    cfg, ref = shared_run.cfg, shared_run.ref
    labels = shared_run.labels[:3]
    seeds = [11, 12, 13]
    images, prov = generate_sd_images(shared_run.store, ref, labels, seeds, cfg, device="cpu")
    assert len(images) == 3 and images[0].shape == (RES, RES, 3) and images[0].dtype == np.uint8
    assert prov[0]["seed"] == 11 and prov[0]["adapter_weights"] == {"form": 1.0, "origin": 0.5}
    assert "<glaze_" in prov[0]["prompt"] and prov[0]["negative_prompt"]
    # The trained in-memory pipeline, with the same prompts, weights and seeds, draws the same pixels.
    inf = cfg.inference
    mine = generate(shared_run.pipe, [p["prompt"] for p in prov], seeds, negative_prompt=prov[0]["negative_prompt"],
                    steps=inf.steps, guidance=inf.guidance, batch_size=inf.batch_size, lora_scale=inf.lora_scale,
                    adapter_weights={"form": 1.0, "origin": 0.5}, height=RES, width=RES)
    assert all(np.array_equal(a, b) for a, b in zip(images, mine))
    # The LoRA matters: scale 0 (the base model) gives other images.
    base = generate(shared_run.pipe, [p["prompt"] for p in prov], seeds, negative_prompt=prov[0]["negative_prompt"],
                    steps=inf.steps, guidance=inf.guidance, batch_size=inf.batch_size, lora_scale=0.0,
                    adapter_weights={"form": 1.0, "origin": 0.5}, height=RES, width=RES)
    assert not all(np.array_equal(a, b) for a, b in zip(images, base))
    # The cached pipeline is reused by a second shard; a corrupt weight file is refused.
    from porcelain.diffusion import api

    cached = api._cached_pipeline(shared_run.store, ref, cfg, "cpu", "auto")
    assert api._cached_pipeline(shared_run.store, ref, cfg, "cpu", "auto") is cached
    bad = {**ref, "weights": {**ref["weights"], "form": {**ref["weights"]["form"], "sha256": "0" * 64}}}
    from porcelain.errors import WeightsError

    with pytest.raises(WeightsError, match="sha256"):
        load_trained_pipeline(shared_run.store, bad, cfg.base, device="cpu")


def test_two_adapters_weighted_one_zero_give_each_alone(shared_run):
    cfg, ref, store = shared_run.cfg, shared_run.ref, shared_run.store
    both = load_trained_pipeline(store, ref, cfg.base, device="cpu")
    seeds = [3, 4]
    prompts = PROMPTS[:2]
    only = {}
    for name in ("form", "origin"):
        sub = {**ref, "weights": {k: v for k, v in ref["weights"].items() if k in (name, "textual_inversion")}}
        alone = load_trained_pipeline(store, sub, cfg.base, device="cpu")
        only[name] = _gen(alone, prompts, seeds, cfg, adapter_weights={name: 1.0})
    w10 = _gen(both, prompts, seeds, cfg, adapter_weights={"form": 1.0, "origin": 0.0})
    w01 = _gen(both, prompts, seeds, cfg, adapter_weights={"form": 0.0, "origin": 1.0})
    np.testing.assert_array_equal(w10, only["form"])
    np.testing.assert_array_equal(w01, only["origin"])
    assert not np.array_equal(w10, w01)
    mixed = _gen(both, prompts, seeds, cfg, adapter_weights={"form": 1.0, "origin": 0.5})
    assert not np.array_equal(mixed, w10) and not np.array_equal(mixed, w01)


class _Killed(RuntimeError):
    pass


def test_killed_training_resumes_to_identical_weights(tiny_base, sample_data, tmp_path):
    images, labels = sample_data
    images, labels = images[:8], labels[:8]
    cfg = tiny_settings(tiny_base, class_tokens="textual_inversion",
                        lora={"train_steps": 4, "checkpoint_every": 2},
                        textual_inversion={"steps": 2})
    store = Store(str(tmp_path))
    full = train_sd_lora(store, images, labels, cfg, key="full", device="cpu")
    assert full["steps"] == 6 and full["resumed_from"] == 0

    def kill_at_5(done, total, info):
        if done == 5:
            raise _Killed("simulated kill")

    with pytest.raises(_Killed):
        train_sd_lora(store, images, labels, cfg, key="killed", device="cpu", progress=kill_at_5)
    ck = read_checkpoint(store, "killed")
    assert ck is not None and ck.step == 4 and ck.phase == "all" and ck.optimizer is not None
    assert store.read_bytes(checkpoint_key("killed"))[8:9] == b"{"  # safetensors, not a pickle
    assert not store.exists("killed/result.json")
    seen = []
    resumed = train_sd_lora(store, images, labels, cfg, key="killed", device="cpu",
                            progress=lambda d, t, i: seen.append(d))
    assert seen == [5, 6] and resumed["resumed_from"] == 4
    assert {n: w["sha256"] for n, w in resumed["weights"].items()} == \
        {n: w["sha256"] for n, w in full["weights"].items()}
    assert not store.exists(checkpoint_key("killed"))
    # A finished run is found, not retrained; other settings are another run.
    assert train_sd_lora(store, images, labels, cfg, key="killed", device="cpu",
                         progress=lambda d, t, i: seen.append(-d))["weights"] == resumed["weights"]
    assert seen == [5, 6]
    other = train_sd_lora(store, images, labels, tiny_settings(tiny_base, class_tokens="textual_inversion",
                          lora={"train_steps": 4, "checkpoint_every": 2}, textual_inversion={"steps": 2},
                          seed=1), key="killed", device="cpu")
    assert other["weights"]["all"]["sha256"] != full["weights"]["all"]["sha256"]


# -- txt2img ----------------------------------------------------------------------------------------


def test_per_image_seeds_make_images_independent_of_batch_size(shared_run):
    pipe = load_trained_pipeline(shared_run.store, shared_run.ref, shared_run.cfg.base, device="cpu")
    cfg = shared_run.cfg
    w = {"form": 1.0, "origin": 0.5}
    one = _gen(pipe, PROMPTS, [5, 6, 7], cfg, batch_size=1, adapter_weights=w)
    three = _gen(pipe, PROMPTS, [5, 6, 7], cfg, batch_size=3, adapter_weights=w)
    np.testing.assert_allclose(one, three, rtol=0, atol=1e-5)
    # A shard holding only the last image draws it the same way.
    last = _gen(pipe, PROMPTS[2:], [7], cfg, batch_size=4, adapter_weights=w)
    np.testing.assert_allclose(last[0], one[2], rtol=0, atol=1e-5)
    other_seed = _gen(pipe, PROMPTS[:1], [99], cfg, adapter_weights=w)
    assert float(np.abs(other_seed[0] - one[0]).max()) > 1e-2


class _OomAbove:
    """A pipeline whose calls with more than ``limit`` prompts raise CUDA out-of-memory."""

    def __init__(self, pipe, limit: int):
        self._pipe, self._limit, self.calls = pipe, limit, []

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, *, prompt, **kw):
        self.calls.append(len(prompt))
        if len(prompt) > self._limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self._pipe(prompt=prompt, **kw)


def test_oom_halves_the_batch_and_retries(shared_run):
    cfg = shared_run.cfg
    pipe = shared_run.pipe
    prompts, seeds = [PROMPTS[i % 3] for i in range(5)], [20, 21, 22, 23, 24]
    fake = _OomAbove(pipe, limit=2)
    got = _gen(fake, prompts, seeds, cfg, batch_size=8)
    assert fake.calls == [5, 4, 2, 2, 1]
    ref = _gen(pipe, prompts, seeds, cfg, batch_size=1)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    with pytest.raises(torch.OutOfMemoryError):
        _gen(_OomAbove(pipe, limit=0), prompts[:2], seeds[:2], cfg, batch_size=2)
