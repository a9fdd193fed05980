"""The pipeline's tasks, one per stage function. No logic lives here."""

from __future__ import annotations

import importlib
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from porcelain.config import (
    ClassifierConfig,
    DataConfig,
    FaithfulnessConfig,
    FilterConfig,
    GenerationConfig,
    ReferenceConfig,
    RuntimeConfig,
    StorageConfig,
    SweepConfig,
)
from porcelain.data.ingest import default_root, fingerprint
from porcelain.report.publish import artifact_key, quarantine_rows
from porcelain.results import ModelRef, ShardRef
from porcelain.storage import Store
from porcelain.synthesizers import SynthesizerConfig
from tasks.policy import TASK_DEFAULTS, content_cache_key
from tasks.progress import progress_artifact


def _lazy(module: str, name: str) -> Any:
    """``module.name``, imported at its first call: a rerun whose tasks all come from cache never
    imports the training, generation and report code (timm, diffusers, torchmetrics, matplotlib)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"{module}.{name} (imported at the first call)"
    return call


ingest_dataset = _lazy("porcelain.data.ingest", "ingest_dataset")
pack_data_shard = _lazy("porcelain.data.ingest", "pack_data_shard")
materialize_builtin = _lazy("porcelain.data.source", "materialize_builtin")
choose_adaptive = _lazy("porcelain.evaluate.adaptive", "choose_adaptive")
measure_faithfulness = _lazy("porcelain.evaluate.judging", "measure_faithfulness")
train_reference = _lazy("porcelain.evaluate.reference", "train_reference")
generate_shard = _lazy("porcelain.generate.shards", "generate_shard")
plan_generation = _lazy("porcelain.generate.targeting", "plan_generation")
decode_alloc = _lazy("porcelain.generate.targeting", "decode_alloc")
build_report = _lazy("porcelain.report.build", "build_report")
published_report = _lazy("porcelain.report.publish", "published_report")
filter_shard = _lazy("porcelain.filter.stage", "filter_shard")
top_up = _lazy("porcelain.filter.stage", "top_up")
measure_drift = _lazy("porcelain.synthesizers.drift", "measure_drift")
prepare_synthesizer = _lazy("porcelain.synthesizers.prepare", "prepare_synthesizer")
train_and_evaluate = _lazy("porcelain.train.sweep", "train_and_evaluate")


def _store(storage: StorageConfig) -> Store:
    return Store(storage.url, storage.storage_options())


@task(name="builtin-data", task_run_name="builtin-data-{data.manifest}", **TASK_DEFAULTS)
def builtin_data(data: DataConfig, storage: StorageConfig) -> dict[str, str]:
    return materialize_builtin(_store(storage), data)


def _ingest_key(context: Any, parameters: dict[str, Any]) -> str:
    """Validation is keyed by the dataset's content fingerprint, not by where it lives."""
    storage: StorageConfig = parameters["storage"]
    data: DataConfig = parameters["data"]
    root = parameters["root"] or default_root(parameters["manifest"])
    fp = fingerprint(parameters["manifest"], root, storage.storage_options())
    # where the dataset lives is not content: the fingerprint covers the manifest and the files
    return content_cache_key(context, {"fingerprint": fp, "data": data.model_dump(mode="json", exclude={"manifest", "root"})})


@task(name="ingest", task_run_name="ingest", **{**TASK_DEFAULTS, "cache_key_fn": _ingest_key})
def ingest(manifest: str, root: str | None, data: DataConfig, storage: StorageConfig) -> dict[str, Any]:
    return ingest_dataset(
        _store(storage), manifest, root, tasks=data.tasks, classes=data.classes, val_fraction=data.val_fraction,
        test_fraction=data.test_fraction, split_seed=data.split_seed, min_images=data.min_images,
        shard_size=data.shard_size, storage_options=storage.storage_options(), fold_case=data.fold_case,
        max_megapixels=data.max_megapixels, near_duplicate_bits=data.near_duplicate_bits)


def _pack_key(context: Any, parameters: dict[str, Any]) -> str:
    """A pack is keyed by its own images (``pack_id``) and size, not by the dataset that lists it: a
    rerun after new images land finds every unchanged pack cached."""
    return content_cache_key(context, {"pack_id": parameters["pack_id"], "size": parameters["size"]})


@task(name="pack-shard", task_run_name="pack-{size}px-{shard_index}", **{**TASK_DEFAULTS, "cache_key_fn": _pack_key})
def pack_shard(data_hash: str, pack_id: str, shard_index: int, n_shards: int, size: int,
               storage: StorageConfig) -> dict[str, str]:
    return pack_data_shard(_store(storage), data_hash, shard_index, n_shards, size, storage.storage_options())


@task(name="prepare-synthesizer", task_run_name="prepare-{cfg.label}", **TASK_DEFAULTS)
def prepare(data: dict[str, Any], cfg: SynthesizerConfig, context: dict[str, Any] | None, storage: StorageConfig,
            runtime: RuntimeConfig) -> ModelRef:
    with progress_artifact(f"prepare-{cfg.label}"):
        return prepare_synthesizer(_store(storage), data, cfg, runtime, context)


@task(name="plan-generation", task_run_name="plan-generation", **TASK_DEFAULTS)
def plan(data: dict[str, Any], sweep: SweepConfig, generation: GenerationConfig, synthesizers: list[SynthesizerConfig],
         storage: StorageConfig) -> dict[str, Any]:
    return plan_generation(_store(storage), data, sweep, generation, synthesizers)


@task(name="generate-shard", task_run_name="generate-{cfg.label}-{spec[combo]}-{spec[start]}", **TASK_DEFAULTS)
def generate(ref: ModelRef, spec: dict[str, Any], cfg: SynthesizerConfig, storage: StorageConfig,
             runtime: RuntimeConfig) -> ShardRef:
    return generate_shard(_store(storage), ref, spec, cfg, runtime)


@task(name="semantic-drift", task_run_name="semantic-drift-{cfg.label}", **TASK_DEFAULTS)
def drift(data: dict[str, Any], ref: ModelRef, cfg: SynthesizerConfig, reference: dict[str, Any], storage: StorageConfig,
          runtime: RuntimeConfig) -> dict[str, Any]:
    return measure_drift(_store(storage), data, ref, cfg, reference, runtime)


@task(name="filter-shard", task_run_name="filter-{shard.synthesizer}-{shard.combo}-{shard.start}", **TASK_DEFAULTS)
def filter_(data: dict[str, Any], shard: ShardRef, reference: dict[str, Any], cfg: FilterConfig,
            storage: StorageConfig, runtime: RuntimeConfig) -> ShardRef:
    return filter_shard(_store(storage), data, shard, reference, cfg, runtime)


@task(name="plan-top-up", task_run_name="plan-top-up-{syn.label}-{round_}", **TASK_DEFAULTS)
def top_up_plan(data: dict[str, Any], syn: SynthesizerConfig, need: list[list], shards: list[ShardRef],
                cfg: FilterConfig, shard_size: int, seed: int, round_: int, storage: StorageConfig) -> list[dict[str, Any]]:
    return top_up(_store(storage), data, syn, decode_alloc(need), shards, cfg, shard_size, seed)


@task(name="reference-classifier", task_run_name="reference-classifier", **TASK_DEFAULTS)
def reference(data: dict[str, Any], cfg: ReferenceConfig, image_size: int, storage: StorageConfig,
              runtime: RuntimeConfig) -> dict[str, Any]:
    with progress_artifact("reference-classifier"):
        return train_reference(_store(storage), data, cfg, image_size, runtime)


@task(name="label-faithfulness", task_run_name="label-faithfulness-{label}", **TASK_DEFAULTS)
def faithfulness(data: dict[str, Any], shards: list[ShardRef], reference: dict[str, Any], cfg: FaithfulnessConfig,
                 label: str, storage: StorageConfig, runtime: RuntimeConfig) -> dict[str, Any]:
    return measure_faithfulness(_store(storage), data, shards, reference, cfg, runtime)


@task(name="train-evaluate", task_run_name="train-{arm}-seed{seed}", **TASK_DEFAULTS)
def train_evaluate(data: dict[str, Any], ratio: str, seed: int, synthetic: dict[str, Any], classifier: ClassifierConfig,
                   synthesizer: str | None, arm: str, storage: StorageConfig, runtime: RuntimeConfig,
                   real_fraction: float = 1.0, synthetic_task_weights: dict[str, float] | None = None) -> dict[str, Any]:
    return train_and_evaluate(_store(storage), data, ratio, seed, synthetic, classifier, runtime, synthesizer,
                              real_fraction, arm, synthetic_task_weights)


@task(name="choose-adaptive", task_run_name="choose-adaptive-{synthesizer}", **TASK_DEFAULTS)
def adapt(data: dict[str, Any], runs: list[dict[str, Any]], synthesizer: str, baseline: str, image_size: int,
          storage: StorageConfig) -> dict[str, Any] | None:
    return choose_adaptive(_store(storage), data, runs, synthesizer, baseline, image_size)


@task(name="report", task_run_name="report", **TASK_DEFAULTS)
def report(summary: dict[str, Any], storage: StorageConfig) -> dict[str, Any]:
    out = build_report(_store(storage), summary)
    return {k: out[k] for k in ("key", "report", "uri", "html")}


@task(name="publish-report", task_run_name="publish-report", cache_policy=NO_CACHE, retries=2)
def publish_report(written: dict[str, Any], name: str, storage: StorageConfig, quarantine_key: str | None = None) -> None:
    """The report, its table and the quarantine as artifacts of this run, also when the report was cached."""
    markdown, table = published_report(_store(storage), written)
    create_markdown_artifact(markdown, key=artifact_key(name, "report"), description=written["uri"])
    if table:
        create_table_artifact(table, key=artifact_key(name, "results"), description="Test metrics per arm and task")
    rows = quarantine_rows(_store(storage), quarantine_key)
    if rows:
        create_table_artifact(rows, key=artifact_key(name, "quarantine"),
                              description=f"Rows set aside or flagged, with the reason ({quarantine_key})")
