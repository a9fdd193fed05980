"""The two entry points of SD + LoRA synthesis: :func:`train_sd_lora` and :func:`generate_sd_images`.

Both are plain functions over a :class:`~porcelain.storage.store.Store` (no orchestration here).

* :func:`train_sd_lora` trains (or resumes, or finds already trained) the class tokens and LoRA
  adapters of one configuration on one train split, and returns a JSON-able *reference*: the
  content-addressed keys and sha256 of the weights plus the identities they were made from.
* :func:`generate_sd_images` loads the weights of a reference (checked against their sha256) into a
  pipeline cached in-process, so the shards of one run load it once, and draws one image per
  ``(labels, seed)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from porcelain.device import choose_device
from porcelain.errors import ConfigError, WeightsError
from porcelain.hashing import stable_hash
from porcelain.models.weights import load_weights, weights_bytes
from porcelain.progress import ProgressFn
from porcelain.storage.store import Store, sha256_bytes

from .checkpoint import checkpoint_key
from .loading import base_model_hash, load_pipeline, optimize_for_inference, pipeline_dtype, resolve_base
from .lora import load_lora, lora_metadata
from .prompts import class_token, load_vocabulary, prompt_for, template_fields, vocabulary_hash
from .settings import SdLoraSettings, parse_settings, training_identity
from .textual_inversion import load_class_tokens, ti_metadata
from .training import inference_template, train_pipeline
from .txt2img import generate

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

__all__ = ["REF_FORMAT", "cached_pipeline", "clear_pipeline_cache", "data_hash", "generate_sd_images",
           "label_prompts", "load_trained_pipeline", "train_sd_lora"]

log = logging.getLogger("porcelain")

REF_FORMAT = "porcelain-sd-lora-ref-v1"
_CACHE_SIZE = 1
_PIPELINES: "OrderedDict[tuple, StableDiffusionPipeline]" = OrderedDict()


def data_hash(images: np.ndarray, labels: Sequence[dict[str, str]]) -> str:
    """sha256 of the training images (dtype, shape, bytes) and their labels."""
    h = hashlib.sha256(json.dumps([str(images.dtype), list(images.shape)]).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(json.dumps([dict(sorted(lab.items())) for lab in labels], sort_keys=True).encode())
    return h.hexdigest()


def _result_key(key: str) -> str:
    return f"{key}/result.json"


def train_sd_lora(store: Store, images: np.ndarray,            # uint8 NHWC, the real train split
                  labels: list[dict[str, str]],                    # one {task: label value} per image
                  cfg: SdLoraSettings, *, key: str,                # store prefix for checkpoints/results
                  device: str = "auto", dtype: str = "auto", progress: ProgressFn | None = None) -> dict:
    """Train (or resume) LoRA / adapters / class tokens; return a JSON-able reference:
    base, base_hash, vocabulary hash, settings identity, weights {name: {"key", "sha256"}}, steps, seconds.

    Idempotent: ``{key}/result.json`` holds the reference of a finished run and is returned as is
    when its identity (settings, vocabulary, data, base weights) matches. A checkpoint under
    ``{key}/checkpoint.safetensors`` of the same identity is resumed from (and removed at the end).
    ``seconds`` is the training time of the call that finished the run. Concurrent calls with one
    ``key`` are serialised with ``store.lock``.
    """
    return _train_sd_lora(store, images, labels, cfg, key=key, device=device, dtype=dtype, progress=progress)[0]


def _train_sd_lora(store: Store, images: np.ndarray, labels: list[dict[str, str]], cfg: SdLoraSettings, *,
                   key: str, device: str = "auto", dtype: str = "auto", progress: ProgressFn | None = None,
                   ) -> tuple[dict, "StableDiffusionPipeline | None"]:
    """:func:`train_sd_lora`, also returning the trained in-memory pipeline (None if the result was stored)."""
    cfg = parse_settings(cfg)
    vocab = load_vocabulary(cfg.prompts.vocabulary)
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ConfigError(f"train_sd_lora: images must be uint8 N×H×W×3, got {images.dtype} {images.shape}")
    if len(labels) != len(images) or not len(images):
        raise ConfigError(f"train_sd_lora: {len(labels)} label dicts for {len(images)} images")
    template = inference_template(cfg, vocab)
    for lab in labels[:1]:  # every template must be fillable from the labels: fail before loading anything
        prompt_for(lab, vocab, template=template)
        for a in cfg.adapters:
            prompt_for(lab, vocab, adapter=a.name, template=vocab.templates.get(a.name, template))
    base_dir = resolve_base(cfg.base_id)
    base_hash = base_model_hash(base_dir)
    vocab_hash = vocabulary_hash(vocab)
    settings_hash = stable_hash(training_identity(cfg))
    identity = stable_hash({"settings": settings_hash, "vocabulary": vocab_hash, "base": base_hash,
                            "data": data_hash(images, labels)}, length=32)
    with store.lock(f"{key}/train"):
        if store.exists(_result_key(key)):
            ref = store.read_json(_result_key(key))
            if ref.get("identity") == identity and all(store.exists(w["key"]) for w in ref["weights"].values()):
                return ref, None
        t0 = time.monotonic()
        dev = choose_device(device)
        pipe = load_pipeline(str(base_dir), device=dev, dtype=dtype)
        result = train_pipeline(pipe, images, labels, cfg, vocab, store=store, key=key, identity=identity,
                                progress=progress)
        extra = {"base_hash": base_hash, "identity": identity}
        weights: dict[str, dict[str, Any]] = {}
        for a in cfg.adapter_specs():
            blob = weights_bytes(result.lora[a.name], lora_metadata(
                cfg.lora, name=a.name, tasks=a.tasks, text_encoder=cfg.lora.train_text_encoder, extra=extra))
            weights[a.name] = {"key": store.put_object(blob, "safetensors"), "sha256": sha256_bytes(blob),
                               "kind": "lora", "tasks": list(a.tasks)}
        if result.ti:
            blob = weights_bytes(result.ti, ti_metadata(list(result.ti), extra))
            weights["textual_inversion"] = {"key": store.put_object(blob, "safetensors"),
                                            "sha256": sha256_bytes(blob), "kind": "textual_inversion",
                                            "tokens": sorted(result.ti)}
        ref = {
            "format": REF_FORMAT, "base": cfg.base_id, "base_hash": base_hash,
            "vocabulary": cfg.prompts.vocabulary, "vocabulary_hash": vocab_hash,
            "settings_hash": settings_hash, "identity": identity, "class_tokens": cfg.class_tokens,
            "prediction_type": pipe.scheduler.config.prediction_type,
            "weights": weights, "steps": result.steps, "resumed_from": result.resumed_from,
            "final_loss": result.losses[-1] if result.losses else None,
            "seconds": round(time.monotonic() - t0, 3),
        }
        store.write_json(_result_key(key), ref)
        store.delete(checkpoint_key(key))
    return ref, pipe


def clear_pipeline_cache() -> None:
    """Drop the in-process pipelines of :func:`generate_sd_images`."""
    _PIPELINES.clear()


def load_trained_pipeline(store: Store, ref: dict, base: str, *, device: str | torch.device = "auto",
                          dtype: str = "auto", compile: bool = False) -> "StableDiffusionPipeline":
    """A fresh pipeline of ``base`` with the weights of ``ref`` loaded (each checked against its sha256)."""
    if ref.get("format") != REF_FORMAT:
        raise WeightsError(f"not an SD LoRA reference (format {ref.get('format')!r}, expected {REF_FORMAT!r})")
    base_dir = resolve_base(base)
    actual = base_model_hash(base_dir)
    if actual != ref["base_hash"]:
        raise WeightsError(f"the SD LoRA weights were trained on base {ref['base']} ({ref['base_hash'][:12]}), "
                           f"but `base` = {base!r} is another model ({actual[:12]})")
    pipe = load_pipeline(str(base_dir), device=device, dtype=dtype)
    for name, w in sorted(ref["weights"].items()):
        state, meta = load_weights(store.read_verified(w["key"], w["sha256"]))
        if w["kind"] == "lora":
            load_lora(pipe, state, meta, name)
        elif w["kind"] == "textual_inversion":
            load_class_tokens(pipe, state, meta)
        else:
            raise WeightsError(f"unknown weights kind {w['kind']!r} for {name!r}")
    return optimize_for_inference(pipe, compile=compile)


def _cached_pipeline(store: Store, ref: dict, cfg: SdLoraSettings, device: str, dtype: str) -> "StableDiffusionPipeline":
    dev = choose_device(device)
    key = (ref["base_hash"], str(dev), str(pipeline_dtype(dev, dtype)), cfg.inference.compile,
           tuple(sorted((n, w["sha256"]) for n, w in ref["weights"].items())))
    if key in _PIPELINES:
        _PIPELINES.move_to_end(key)
        return _PIPELINES[key]
    pipe = load_trained_pipeline(store, ref, cfg.base_id, device=dev, dtype=dtype, compile=cfg.inference.compile)
    _PIPELINES[key] = pipe
    while len(_PIPELINES) > _CACHE_SIZE:
        _PIPELINES.popitem(last=False)
    return pipe


def cached_pipeline(store: Store, ref: dict, cfg: SdLoraSettings, *, device: str = "auto",
                    dtype: str = "auto") -> "StableDiffusionPipeline":
    """The pipeline of ``ref`` with its weights loaded, cached in-process (the one
    :func:`generate_sd_images` uses; img2img refinement shares it)."""
    return _cached_pipeline(store, ref, parse_settings(cfg), device, dtype)


def label_prompts(ref: dict, cfg: SdLoraSettings, labels: list[dict[str, str]],
                  ) -> tuple[list[str], str, dict[str, float], str]:
    """What :func:`generate_sd_images` prompts ``labels`` with: (one prompt per label dict, the
    negative prompt, ``{adapter: weight}``, the class-token mode of ``ref``).

    The prompts use the inference template (``prompts.template`` or the vocabulary's) and the class
    tokens the weights were trained with; adapter weights come from ``cfg.adapters`` (each
    adapter's ``weight``), or 1 for the single adapter.
    """
    cfg = parse_settings(cfg)
    vocab = load_vocabulary(cfg.prompts.vocabulary)
    loras = [n for n, w in ref["weights"].items() if w["kind"] == "lora"]
    if cfg.adapters:
        weights = {a.name: float(a.weight) for a in cfg.adapters}
        unknown = sorted(set(weights) - set(loras))
        if unknown:
            raise ConfigError(f"adapters: {unknown} were not trained in this reference (it has {loras})")
    else:
        weights = {n: 1.0 for n in loras}
    mode = ref.get("class_tokens", "none")
    template = inference_template(cfg, vocab)
    prompts = [prompt_for(lab, vocab, template=template, class_tokens=mode) for lab in labels]
    if mode == "textual_inversion":
        known = set(ref["weights"].get("textual_inversion", {}).get("tokens", []))
        unseen = sorted({class_token(t, lab[t]) for lab in labels for t in template_fields(template)} - known)
        if unseen:
            log.warning("SD LoRA: class tokens %s were not learned (no training image); they are plain text",
                        unseen[:5])
    negative = cfg.prompts.negative_prompt if cfg.prompts.negative_prompt is not None else vocab.negative_prompt
    return prompts, negative, weights, mode


def generate_sd_images(store: Store, ref: dict, labels: list[dict[str, str]], seeds: list[int],
                       cfg: SdLoraSettings, *, device: str = "auto", dtype: str = "auto",
                       ) -> tuple[list[np.ndarray], list[dict]]:
    """Images (uint8 HWC at cfg.resolution) and per-image provenance (prompt, negative prompt, seed,
    lora_scale, adapter weights, steps, guidance).

    Prompts, negative prompt and adapter weights are :func:`label_prompts`'.
    """
    cfg = parse_settings(cfg)
    if len(labels) != len(seeds):
        raise ConfigError(f"generate_sd_images: {len(labels)} label dicts for {len(seeds)} seeds")
    pipe = _cached_pipeline(store, ref, cfg, device, dtype)
    prompts, negative, weights, mode = label_prompts(ref, cfg, labels)
    inf = cfg.inference
    images = generate(pipe, prompts, seeds, negative_prompt=negative, steps=inf.steps, guidance=inf.guidance,
                      batch_size=inf.batch_size, lora_scale=inf.lora_scale, adapter_weights=weights,
                      height=cfg.resolution, width=cfg.resolution)
    shas = {n: w["sha256"] for n, w in ref["weights"].items()}
    provenance = [{"prompt": p, "negative_prompt": negative, "seed": int(s), "lora_scale": inf.lora_scale,
                   "adapter_weights": dict(weights), "steps": inf.steps, "guidance": inf.guidance,
                   "base": ref["base"], "base_hash": ref["base_hash"], "weights": shas,
                   "class_tokens": mode, "resolution": cfg.resolution}
                  for p, s in zip(prompts, seeds)]
    return images, provenance
