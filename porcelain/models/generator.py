"""The closed-set generator: an attribute-conditional pixel-space diffusion model.

A diffusers :class:`~diffusers.UNet2DModel` denoises a noised image; the labels of *all* tasks
condition it. Each task has its own ``nn.Embedding(n_classes + 1, D)`` (the extra index
``n_classes`` is that task's "null" label, used for classifier-free guidance and for label
dropout); the per-task embeddings are summed and enter the UNet through its class-embedding path
(``class_embed_type="identity"``: ``class_labels`` is a ``B × time_embed_dim`` tensor that
``UNet2DModel.forward`` adds to its timestep embedding; checked in diffusers 0.42 source).

Choices that mattered on the 32 px sample (benchmarks/generator_faithfulness.py):

* ``prediction_type="v_prediction"`` with the cosine schedule. With epsilon prediction the first
  DDIM step at t≈999 (alpha_bar≈2e-9) divides the prediction error by ~2e-5, and samples ignored
  their labels entirely.
* ``resnet_time_scale_shift="scale_shift"`` (AdaGN: the embedding scales *and* shifts the features):
  dynasty faithfulness 72% → 84%, type 88% → 97% at equal training.
* ``patch_size=2``: the UNet works on a space-to-depth view (a 32×32×3 image is 16×16×12,
  :func:`torch.nn.functional.pixel_unshuffle`), ~3× cheaper on CPU than full resolution at equal
  quality per second; ``patch_size=4`` was too coarse for the thin decoration bands.

On the digits set (benchmarks/generator_digits.py: scikit-learn's 8×8 scans at 32 px, ~100 train
images, judged by an RBF SVC fitted on real val images) three things, none of them capacity, took
digit faithfulness from 47% to 100% at the same 1000 × 32 steps:

* no horizontal flips in training (now the default, ``GeneratorConfig.hflip``): a mirrored 3 or 6 is
  not a 3 or a 6, and half the training images of every digit were mirrored (47% → 88%);
* no Min-SNR weighting (``snr_gamma=None``, now the default): for v-prediction it gives the noisiest
  timesteps, where the labels decide the image, almost no weight (best guidance: 89.5% → 100%);
* mild guidance (w = 0.5, :data:`DEFAULT_GUIDANCE`): past w ≈ 1 strokes thicken into other digits.

Conditioning on the digit alone instead of all three (redundant) tasks, epsilon prediction, and a
resolution shift of the noise schedule (``noise_shift``) did not help there.

Presets (:data:`GENERATOR_PRESETS`) follow timm's ``create_model`` style::

    model = create_generator("small", num_classes=[4, 4, 5, 4], resolution=32)
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from torch import nn

from porcelain.config import GeneratorConfig, SamplingConfig

__all__ = [
    "DEFAULT_BALANCE",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_EMA",
    "DEFAULT_GUIDANCE",
    "DEFAULT_HFLIP",
    "DEFAULT_LABEL_DROPOUT",
    "DEFAULT_LR",
    "DEFAULT_PRESET",
    "DEFAULT_SAMPLE_BATCH_SIZE",
    "DEFAULT_SAMPLING_STEPS",
    "DEFAULT_SNR_GAMMA",
    "DEFAULT_TRAIN_STEPS",
    "DEFAULT_WARMUP_STEPS",
    "GENERATOR_PRESETS",
    "ConditionalUNet",
    "GeneratorSpec",
    "create_generator",
    "list_generator_presets",
]

# Defaults live in one place, the run configuration (porcelain/config.py: GeneratorConfig and
# SamplingConfig, which say where each was measured); the library's keyword defaults read them, so
# a run with the default config and a direct call of train_generator / sample_images agree.
_TRAIN = GeneratorConfig.model_fields
_SAMPLE = SamplingConfig.model_fields
# Training (porcelain.train.generator):
DEFAULT_PRESET: str = _TRAIN["preset"].default
DEFAULT_TRAIN_STEPS: int = _TRAIN["train_steps"].default
DEFAULT_BATCH_SIZE: int = _TRAIN["batch_size"].default
DEFAULT_LR: float = _TRAIN["lr"].default
DEFAULT_WARMUP_STEPS = 50
DEFAULT_EMA: float | None = _TRAIN["ema"].default
DEFAULT_LABEL_DROPOUT: float = _TRAIN["label_dropout"].default
DEFAULT_SNR_GAMMA: float | None = _TRAIN["snr_gamma"].default
DEFAULT_BALANCE: float = _TRAIN["balance"].default
DEFAULT_HFLIP: bool = _TRAIN["hflip"].default
# Sampling (porcelain.generate.sampling):
DEFAULT_SAMPLING_STEPS: int = _SAMPLE["steps"].default
DEFAULT_GUIDANCE: float = _SAMPLE["guidance"].default
DEFAULT_SAMPLE_BATCH_SIZE: int = _SAMPLE["batch_size"].default


@dataclass
class GeneratorSpec:
    """Everything needed to rebuild a :class:`ConditionalUNet` (and its noise schedule).

    ``num_classes`` is the number of classes of each task, in the column order of the label matrix.
    ``attention`` lists, for each resolution level (highest first), whether that level's blocks
    have self-attention; the mid block's attention is ``mid_attention``.
    """

    resolution: int = 32
    num_classes: list[int] = field(default_factory=list)
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    attention: tuple[bool, ...] = (False, True)
    mid_attention: bool = True
    attention_head_dim: int = 32
    norm_num_groups: int = 8
    patch_size: int = 1
    in_channels: int = 3
    label_embed_init_std: float = 0.5
    # "default": the (time + label) embedding is added to the features of each ResNet block;
    # "scale_shift": it also scales them (AdaGN, a stronger conditioning path).
    resnet_time_scale_shift: str = "default"
    # Noise schedule (shared by training and sampling).
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "v_prediction"
    # Resolution shift of the schedule (Hoogeboom et al. 2023, "simple diffusion"): every timestep's
    # signal-to-noise ratio is divided by noise_shift², so that an image whose content is coarser than
    # its pixel grid (an upscaled scan) is as noisy at each step as a sharp one. 1 = the plain schedule.
    noise_shift: float = 1.0

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        self.attention = tuple(bool(a) for a in self.attention)
        self.num_classes = [int(n) for n in self.num_classes]

    def validate(self) -> None:
        """Raise ``ValueError`` on an inconsistent spec (before any weights are built)."""
        if not self.num_classes or any(n < 1 for n in self.num_classes):
            raise ValueError(f"num_classes must list at least one task with >= 1 class, got {self.num_classes}")
        if len(self.attention) != len(self.block_out_channels):
            raise ValueError("attention needs one flag per entry of block_out_channels, "
                             f"got {len(self.attention)} and {len(self.block_out_channels)}")
        if self.patch_size < 1 or self.resolution % self.patch_size:
            raise ValueError(f"resolution {self.resolution} is not divisible by patch_size {self.patch_size}")
        inner = self.resolution // self.patch_size
        if inner % (2 ** (len(self.block_out_channels) - 1)):
            raise ValueError(f"resolution/patch_size = {inner} cannot be halved "
                             f"{len(self.block_out_channels) - 1} times")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"channels {c} not divisible by norm_num_groups {self.norm_num_groups}")
        if self.resnet_time_scale_shift not in ("default", "scale_shift"):
            raise ValueError("resnet_time_scale_shift must be 'default' or 'scale_shift', "
                             f"got {self.resnet_time_scale_shift!r}")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {self.prediction_type!r}")
        if not 0 < self.noise_shift <= 64:
            raise ValueError(f"noise_shift must be in (0, 64], got {self.noise_shift}")

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (lists, ints, floats, strings, bools)."""
        d = asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        d["attention"] = list(self.attention)
        d["num_classes"] = list(self.num_classes)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GeneratorSpec:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a sign of a version mismatch)."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown GeneratorSpec fields: {sorted(unknown)}")
        return cls(**data)

    def noise_scheduler_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_schedule": self.beta_schedule,
            "prediction_type": self.prediction_type,
        }
        if self.noise_shift != 1.0:
            cfg["trained_betas"] = shifted_betas(self.num_train_timesteps, self.beta_schedule, self.noise_shift)
        return cfg

    def make_train_scheduler(self) -> DDPMScheduler:
        """The DDPM forward-noising schedule used in training."""
        return DDPMScheduler(**self.noise_scheduler_config(), clip_sample=False)

    def make_sample_scheduler(self) -> DDIMScheduler:
        """A deterministic DDIM sampler on the same schedule (``trailing`` spacing suits few steps)."""
        return DDIMScheduler(**self.noise_scheduler_config(), clip_sample=True,
                             set_alpha_to_one=False, timestep_spacing="trailing")


def shifted_betas(num_train_timesteps: int, beta_schedule: str, shift: float) -> list[float]:
    """Betas of ``beta_schedule`` with every alpha_bar's SNR divided by ``shift ** 2``."""
    base = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule).alphas_cumprod
    a = base.double()
    a = a / (a + shift ** 2 * (1.0 - a))
    prev = torch.cat([torch.ones(1, dtype=a.dtype), a[:-1]])
    return (1.0 - a / prev).clamp(0.0, 0.999).tolist()


class ConditionalUNet(nn.Module):
    """UNet2DModel conditioned on one label per task.

    ``forward(x, timesteps, labels)``: ``x`` is ``B×3×H×W`` in [-1, 1], ``timesteps`` ``B`` ints,
    ``labels`` ``B×T`` int64 where value ``num_classes[t]`` means "null" for task ``t``.
    Returns the UNet's prediction (noise for ``prediction_type='epsilon'``), ``B×3×H×W``.
    """

    def __init__(self, spec: GeneratorSpec):
        super().__init__()
        spec.validate()
        self.spec = copy.deepcopy(spec)
        p = spec.patch_size
        levels = len(spec.block_out_channels)
        down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in spec.attention)
        up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(spec.attention))
        self.unet = UNet2DModel(
            sample_size=spec.resolution // p,
            in_channels=spec.in_channels * p * p,
            out_channels=spec.in_channels * p * p,
            block_out_channels=spec.block_out_channels,
            layers_per_block=spec.layers_per_block,
            down_block_types=down,
            up_block_types=up,
            add_attention=spec.mid_attention,
            attention_head_dim=spec.attention_head_dim,
            norm_num_groups=spec.norm_num_groups,
            resnet_time_scale_shift=spec.resnet_time_scale_shift,
            class_embed_type="identity",
        )
        assert levels == len(self.unet.down_blocks)
        d = spec.time_embed_dim
        self.label_embeddings = nn.ModuleList(nn.Embedding(n + 1, d) for n in spec.num_classes)
        for emb in self.label_embeddings:
            nn.init.normal_(emb.weight, std=spec.label_embed_init_std)

    @property
    def num_tasks(self) -> int:
        return len(self.spec.num_classes)

    def null_labels(self, batch: int, device: torch.device | None = None) -> torch.Tensor:
        """A ``batch × T`` label matrix of all-"null" labels (the unconditional input)."""
        row = torch.tensor(self.spec.num_classes, dtype=torch.long, device=device)
        return row.unsqueeze(0).expand(batch, -1).clone()

    def embed_labels(self, labels: torch.Tensor) -> torch.Tensor:
        if labels.ndim != 2 or labels.shape[1] != self.num_tasks:
            raise ValueError(f"labels must be B×{self.num_tasks}, got shape {tuple(labels.shape)}")
        return sum(emb(labels[:, t]) for t, emb in enumerate(self.label_embeddings))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        p = self.spec.patch_size
        h = F.pixel_unshuffle(x, p) if p > 1 else x
        cond = self.embed_labels(labels)
        out = self.unet(h, timesteps, class_labels=cond).sample
        return F.pixel_shuffle(out, p) if p > 1 else out


# Presets: "tiny" for unit tests (seconds), "small" the CPU default for 32 px images.
GENERATOR_PRESETS: dict[str, GeneratorSpec] = {
    "tiny": GeneratorSpec(
        resolution=16, block_out_channels=(16, 32), layers_per_block=1, attention=(False, False),
        mid_attention=False, attention_head_dim=16, norm_num_groups=8, patch_size=1,
    ),
    "small": GeneratorSpec(
        resolution=32, block_out_channels=(32, 64), layers_per_block=1, attention=(False, True),
        mid_attention=True, attention_head_dim=32, norm_num_groups=8, patch_size=2,
        resnet_time_scale_shift="scale_shift",
    ),
}


def list_generator_presets() -> list[str]:
    return sorted(GENERATOR_PRESETS)


def create_generator(
    preset_or_spec: str | GeneratorSpec | dict[str, Any],
    num_classes: list[int] | tuple[int, ...] | None = None,
    resolution: int | None = None,
    *,
    seed: int | None = None,
    **overrides: Any,
) -> ConditionalUNet:
    """Build a freshly initialised generator from a preset name, a spec, or a spec dict.

    ``num_classes`` and ``resolution`` (and any other ``GeneratorSpec`` field in ``overrides``)
    replace the preset's values. With ``seed`` the initial weights depend only on it (torch's global
    RNG is left as it was); without, they come from the global RNG.
    """
    if isinstance(preset_or_spec, str):
        if preset_or_spec not in GENERATOR_PRESETS:
            raise ValueError(f"unknown generator preset {preset_or_spec!r}; choose one of {list_generator_presets()}")
        spec = GENERATOR_PRESETS[preset_or_spec]
    elif isinstance(preset_or_spec, dict):
        spec = GeneratorSpec.from_dict(preset_or_spec)
    elif isinstance(preset_or_spec, GeneratorSpec):
        spec = preset_or_spec
    else:
        raise TypeError(f"expected a preset name, GeneratorSpec or dict, got {type(preset_or_spec).__name__}")
    changes: dict[str, Any] = dict(overrides)
    if num_classes is not None:
        changes["num_classes"] = [int(n) for n in num_classes]
    if resolution is not None:
        changes["resolution"] = int(resolution)
    spec = replace(copy.deepcopy(spec), **changes)
    if seed is None:
        return ConditionalUNet(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ConditionalUNet(spec)
