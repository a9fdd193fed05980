"""Stage: filter one shard's images (the chain of ``filters:``), and plan the top-up that refills
each combination to its planned count of kept images.

The steps (faithfulness, memorisation, texture, clip_score: those configured, cheap ones first) run
through :func:`porcelain.filter.chain.run_chain`, each on the survivors of the ones before. The
verdicts are stored beside the shard, keyed by the shard, how many images it holds, the filter
settings, the CLIP weights' content, the reference classifier and the stage version: per image keep,
the failing step and its reason; per step the images that reached it and passed (overall, per task
value, per combination); and per step the scores it judged (``None`` for images it never saw). The
shard reference that comes back lists the kept images, which is all the sweep reads;
:func:`filter_summary` sums the verdicts of a synthesizer's shards for the report.

All images, generated and real, are judged at the reference classifier's image size. The real train
images' CLIP scores with their own label phrases are computed once per (data, CLIP weights,
vocabulary, size) and stored under ``clipscores/``; the memorisation thresholds (real test-to-train
distances) and the real train features are stored once under ``memorisation/``.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np

from porcelain.config import FilterConfig, RuntimeConfig
from porcelain.data.ingest import load_split
from porcelain.errors import ConfigError
from porcelain.filter.chain import FilterFn, FilterResult, run_chain
from porcelain.filter.clip_score import clip_score_filter
from porcelain.filter.faithfulness import faithfulness_filter
from porcelain.filter.memorisation import memorisation_filter
from porcelain.filter.texture import STATISTICS, glcm_features, texture_filter
from porcelain.generate.plan import Combo, ShardSpec
from porcelain.hashing import stable_hash
from porcelain.results import ShardRef
from porcelain.runtime import apply_runtime, runtime_identity
from porcelain.storage import Store
from porcelain.synthesizers import SynthesizerConfig, get
from porcelain.versions import stage_identity


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def filter_shard(store: Store, data: dict[str, Any], shard: ShardRef | dict[str, Any], reference: dict[str, Any],
                 cfg: FilterConfig, runtime: RuntimeConfig) -> ShardRef:
    """Run the chain on ``shard``'s images; return the shard reference with ``kept`` filled in."""
    from porcelain.evaluate.reference import load_reference
    from porcelain.train.classifier import predict_logits

    apply_runtime(runtime, concurrent=runtime.workers)
    shard = shard if isinstance(shard, ShardRef) else ShardRef.model_validate(shard)
    key = "filtered/" + stable_hash({"shard": shard.key, "n": shard.n, "filters": cfg.model_dump(mode="json"),
                                     "clip": _clip_identity(cfg), "reference": reference["weights_sha256"],
                                     "stage": stage_identity("filters"), "runtime": runtime_identity(runtime)},
                                    24) + ".json"
    with store.lock(key):
        if not store.exists(key) or "filters" in runtime.refresh:
            store.write_json(key, _verdicts(store, data, shard, reference, cfg, runtime, load_reference, predict_logits))
    doc = store.read_json(key)
    kept = [shard.start + i for i, k in enumerate(doc["keep"]) if k]
    return shard.model_copy(update={"kept": kept, "filter_key": key})


CLIP_MIN_REAL = 10
"""A label phrase with fewer real train images than this takes the CLIP threshold of all real images."""


def _clip_identity(cfg: FilterConfig) -> Any:
    """The CLIP weights by the sha256 of their safetensors files (as sip's), not by where they are;
    hashed once per process while the files keep their sizes and times (every shard asks)."""
    if cfg.clip_score is None or cfg.clip is None:
        return None
    folder = Path(cfg.clip.removeprefix("local-dir:")).expanduser()
    files = sorted(folder.rglob("*.safetensors")) if folder.is_dir() else []
    return _weights_identity(cfg.clip, tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@functools.lru_cache(maxsize=8)
def _weights_identity(path: str, stamp: tuple) -> Any:
    from porcelain.hashing import weights_folder_identity

    return weights_folder_identity(path)


def _verdicts(store, data, shard, reference, cfg, runtime, load_reference, predict_logits) -> dict[str, Any]:
    from porcelain.data.images import decode_image, to_array

    size = reference["image_size"]
    combo = tuple(shard.combo)
    manifest = store.read_json(shard.key)
    ims = sorted(manifest["images"], key=lambda im: im["index"])[: shard.n]
    x = np.stack([to_array(decode_image(store.read_bytes(im["key"])), size) for im in ims])
    tasks = data["tasks"]
    scores: dict[str, dict[str, Any]] = {}  # per step: per-image scores (None where the step was not reached)
    real: dict[str, Any] = {}  # real images, loaded once for the steps that need them

    def split(name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in real:
            real[name] = load_split(store, data["data_hash"], size, data["n_shards"], name)
        return real[name]

    model: list[Any] = []

    def reference_model() -> Any:
        if not model:
            model.append(load_reference(store, reference))
        return model[0]

    steps = []  # the chain, cheap steps first; each sees only the survivors of the earlier ones
    if cfg.faithfulness is not None:
        steps.append(("faithfulness", _faithfulness_step(x, combo, tasks, cfg, runtime, reference_model(),
                                                         predict_logits, scores)))
    if cfg.memorisation is not None:
        steps.append(("memorisation", _memorisation_step(x, store, data, reference, cfg, split, reference_model,
                                                         scores)))
    if cfg.texture is not None:
        steps.append(("texture", _texture_step(x, combo, data, cfg, split("train"), scores)))
    if cfg.clip_score is not None:
        steps.append(("clip_score", _clip_step(store, data, x, combo, size, cfg, runtime, split, scores)))
    chain = run_chain(steps, [combo] * len(x), {t: [combo[i]] * len(x) for i, t in enumerate(tasks)})
    return {"keep": chain.keep.tolist(), "reasons": chain.causes,
            "filter": [chain.steps[s] if s >= 0 else "" for s in chain.failed_at.tolist()],
            "combo": list(combo), "start": shard.start, "n": int(len(x)),
            "steps": chain.steps, "passes": chain.counts_json(), "scores": scores}


def _record(scores: dict[str, dict[str, Any]], step: str, n: int, series: tuple[str, ...]) -> dict[str, Any]:
    """``scores[step] = {"values": {series: [None] * n}, "thresholds": {}}``, returned for filling in."""
    scores[step] = {"values": {k: [None] * n for k in series}, "thresholds": {}}
    return scores[step]


def _faithfulness_step(x, combo, tasks, cfg: FilterConfig, runtime, model, predict_logits, scores) -> FilterFn:
    logits = predict_logits(model, x, device=runtime.device, dtype=runtime.dtype)
    probs = {t: _softmax(logits[t]) for t in tasks}
    intended = {t: np.full(len(x), combo[i], dtype=np.int64) for i, t in enumerate(tasks)}
    taus = cfg.faithfulness if isinstance(cfg.faithfulness, dict) else {t: cfg.faithfulness for t in tasks}
    # the histogram's score: the smallest probability of an intended value among the tasks checked
    p_min = np.min([probs[t][np.arange(len(x)), intended[t]] for t in taus if t in probs], axis=0) \
        if any(t in probs for t in taus) else np.ones(len(x))
    rec = _record(scores, "faithfulness", len(x), ("min_probability",))
    rec["thresholds"]["min_probability"] = sorted(set(float(v) for v in taus.values()))

    def step(idx: np.ndarray) -> FilterResult:
        for i in idx:
            rec["values"]["min_probability"][i] = float(p_min[i])
        return faithfulness_filter({t: p[idx] for t, p in probs.items()}, {t: v[idx] for t, v in intended.items()},
                                   cfg.faithfulness)
    return step


def real_memorisation(store: Store, data: dict[str, Any], reference: dict[str, Any], cfg: FilterConfig, size: int,
                      split, reference_model) -> dict[str, Any]:
    """What the memorisation filter needs from the real images, which every shard shares: the
    thresholds (real test-to-train distances at ``cfg.memorisation``) and, in ``pixels+features``,
    the train images' features. Stored once per (data, image size, q, space, reference classifier
    for features) under ``memorisation/`` (safetensors), so a shard pays for its own images only.
    ``{"calibration": Calibration, "train_features": array or None}``."""
    from safetensors.numpy import load as st_load
    from safetensors.numpy import save as st_save

    from porcelain.filter.memorisation import Calibration, calibrate
    from porcelain.hashing import canonical_safetensors

    features = cfg.memorisation_space == "pixels+features"
    key = "memorisation/" + stable_hash({"data": data["data_hash"], "size": size, "q": cfg.memorisation,
                                         "space": cfg.memorisation_space,
                                         "reference": reference["weights_sha256"] if features else None,
                                         "stage": stage_identity("filters")}, 24) + ".safetensors"
    with store.lock(key):
        if not store.exists(key):
            (train, _), (test, _) = split("train"), split("test")
            feats: tuple = (None, None)
            if features:
                from porcelain.evaluate.fid import ClassifierFeatures, extract_features

                ex = ClassifierFeatures(reference_model())
                feats = (extract_features(ex, train), extract_features(ex, test))
            cal = calibrate(train, test, *feats, q=cfg.memorisation)
            arrays = {"pixel_threshold": np.asarray([cal.pixel], np.float64)}
            if features:
                arrays |= {"feature_threshold": np.asarray([cal.feature], np.float64), "train_features": feats[0]}
            store.write_bytes(key, canonical_safetensors(st_save(arrays)))
    got = st_load(store.read_bytes(key))
    cal = Calibration(float(got["pixel_threshold"][0]),
                      float(got["feature_threshold"][0]) if "feature_threshold" in got else None, float(cfg.memorisation))
    return {"calibration": cal, "train_features": got.get("train_features")}


def _memorisation_step(x, store: Store, data, reference, cfg: FilterConfig, split, reference_model,
                       scores) -> FilterFn:
    series = ("pixel_distance",) + (("feature_distance",) if cfg.memorisation_space == "pixels+features" else ())
    rec = _record(scores, "memorisation", len(x), series)

    def step(idx: np.ndarray) -> FilterResult:
        train, _ = split("train")
        real = real_memorisation(store, data, reference, cfg, int(x.shape[1]), split, reference_model)
        feats: tuple = (None, None, None)
        if cfg.memorisation_space == "pixels+features":
            from porcelain.evaluate.fid import ClassifierFeatures, extract_features

            feats = (extract_features(ClassifierFeatures(reference_model()), x[idx]), real["train_features"], None)
        res = memorisation_filter(x[idx], train, None, *feats, q=cfg.memorisation, calibration=real["calibration"])
        rec["thresholds"]["pixel_distance"] = [res.pixel_threshold]
        if res.feature_threshold is not None:
            rec["thresholds"]["feature_distance"] = [res.feature_threshold]
        for j, i in enumerate(idx):
            rec["values"]["pixel_distance"][i] = float(res.pixel_distance[j])
            if res.feature_distance is not None:
                rec["values"]["feature_distance"][i] = float(res.feature_distance[j])
        return res.as_filter()
    return step


def _texture_step(x, combo, data, cfg: FilterConfig, train, scores) -> FilterFn:
    tasks = texture_tasks(cfg, data["tasks"])
    train_x, train_y = train
    real = glcm_features(train_x)
    real_labels = {t: [data["classes"][t][v] for v in train_y[:, data["tasks"].index(t)]] for t in tasks}
    feats = glcm_features(x)
    rec = _record(scores, "texture", len(x), STATISTICS)

    def step(idx: np.ndarray) -> FilterResult:
        for i in idx:
            for k in STATISTICS:
                rec["values"][k][i] = float(feats[k][i])
        intended = {t: [data["classes"][t][combo[data["tasks"].index(t)]]] * len(idx) for t in tasks}
        res, _ = texture_filter({k: v[idx] for k, v in feats.items()}, intended, real, real_labels, cfg.texture)
        return res
    return step


def texture_tasks(cfg: FilterConfig, tasks: list[str]) -> list[str]:
    """The tasks the texture filter and the report's texture table cover (``texture_tasks``, default all)."""
    if cfg.texture_tasks is None:
        return list(tasks)
    unknown = [t for t in cfg.texture_tasks if t not in tasks]
    if unknown:
        raise ConfigError(f"filters.texture_tasks: unknown task(s) {unknown}; the data's tasks are {tasks}")
    return list(cfg.texture_tasks)


def label_phrase(combo: Combo | list[int], data: dict[str, Any], vocab: Any) -> str:
    """The label phrase of a combination (the vocabulary's template), as sip's CLIP similarity uses."""
    from porcelain.diffusion.prompts import prompt_for

    return prompt_for({t: data["classes"][t][v] for t, v in zip(data["tasks"], combo)}, vocab)


def real_clip_scores(store: Store, data: dict[str, Any], cfg: FilterConfig, size: int, load_clip_model,
                     load_train) -> dict[str, Any]:
    """Every real train image's CLIP score with its own label phrase: ``{"phrases", "scores"}``, stored
    once per (data, CLIP weights by content, vocabulary by content, image size) under ``clipscores/``."""
    from porcelain.diffusion.prompts import load_vocabulary, vocabulary_hash

    vocab = load_vocabulary(cfg.vocabulary)
    key = "clipscores/" + stable_hash({"data": data["data_hash"], "clip": _clip_identity(cfg),
                                      "vocabulary": vocabulary_hash(vocab), "size": size,
                                      "stage": stage_identity("filters")}, 24) + ".json"
    with store.lock(key):
        if not store.exists(key):
            from porcelain.evaluate.clip import clip_scores

            images, labels = load_train()
            phrases = [label_phrase(row, data, vocab) for row in labels.tolist()]
            store.write_json(key, {"phrases": phrases,
                                   "scores": [float(v) for v in clip_scores(*load_clip_model(), images, phrases)]})
    return store.read_json(key)


def _clip_step(store, data, x, combo, size: int, cfg: FilterConfig, runtime, split, scores) -> FilterFn:
    from porcelain.device import choose_device
    from porcelain.diffusion.prompts import load_vocabulary
    from porcelain.evaluate.clip import clip_scores, load_clip

    clip: list[Any] = []

    def clip_model() -> Any:
        if not clip:
            clip.append(load_clip(cfg.clip, device=choose_device(runtime.device)))
        return clip[0]

    real = real_clip_scores(store, data, cfg, size, clip_model, lambda: split("train"))
    phrase = label_phrase(combo, data, load_vocabulary(cfg.vocabulary))
    rec = _record(scores, "clip_score", len(x), ("score", "threshold"))

    def step(idx: np.ndarray) -> FilterResult:
        s = clip_scores(*clip_model(), x[idx], [phrase] * len(idx))
        res, thr = clip_score_filter(s, real_scores=np.asarray(real["scores"]), percentile=cfg.clip_score,
                                     groups=[phrase] * len(idx), real_groups=real["phrases"], min_group=CLIP_MIN_REAL)
        rec["thresholds"]["score"] = sorted(set(float(v) for v in thr.values()))
        for j, i in enumerate(idx):
            rec["values"]["score"][i], rec["values"]["threshold"][i] = float(s[j]), float(thr[phrase])
        return res
    return step


def top_up(store: Store, data: dict[str, Any], syn: SynthesizerConfig, need: dict[Combo, int], shards: list[ShardRef],
           cfg: FilterConfig, shard_size: int, seed: int) -> list[dict[str, Any]]:
    """The shard specs that refill every combination short of kept images (grown shards keep their
    keys, so only their new tail is generated). Empty when every combination has enough, or made
    ``max_attempts`` × its planned images already."""
    kept: Counter = Counter()
    made: Counter = Counter()
    for s in shards:
        kept[tuple(s.combo)] += len(s.kept) if s.kept is not None else s.n
        made[tuple(s.combo)] = max(made[tuple(s.combo)], s.start + s.n)
    grown: dict[Combo, int] = {}
    for c, n in need.items():
        if n <= 0 or kept[c] >= n:
            continue
        cap = math.ceil(cfg.max_attempts * n)
        if made[c] >= cap:
            continue
        rate = kept[c] / made[c] if made[c] and kept[c] else 0.5  # nothing kept yet: double
        grown[c] = min(cap, made[c] + math.ceil((n - kept[c]) / rate))
    if not grown:
        return []
    specs: list[ShardSpec] = get(syn.kind).plan(store, data, syn, grown, shard_size, seed)
    have = {(tuple(s.combo), s.start): s.n for s in shards}
    return [s.to_dict() for s in specs if have.get((tuple(s.combo), s.start), 0) < s.count]


MAX_REJECTED = 24
"""Rejected images the report shows (taken in turn from each step)."""


def filter_summary(store: Store, shards: list[ShardRef | dict[str, Any]], need: dict[Combo, int],
                   classes: dict[str, list[str]], tasks: list[str]) -> dict[str, Any]:
    """What the chain did to one synthesizer's shards: made and kept images, attempts per kept image,
    combinations left short; per step the images that reached it and passed (overall, per task value,
    per combination), the scores of those images (``scores[step][series]``: ``passed``, ``dropped``,
    ``thresholds``), and up to :data:`MAX_REJECTED` rejected images (object key, step, reason)."""
    per_filter: Counter = Counter()
    per_value: dict[str, Counter] = {}
    made = kept = 0
    kept_by: Counter = Counter()
    steps: list[str] = []
    by_step: dict[str, Counter] = {}
    by_step_value: dict[str, dict[str, list[int]]] = {}
    by_combo: dict[Combo, dict[str, Any]] = {}
    scores: dict[str, dict[str, dict[str, list[float]]]] = {}
    candidates: dict[str, dict[Combo, list[tuple[ShardRef, int, str]]]] = {}
    for s in shards:
        s = s if isinstance(s, ShardRef) else ShardRef.model_validate(s)
        if s.filter_key is None:
            continue
        doc = store.read_json(s.filter_key)
        combo = tuple(s.combo)
        n_keep = sum(doc["keep"])
        made += len(doc["keep"])
        kept += n_keep
        kept_by[combo] += n_keep
        for t, v in zip(tasks, s.combo):
            c = per_value.setdefault(f"{t}={classes[t][v]}", Counter())
            c["made"] += len(doc["keep"])
            c["kept"] += n_keep
        row = by_combo.setdefault(combo, {"made": 0, "kept": 0, "steps": {}})
        row["made"] += len(doc["keep"])
        row["kept"] += n_keep
        for name in doc.get("steps") or []:  # in chain order (the stored JSON sorts its keys)
            counts = doc["passes"][name]
            if name not in steps:
                steps.append(name)
            by_step.setdefault(name, Counter()).update(reached=counts["reached"], passed=counts["passed"])
            rp = row["steps"].setdefault(name, [0, 0])
            rp[0], rp[1] = rp[0] + counts["reached"], rp[1] + counts["passed"]
            for t, vals in counts["per_value"].items():
                for v, (r, p) in vals.items():
                    cell = by_step_value.setdefault(name, {}).setdefault(f"{t}={classes[t][int(v)]}", [0, 0])
                    cell[0], cell[1] = cell[0] + r, cell[1] + p
        for name, rec in (doc.get("scores") or {}).items():
            for series, values in rec["values"].items():
                out = scores.setdefault(name, {}).setdefault(series, {"passed": [], "dropped": [], "thresholds": []})
                for v, f in zip(values, doc["filter"]):
                    if v is not None:
                        out["dropped" if f == name else "passed"].append(v)
                thr = rec["thresholds"].get(series) or []
                out["thresholds"] = sorted(set(out["thresholds"]) | set(thr))
        for i, (k, f, r) in enumerate(zip(doc["keep"], doc["filter"], doc["reasons"])):
            if not k:
                per_filter[f] += 1
                mine = candidates.setdefault(f, {}).setdefault(combo, [])
                if len(mine) < MAX_REJECTED:
                    mine.append((s, i, r))
    short = [[list(c), int(kept_by[c]), int(n)] for c, n in need.items() if n > 0 and kept_by[c] < n]
    return {"made": made, "kept": kept, "dropped_by": dict(per_filter),
            "attempts_per_kept": (made / kept) if kept else None,
            "by_value": {k: {"made": v["made"], "kept": v["kept"]} for k, v in sorted(per_value.items())},
            "short": short, "steps": steps,
            "by_step": {k: {"reached": v["reached"], "passed": v["passed"]} for k, v in by_step.items()},
            "by_step_value": {k: dict(sorted(v.items())) for k, v in by_step_value.items()},
            "by_combo": [{"combo": list(c), "name": " / ".join(classes[t][v] for t, v in zip(tasks, c)), **r}
                         for c, r in sorted(by_combo.items())],
            "scores": scores, "rejected": _rejected(store, candidates)}


def _rejected(store: Store, candidates: dict[str, dict[Combo, list[tuple[ShardRef, int, str]]]]) -> list[dict[str, Any]]:
    """Up to :data:`MAX_REJECTED` rejected images, taken in turn from each step and, within a step, from
    each combination, with their object keys."""
    queues = {f: [img for group in zip_longest(*by.values()) for img in group if img is not None]
              for f, by in candidates.items()}
    picked = [(f, *q[i]) for i in range(MAX_REJECTED) for f, q in queues.items() if i < len(q)][:MAX_REJECTED]
    manifests: dict[str, list[dict[str, Any]]] = {}
    out = []
    for f, s, i, r in picked:
        if s.key not in manifests:
            manifests[s.key] = sorted(store.read_json(s.key)["images"], key=lambda im: im["index"])
        out.append({"combo": list(s.combo), "filter": f, "reason": r, "image": manifests[s.key][i]["key"]})
    return out
