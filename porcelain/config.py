"""The run configuration: one pydantic model per run, loaded from YAML, with clear validation errors."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from porcelain.errors import ConfigError
from porcelain.synthesizers.base import SynthesizerConfig

SAMPLE = "sample"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SampleConfig(_Model):
    """The built-in procedural sample, used when ``data.manifest`` is ``sample``."""

    n: Annotated[int, Field(ge=20, le=200_000)] = 1600
    size: Annotated[int, Field(ge=8, le=512)] = 32
    seed: int = 0


class DigitsConfig(_Model):
    """scikit-learn's 8×8 digit scans, few-shot and long-tailed, used when ``data.manifest`` is ``digits``."""

    size: Annotated[int, Field(ge=8, le=512, description="Image side in px (bicubic upscale of the 8×8 scans).")] = 32
    shots: Annotated[int, Field(ge=1, le=100, description="Train images of the commonest digit.")] = 25
    imbalance: Annotated[float, Field(ge=1.0, le=100.0, description=(
        "Commonest / rarest train class count; counts fall geometrically over a seeded digit order."))] = 10.0
    seed: int = Field(0, description="Seed of the digit order and of which scans go to train/val/test.")


class DataConfig(_Model):
    manifest: str = Field(SAMPLE, description=(
        "Manifest CSV (local path or fsspec URL), or a built-in dataset: 'sample' (procedural porcelain, "
        "settings in data.sample) or 'digits' (scikit-learn's digit scans as a few-shot long-tailed set with "
        "its own train/val/test split, settings in data.digits)."))
    root: str | None = Field(None, description="Image root; defaults to the manifest's folder.")
    tasks: list[str] | None = Field(None, description="Task columns; default: every column except image/split.")
    classes: dict[str, list[str]] | None = Field(None, description="Allowed labels per task; others are quarantined.")
    val_fraction: Annotated[float, Field(ge=0.0, lt=0.5)] = 0.15
    test_fraction: Annotated[float, Field(gt=0.0, lt=0.5)] = 0.2
    split_seed: int = 0
    min_images: Annotated[int, Field(ge=1)] = 20
    shard_size: Annotated[int, Field(ge=1, le=100_000)] = 512
    fold_case: bool = Field(False, description=(
        "Merge labels of a task that differ only in case ('Ming'/'ming') into the most frequent spelling; "
        "without it they stay separate classes and a warning names them."))
    max_megapixels: Annotated[float, Field(gt=0, le=10_000)] = Field(300.0, description=(
        "Images with more pixels (in millions) are quarantined as too_large. Large JPEGs are decoded at "
        "reduced size; a file with far more pixels than bytes allow is quarantined as decompression_bomb."))
    near_duplicate_bits: Annotated[int, Field(ge=0, le=128)] | None = Field(16, description=(
        "Flag kept images in different splits whose 256-bit perceptual hashes differ in at most this many "
        "bits (near_duplicate_across_splits in quarantine.csv; they are not dropped); null: don't look."))
    sample: SampleConfig = SampleConfig()
    digits: DigitsConfig = DigitsConfig()


class StorageConfig(_Model):
    url: str = Field("./porcelain-runs", description="Where everything a run makes lives: a folder or s3://bucket/prefix.")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto); credentials come from the environment.")
    anon: bool = False

    def storage_options(self) -> dict[str, Any]:
        if not self.url.startswith("s3://"):
            return {}
        opts: dict[str, Any] = {"anon": self.anon}
        if self.endpoint_url:
            opts["client_kwargs"] = {"endpoint_url": self.endpoint_url}
        return opts


class GeneratorConfig(_Model):
    """Closed-set attribute-conditional diffusion model, trained from scratch on the train split."""

    class Spec(_Model):
        """Overrides of the preset's architecture and noise schedule (``GeneratorSpec`` in
        ``porcelain/models/generator.py``). A key left out, or null, keeps the preset's value; an unknown
        key is a config error. ``resolution`` and the class counts come from the run, not from here."""

        block_out_channels: tuple[Annotated[int, Field(ge=8, le=1024)], ...] | None = Field(
            None, min_length=1, max_length=5, description="UNet channels per resolution level, highest first.")
        layers_per_block: Annotated[int, Field(ge=1, le=8)] | None = None
        attention: tuple[bool, ...] | None = Field(
            None, min_length=1, max_length=5, description="Self-attention per level (one flag per block_out_channels).")
        mid_attention: bool | None = None
        attention_head_dim: Annotated[int, Field(ge=1, le=1024)] | None = None
        norm_num_groups: Annotated[int, Field(ge=1, le=256)] | None = None
        patch_size: Annotated[int, Field(ge=1, le=8)] | None = Field(
            None, description="The UNet works on a space-to-depth view: 2 turns 32×32×3 into 16×16×12.")
        label_embed_init_std: Annotated[float, Field(gt=0, le=10)] | None = None
        resnet_time_scale_shift: Literal["default", "scale_shift"] | None = Field(
            None, description="scale_shift: labels scale and shift the UNet's features (AdaGN); default: add only.")
        num_train_timesteps: Annotated[int, Field(ge=10, le=10_000)] | None = None
        beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] | None = None
        prediction_type: Literal["epsilon", "v_prediction"] | None = None
        noise_shift: Annotated[float, Field(gt=0, le=64)] | None = Field(
            None, description="Divide every timestep's signal-to-noise ratio by noise_shift² (resolution shift).")

        @model_validator(mode="after")
        def _one_flag_per_level(self) -> GeneratorConfig.Spec:
            if self.attention is not None and self.block_out_channels is not None \
                    and len(self.attention) != len(self.block_out_channels):
                raise ValueError(f"attention needs one flag per entry of block_out_channels, got "
                                 f"{len(self.attention)} and {len(self.block_out_channels)}")
            return self

        def overrides(self) -> dict[str, Any]:
            """The keys that were set, as ``create_generator`` keyword arguments."""
            return self.model_dump(exclude_none=True)

    preset: Literal["tiny", "small"] = "small"
    spec: Spec = Field(default_factory=Spec, description="Overrides of the preset's GeneratorSpec fields; "
                       "null keeps the preset's value, unknown keys are errors.")
    resolution: Annotated[int, Field(ge=8, le=128)] = 32
    train_steps: Annotated[int, Field(ge=1)] = Field(
        1000, description="About 5 minutes on 2 CPU cores for the small preset at 32 px and batch 32 (seconds on a "
        "GPU: raise it there). On the digits set, defaults otherwise: faithfulness ≥ 95% on every task "
        "(benchmarks/generator_digits.py).")
    batch_size: Annotated[int, Field(ge=1)] = 32
    lr: Annotated[float, Field(gt=0, le=1.0)] = 2e-3
    label_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1
    ema: Annotated[float, Field(ge=0, lt=1)] | None = 0.995
    snr_gamma: Annotated[float, Field(gt=0)] | None = Field(
        None, description="Min-SNR-γ loss weighting; null for plain MSE on the model's target. Min-SNR down-weights "
        "the noisiest timesteps, where the labels decide the image: on the digits set γ=5 gave 83–90% digit "
        "faithfulness and plain MSE 100% (benchmarks/generator_digits.py).")
    balance: Annotated[float, Field(ge=0, le=1)] = Field(
        1.0, description="Draw training images ∝ count(label combination)^-balance: 0 uniform over images, "
        "1 uniform over combinations, so that the generator learns the rare combinations the targeted plan "
        "asks for (on the sample, additive conditioning, 1600 steps: rarest-combination faithfulness dynasty "
        "87→95%, with no sign of copying; benchmarks/generator_faithfulness.py).")
    hflip: bool = Field(
        False, description="Also train on mirrored images. Only for classes that a mirror image keeps (a vase seen "
        "from the other side), never for digits or text: on the digits set flips took digit faithfulness "
        "from 88% to 47% (benchmarks/generator_digits.py).")
    seed: int = 0


class SamplingConfig(_Model):
    """How the closed-set generator samples (its entry's ``sampling:``)."""

    steps: Annotated[int, Field(ge=1, le=1000)] = 25
    guidance: Annotated[float, Field(ge=0, le=20)] = Field(
        0.5, description="Classifier-free guidance w (0 = plain conditional model). The one default of the library "
        "(porcelain.models.generator.DEFAULT_GUIDANCE reads it). Digits set, default generator: w=0.5 100% digit "
        "faithfulness, 1.0 95%, 1.5 86%, 2.5 46% (benchmarks/generator_digits.py); models trained with "
        "Min-SNR weighting, like the demo's, want more (the demo pins 1.5).")
    batch_size: Annotated[int, Field(ge=1)] = 64


class GenerationConfig(_Model):
    """Targeted synthesis, for every synthesizer: how many images per attribute combination, in which
    shards. How each kind samples is in its entry of ``synthesizers:``.

    ``steps``, ``guidance`` and ``batch_size`` here are the closed-set generator's sampling settings
    written the old way (before ``synthesizers:``); they still work when ``synthesizers:`` is absent."""

    shard_size: Annotated[int, Field(ge=1, le=10_000)] = Field(
        64, description="Images per shard (the last shard of a combination holds the rest). Shards start at "
        "multiples of it and every image has its own seed, so a larger ratio reuses finished shards and extends "
        "a partial one by the missing images only.")
    seed: int = 1234
    grid_per_combination: Annotated[int, Field(ge=1, le=16)] = 4
    steps: Annotated[int, Field(ge=1, le=1000)] | None = Field(None, description="Old place of sampling.steps.")
    guidance: Annotated[float, Field(ge=0, le=20)] | None = Field(None, description="Old place of sampling.guidance.")
    batch_size: Annotated[int, Field(ge=1)] | None = Field(None, description="Old place of sampling.batch_size.")

    def legacy_sampling(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("steps", "guidance", "batch_size") if getattr(self, k) is not None}


class ClassifierConfig(_Model):
    """The multi-task classifier of the sweep (one head per task). Training is counted in optimizer
    steps, the same for every ratio, and keeps the checkpoint with the best mean macro-F1 on the real
    val split (which never holds synthetic images)."""

    model: str = Field("auto", description="A preset (small_cnn, mobilenetv3_large_100, tiny, …), any timm "
                       "model name, or 'auto': picked by image size and whether weights are given (the report "
                       "says what it picked and why).")
    weights: str | None = Field(None, description="Local backbone weights (safetensors preferred); random init when absent.")
    image_size: Annotated[int, Field(ge=8, le=512)] = 32
    steps: Annotated[int, Field(ge=1)] = Field(
        600, description="Optimizer steps of every run, whatever its ratio (so that more synthetic images never "
        "mean more training).")
    epochs: Annotated[float, Field(gt=0)] | None = Field(
        None, description="Convenience: when set, steps = max(min_steps, epochs × real train images / batch_size); "
        "counted over the real images, so every ratio still trains the same number of steps.")
    min_steps: Annotated[int, Field(ge=1)] = Field(300, description="Floor of the step budget derived from epochs.")
    batch_size: Annotated[int, Field(ge=2)] = 64
    lr: Annotated[float, Field(gt=0, le=1.0)] = 2e-3
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    beta: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.999, description="Effective-number β of the class weights; weights come from the real train counts only.")
    use_sampler: bool = Field(False, description="Weighted sampler over images (effective-number weights). Off by "
                              "default: with the weighted loss on, it corrects the imbalance twice; on digits "
                              "(2 splits × 2 seeds) sampler, loss, both and neither were within noise of each other.")
    class_weighted_loss: bool = Field(True, description="Effective-number class weights in the loss (from real counts).")
    augment: bool = Field(True, description="Random resized crops (and flips when hflip).")
    synthetic_label_smoothing: Annotated[float, Field(ge=0, lt=0.5)] = Field(
        0.0, description="Label smoothing of the synthetic images' targets only (e.g. 0.1 for SGD-Mix's mixed "
        "images, whose seams may carry the target's class); real images keep hard labels. 0: off.")
    hflip: bool = Field(False, description="Random horizontal flips: only for images whose labels survive "
                        "mirroring (vessels, glazes); never for text, digits or asymmetric marks.")
    eval_every: Annotated[int, Field(ge=1)] | None = Field(
        None, description="Evaluate on val every this many steps (default: about 20 times per run).")
    patience: Annotated[int, Field(ge=1)] | None = Field(
        None, description="Stop after this many evaluations without a better val score (default: never).")
    save_weights: bool = Field(False, description="Also store each trained classifier (safetensors).")

    def budget(self, n_real_train: int) -> int:
        """The optimizer steps of one run: ``steps``, or the ``epochs`` conversion over the real images."""
        if self.epochs is None:
            return self.steps
        return max(self.min_steps, math.ceil(self.epochs * n_real_train / self.batch_size))


class SweepConfig(_Model):
    """Which real:synthetic mixes to train, and with which seeds. The real-only run (0 synthetic) is
    always the baseline and is added when missing."""

    ratios: list[str] = Field(
        ["100:0", "90:10", "70:30", "50:50", "20:80"],
        description="REAL:SYNTHETIC shares of the training set, e.g. 90:10; 1:2 means two synthetic images per real one.")
    synthetic_per_real: list[Annotated[float, Field(gt=0, le=100)]] | None = Field(
        None, description="Alternative to ratios for small real sets: synthetic images per real image "
        "(e.g. [0.5, 1, 2, 4]); written as ratios 1:0.5, 1:1, … beside the real-only baseline.")
    seeds: list[int] = [0, 1, 2]
    real_fractions: list[Annotated[float, Field(gt=0, lt=1)]] = Field(
        default_factory=list, description="The equivalence scale (how many synthetic images are worth one real "
        "one): real-only runs on these shares of the real train images (each combination kept in proportion, at "
        "least one image; a new subset per seed; the same optimizer steps as every other run), e.g. [0.25, 0.5]. "
        "The report fits their learning curve against each synthesizer's ratio arms. Empty: off.")
    adaptive: bool = Field(False, description=(
        "Add one arm per synthesizer with a per-task weight on the synthetic images' loss (0 where synthetic "
        "data hurts a task on val, 0.5 where it may, 1 or 2 where it helps), at the synthesizer's best ratio on "
        "val; judged on test beside every fixed ratio (the porcelain paper's open question)."))
    learned_margin: Annotated[float, Field(ge=0, le=1)] = Field(
        0.1, description="A task whose real-only test macro-F1 is not at least this far above chance gets "
        "'classifier did not learn this task' instead of a verdict.")
    bootstrap: Annotated[int, Field(ge=100, le=100_000)] = Field(
        2000, description="Replicates of the paired bootstrap (over seeds and test images) behind every interval.")

    @model_validator(mode="before")
    @classmethod
    def _per_real(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("synthetic_per_real"):
            derived = ["100:0"] + [f"1:{x:g}" for x in data["synthetic_per_real"]]
            # a dumped config holds both (the ratios derived from synthetic_per_real): that is fine
            if "ratios" in data and list(data["ratios"]) != derived:
                raise ValueError("give either sweep.ratios or sweep.synthetic_per_real, not both")
            data = {**data, "ratios": derived}
        return data

    @field_validator("ratios")
    @classmethod
    def _check_ratios(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one ratio is needed")
        seen: dict[float, str] = {}
        for r in v:
            f = round(parse_ratio(r), 9)
            if f in seen:
                raise ValueError(f"ratios {seen[f]!r} and {r!r} are the same mix: each ratio must be distinct")
            seen[f] = r
        if 0.0 not in seen:  # the baseline every verdict is measured against
            v = ["100:0", *v]
        return v

    @field_validator("real_fractions")
    @classmethod
    def _check_fractions(cls, v: list[float]) -> list[float]:
        if len(set(v)) != len(v):
            raise ValueError("real_fractions must be distinct")
        return sorted(v)

    @field_validator("seeds")
    @classmethod
    def _check_seeds(cls, v: list[int]) -> list[int]:
        if not v or len(set(v)) != len(v):
            raise ValueError("seeds must be a non-empty list of distinct integers")
        return v

    @property
    def baseline(self) -> str:
        """The real-only ratio: the one with no synthetic images."""
        return next(r for r in self.ratios if parse_ratio(r) == 0.0)

    def synthetic_fractions(self) -> list[float]:
        return [parse_ratio(r) for r in self.ratios]


class ReferenceConfig(_Model):
    """The reference classifier: trained once per dataset on real images only, validated on the real
    test split, stored with a card. It judges label faithfulness (and later gives saliency maps)."""

    model: str = Field("auto", description="As classifier.model.")
    weights: str | None = None
    image_size: Annotated[int, Field(ge=8, le=512)] | None = Field(None, description="Default: classifier.image_size.")
    train_on: Literal["val", "train+val"] = Field(
        "val", description="'val': real images the generator never saw, so a copy of a training image is judged "
        "like any other image; 'train+val' when val is too small. A slice of val is always held out for early stopping.")
    holdout: Annotated[float, Field(gt=0, lt=0.9)] = Field(0.25, description="Share of val held out for early stopping.")
    steps: Annotated[int, Field(ge=1)] = 1500
    batch_size: Annotated[int, Field(ge=2)] = 64
    lr: Annotated[float, Field(gt=0, le=1.0)] = 2e-3
    hflip: bool = Field(False, description="As classifier.hflip.")
    eval_every: Annotated[int, Field(ge=1)] | None = None
    patience: Annotated[int, Field(ge=1)] | None = Field(8, description="Evaluations without improvement before stopping.")
    floor: Annotated[float, Field(ge=0, le=1)] = Field(
        0.8, description="Below this balanced accuracy on real test images, the reference cannot judge a task: "
        "its faithfulness is reported as not measurable.")
    seed: int = 0


class FaithfulnessConfig(_Model):
    """Label faithfulness of generated images, judged by the reference classifier."""

    threshold: Annotated[float, Field(ge=0, le=1)] = Field(
        0.9, description="Target share of generated images the reference assigns to their intended value; the "
        "report marks each measurable task as meeting it or not.")

    @model_validator(mode="before")
    @classmethod
    def _old_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            old = sorted(set(data) & {"epochs", "images_per_combination"})
            if old:
                raise ValueError(f"faithfulness.{old[0]} was removed: the judge is now the reference classifier; "
                                 "set its training under `reference:` (steps, patience) and delete this key")
        return data


class FilterConfig(_Model):
    """Which generated images are kept for training (a chain, applied per shard; off by default).

    The steps run in this order, each on the survivors of the earlier ones: faithfulness,
    memorisation, texture, clip_score. When a filter drops images, generation tops up each
    combination until its planned count is kept (or ``max_attempts`` × planned images were made),
    so a ratio keeps meaning what it says."""

    faithfulness: Annotated[float, Field(gt=0, lt=1)] | dict[str, Annotated[float, Field(gt=0, lt=1)]] | None = Field(
        None, description="Keep an image when the reference classifier gives its intended value of every task "
        "(or of the tasks named) at least this probability; null: off.")
    memorisation: Annotated[float, Field(gt=0, le=50)] | None = Field(
        None, description="Drop near copies: images closer (pixels, at the reference's size) to a train image than "
        "this percentile of real test-to-train distances (e.g. 1.0); null: off.")
    memorisation_space: Literal["pixels", "pixels+features"] = Field(
        "pixels", description="pixels+features: also drop images as close to a train image in the reference "
        "classifier's pooled features (threshold: the same percentile of real test images' feature distances).")
    texture: Annotated[float, Field(gt=0, lt=0.5)] | None = Field(
        None, description="Drop an image whose GLCM contrast or homogeneity (grey levels, at the reference's size) "
        "lies outside the [q, 1-q] quantiles of real train images of its own value, for each task of "
        "texture_tasks (e.g. 0.02; values with fewer than 10 real images use all real images); null: off.")
    texture_tasks: list[str] | None = Field(
        None, description="Tasks the texture filter checks and the report's texture table shows; null: all tasks. "
        "A task the data lacks is an error.")
    clip_score: Annotated[float, Field(ge=0, le=50)] | None = Field(
        None, description="Keep an image when its CLIP score with its label phrase is at least this percentile "
        "(0-50) of the real train images' scores with their own label phrases: those with the same phrase (its "
        "combination), or all real train images where fewer than 10 share it. Needs clip; null: off.")
    clip: str | None = Field(
        None, description="clip_score: open_clip weights, 'local-dir:/folder' (open_clip_config.json + one "
        ".safetensors), as the sip kind's clip.")
    vocabulary: str = Field(
        "sample", description="clip_score: the prompt vocabulary of the label phrases (a built-in name or a YAML "
        "file, as sd_lora's prompts.vocabulary).")
    max_attempts: Annotated[float, Field(ge=1, le=20)] = Field(
        3.0, description="At most this many images made per planned image of a combination (top-up cap).")
    rounds: Annotated[int, Field(ge=0, le=10)] = Field(3, description="Top-up rounds after the first generation.")

    @model_validator(mode="after")
    def _dependent_keys(self) -> FilterConfig:
        if self.clip_score is not None and self.clip is None:
            raise ValueError("filters.clip_score needs filters.clip: open_clip weights as 'local-dir:/folder'")
        if self.clip is not None and self.clip_score is None:
            raise ValueError("filters.clip is set but filters.clip_score is not: set the percentile, or drop clip")
        if self.memorisation_space != "pixels" and self.memorisation is None:
            raise ValueError("filters.memorisation_space applies to the memorisation filter: set filters.memorisation")
        if self.clip is not None and not self.clip.startswith("local-dir:"):
            raise ValueError(f"filters.clip must be 'local-dir:/folder' (open_clip_config.json + one .safetensors), "
                             f"got {self.clip!r}")
        return self

    @property
    def enabled(self) -> bool:
        return any(v is not None for v in (self.faithfulness, self.memorisation, self.texture, self.clip_score))


class RuntimeConfig(_Model):
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    threads: Annotated[int, Field(ge=1)] | None = None
    workers: Annotated[int, Field(ge=1, le=64)] = Field(
        1, description="Tasks of one stage (generation shards, sweep runs) run at once; they share the CPU "
        "threads. 2 suits a 2-core CPU (small models gain more from running side by side than from threads).")
    retries: Annotated[int, Field(ge=0, le=20)] = 3
    retry_delay_seconds: Annotated[float, Field(ge=0)] = 2.0
    refresh: list[str] = Field(default_factory=list, description=(
        "Stages to recompute although their results are cached (`porcelain run --refresh STAGE`): ingest, "
        "reference, synthesizer:<kind>, shards, sweep, report, … (`python -m porcelain.versions` lists them). "
        "What depends on them is recomputed only if their outputs changed."))
    engine: Literal["threads", "dask"] = Field("threads", description=(
        "Where a flow's generation, filter and sweep tasks run: threads of the flow's process, or a Dask "
        "cluster (prefect-dask's DaskTaskRunner): the scheduler at dask_address, or a local cluster of "
        "dask_workers processes. Outputs and cache keys are the same either way (docs/SCALE_OUT.md)."))
    dask_address: str | None = Field(None, description=(
        "engine dask: the address of a running Dask scheduler (tcp://host:8786); null starts a local cluster. "
        "Its workers must import porcelain, reach the Prefect API and the store, and declare resources GPU=1 "
        "per GPU when the run uses one (`dask worker ADDRESS --resources GPU=1`)."))
    dask_workers: Annotated[int, Field(ge=1, le=256)] = Field(2, description=(
        "engine dask, local cluster: worker processes. Set runtime.workers to dask_workers × "
        "dask_threads_per_worker to keep them all busy (it caps the tasks in flight)."))
    dask_threads_per_worker: Annotated[int, Field(ge=1, le=64)] = Field(
        1, description="engine dask, local cluster: tasks each worker process runs at once.")
    gpus_per_worker: Annotated[int, Field(ge=0, le=16)] | None = Field(None, description=(
        "engine dask, local cluster: GPUs each worker process holds (declared as its Dask resource GPU, and "
        "given to it with CUDA_VISIBLE_DEVICES). null: 1 when the run uses a GPU (device cuda, or auto with "
        "CUDA available), else 0. Every generation, filter and sweep task asks for GPU=1 when the run uses a "
        "GPU, so each shard holds one GPU at a time; 0 with a GPU run would leave them waiting forever."))

    @model_validator(mode="after")
    def _engine_keys(self) -> RuntimeConfig:
        # a key counts as given when it differs from its default: the flow re-reads the config's full dump
        dask_keys = ("dask_address", "dask_workers", "dask_threads_per_worker", "gpus_per_worker")
        if self.engine != "dask":
            given = [k for k in dask_keys if getattr(self, k) != type(self).model_fields[k].default]
            if given:
                raise ValueError(f"runtime.{given[0]} applies to engine dask only: set `engine: dask` or "
                                 f"delete `{given[0]}`")
            return self
        if self.dask_address is not None:
            if not self.dask_address.strip() or any(c.isspace() for c in self.dask_address):
                raise ValueError(f"runtime.dask_address {self.dask_address!r} is not a scheduler address "
                                 "(e.g. tcp://10.0.0.5:8786); null starts a local cluster")
            local = [k for k in dask_keys[1:] if getattr(self, k) != type(self).model_fields[k].default]
            if local:
                raise ValueError(f"runtime.{local[0]} sets up a local cluster, but dask_address names a running "
                                 f"scheduler: size that cluster where it is started (`dask worker "
                                 f"--nworkers/--nthreads/--resources GPU=1`) and delete `{local[0]}`")
        if self.gpus_per_worker == 0 and self.device == "cuda" and self.dask_address is None:
            raise ValueError("runtime.gpus_per_worker is 0 but device is cuda: the tasks would ask for a GPU "
                             "that no local worker declares and wait forever; use 1 (or null)")
        if self.gpus_per_worker and self.device in ("cpu", "mps"):
            raise ValueError(f"runtime.gpus_per_worker is {self.gpus_per_worker} but device is {self.device}: "
                             "GPUs are only given to workers of a CUDA run; set device cuda (or auto) or delete it")
        return self


class RunConfig(_Model):
    """Everything one run needs. Unknown keys are errors, so typos do not pass silently."""

    name: str = "porcelain"
    data: DataConfig = DataConfig()
    storage: StorageConfig = StorageConfig()
    synthesizers: list[SerializeAsAny[SynthesizerConfig]] = Field(
        default_factory=lambda: [_default_synthesizer()],
        description="Ways of making synthetic images, compared side by side against one real-only baseline. "
        "Each entry has a `kind` (closed_set, sd_lora, …; `porcelain config kinds` lists them) and that kind's "
        "keys; `name` tells two entries of one kind apart. An empty list runs the real-only baseline alone.")
    generator: GeneratorConfig | None = Field(
        None, description="Old form of a closed_set synthesizer's `generator:` (when `synthesizers:` is absent).")
    generation: GenerationConfig = GenerationConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    sweep: SweepConfig = SweepConfig()
    reference: ReferenceConfig = ReferenceConfig()
    faithfulness: FaithfulnessConfig = FaithfulnessConfig()
    filters: FilterConfig = FilterConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="before")
    @classmethod
    def _old_closed_set_keys(cls, data: Any) -> Any:
        """Configs written before ``synthesizers:`` keep working: top-level ``generator:`` and
        ``generation.steps/guidance/batch_size`` become one closed_set entry."""
        if not isinstance(data, dict):
            return data
        generation = data.get("generation") or {}
        old_sampling = isinstance(generation, dict) and any(generation.get(k) is not None
                                                              for k in ("steps", "guidance", "batch_size"))
        if "synthesizers" in data and (data.get("generator") is not None or old_sampling):
            raise ValueError("`generator:` and `generation.steps/guidance/batch_size` are the old form of a closed_set "
                             "synthesizer: with `synthesizers:` present, move them into its entry as "
                             "`generator: {...}` and `sampling: {steps, guidance, batch_size}`")
        return data

    @field_validator("synthesizers", mode="before")
    @classmethod
    def _parse_synthesizers(cls, v: Any) -> Any:
        from porcelain.synthesizers import parse_config

        if not isinstance(v, (list, tuple)):
            raise ValueError("synthesizers must be a list of entries, each with a `kind`")
        out = []
        for i, raw in enumerate(v):
            try:
                out.append(parse_config(raw))
            except ValidationError as err:
                kind = raw.get("kind") if isinstance(raw, dict) else "?"
                raise ValueError(f"synthesizers.{i} (kind {kind}): " + "; ".join(
                    f"{'.'.join(str(p) for p in e['loc'])}: "
                    + ("unknown key (check the spelling, or whether it belongs to another kind)"
                       if e["type"] == "extra_forbidden" else e["msg"]) for e in err.errors())) from None
        labels = [c.label for c in out]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"two synthesizers are both called {dup[0]!r}: give each a distinct `name`")
        return out

    @model_validator(mode="after")
    def _old_form(self) -> RunConfig:
        old = self.generation.legacy_sampling()
        if self.generator is None and not old:
            return self
        from porcelain.synthesizers import parse_config

        entry: dict[str, Any] = {"kind": "closed_set", "generator": (self.generator or GeneratorConfig()).model_dump()}
        if old:
            entry["sampling"] = old
        object.__setattr__(self, "synthesizers", [parse_config(entry)])
        object.__setattr__(self, "generator", None)
        object.__setattr__(self, "generation", self.generation.model_copy(
            update={"steps": None, "guidance": None, "batch_size": None}))
        return self

    def filters_for(self, synthesizer: Any) -> FilterConfig:
        """The filter chain of one synthesizer: its own ``filters:`` when given, else the run's."""
        own = getattr(synthesizer, "filters", None)
        return self.filters if own is None else FilterConfig.model_validate(own)

    @model_validator(mode="after")
    def _check_synthesizer_filters(self) -> RunConfig:
        for i, syn in enumerate(self.synthesizers):
            if getattr(syn, "filters", None) is None:
                continue
            try:
                FilterConfig.model_validate(syn.filters)
            except ValidationError as err:
                raise ValueError(f"synthesizers.{i} ({syn.label}): " + "; ".join(
                    f"filters.{'.'.join(str(p) for p in e['loc'])}: "
                    + ("unknown key" if e["type"] == "extra_forbidden" else e["msg"]) for e in err.errors())) from None
        return self

    def synthesizer(self, label: str) -> Any:
        """The synthesizer entry called ``label``."""
        for c in self.synthesizers:
            if c.label == label:
                return c
        raise KeyError(label)

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.data.val_fraction + self.data.test_fraction >= 0.8:
            raise ValueError("data.val_fraction + data.test_fraction must leave at least 20% for training")
        return self



def _default_synthesizer() -> Any:
    from porcelain.synthesizers import parse_config

    return parse_config({"kind": "closed_set"})


def parse_ratio(ratio: str) -> float:
    """``"90:10"`` → synthetic fraction 0.10 of the training set."""
    try:
        real_s, syn_s = ratio.split(":")
        real, syn = float(real_s), float(syn_s)
    except ValueError:
        raise ValueError(f"ratio {ratio!r} is not of the form REAL:SYNTHETIC, e.g. 90:10") from None
    if real <= 0 or syn < 0:
        raise ValueError(f"ratio {ratio!r}: the real part must be > 0 and the synthetic part >= 0")
    return syn / (real + syn)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid run configuration in {source}:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `porcelain config schema` lists the keys)"
        lines.append(f"  - {where}: {msg}")
    return "\n".join(lines)


def config_from_dict(data: dict[str, Any] | None, source: str = "<dict>") -> RunConfig:
    try:
        return RunConfig.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: str | Path) -> RunConfig:
    """Read a YAML run config; every problem is a :class:`ConfigError` that says where and what."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return config_from_dict(data, str(path))


def demo_config(**storage: Any) -> RunConfig:
    """The built-in demo run (``porcelain/configs/demo.yaml``), optionally with other storage settings."""
    from importlib.resources import files

    data = yaml.safe_load(files("porcelain.configs").joinpath("demo.yaml").read_text(encoding="utf-8"))
    data["storage"] = {**data.get("storage", {}), **storage}
    return config_from_dict(data, "porcelain/configs/demo.yaml")


def example_yaml() -> str:
    """A complete example config with every default, as YAML."""
    doc = RunConfig().model_dump(mode="json", exclude={"generator"})
    doc["generation"] = {k: v for k, v in doc["generation"].items() if v is not None}
    return yaml.safe_dump(doc, sort_keys=False)


def json_schema() -> dict[str, Any]:
    return RunConfig.model_json_schema()
