"""CLIP image and text embeddings and image–text cosine similarity, with open_clip, offline.

* :func:`load_clip` builds an open_clip model from a **local safetensors file** (a built-in
  architecture name such as ``"ViT-B-32"`` plus ``pretrained_path``), or from a local folder
  (``"local-dir:/path"``: ``open_clip_config.json`` + ``*.safetensors``, as :func:`save_clip`
  writes it). Nothing is downloaded: open_clip's pretrained *tags* (``"laion2b_s34b_b79k"``) and
  ``hf-hub:`` names are refused, and so are pickled checkpoints (``.pt``/``.bin``/``.pth``), which
  unpickling would run; convert those once with
  ``python -m porcelain.models.weights convert IN.bin OUT.safetensors`` on a machine where you
  trust the file.
* :func:`build_tiny_clip` builds a tiny random CLIP (a 1-layer ViT on 32 px images, a 1-layer
  text transformer) from a config dict, for tests and benchmarks; the tokenizer is open_clip's
  bundled BPE :class:`open_clip.SimpleTokenizer` (no download).
* :func:`clip_scores` / :func:`image_text_similarity_matrix`: cosine similarities of uint8
  N×H×W×3 images with texts, batched; each distinct text is encoded once.

Images are preprocessed on tensors (:class:`ClipPreprocess`): resize (bicubic, antialiased) of the
shortest side to the model's size, centre crop, the model's mean/std. This follows open_clip's
own (PIL) eval transform; resampling differs from PIL's by rounding only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg
from torch import nn

from porcelain.errors import WeightsError
from porcelain.models.weights import PICKLE_MAGIC, PICKLE_SUFFIXES, ZIP_MAGIC, save_weights

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
LOCAL_DIR = "local-dir:"

TINY_CLIP_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}
"""A tiny CLIP for tests (about 3.3M parameters, most of them the 49408-token embedding)."""

Tokenizer = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class ClipPreprocess:
    """uint8 N×H×W×3 → normalised float32 N×3×S×S, as open_clip's eval transform does on PIL images."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_mode: str = "shortest"  # "shortest" (resize + centre crop) or "squash"

    @classmethod
    def from_model(cls, model: nn.Module) -> ClipPreprocess:
        """The preprocessing open_clip recorded on ``model.visual.preprocess_cfg``."""
        cfg = PreprocessCfg(**getattr(model.visual, "preprocess_cfg", {}))
        size = cfg.size if isinstance(cfg.size, int) else int(cfg.size[0])
        mode = "squash" if cfg.resize_mode == "squash" else "shortest"
        return cls(int(size), tuple(cfg.mean), tuple(cfg.std), mode)  # type: ignore[arg-type]

    def __call__(self, images: np.ndarray | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 images N×H×W×3, got {tuple(x.shape)} {x.dtype}")
        x = x.to(device) if device is not None else x
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        h, w = x.shape[-2:]
        s = self.size
        if self.resize_mode == "squash":
            if (h, w) != (s, s):
                x = F.interpolate(x, size=(s, s), mode="bicubic", antialias=True, align_corners=False)
        else:
            if min(h, w) != s:
                scale = s / min(h, w)
                nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
                x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
            h, w = x.shape[-2:]
            top, left = (h - s) // 2, (w - s) // 2
            x = x[..., top:top + s, left:left + s]
        x = x.clamp_(0.0, 1.0)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


# --------------------------------------------------------------------------------------------
# loading and building


def _refuse_pickled(path: Path) -> None:
    with path.open("rb") as f:
        head = f.read(8)
    if path.suffix.lower() in PICKLE_SUFFIXES or head[:4] == ZIP_MAGIC or head[:1] == PICKLE_MAGIC:
        raise WeightsError(
            f"refusing to load {path}: it is a pickled checkpoint (unpickling can run arbitrary code); convert it "
            f"once, on a machine where you trust the file, with `python -m porcelain.models.weights convert "
            f"{path.name} {path.stem}.safetensors` and pass the .safetensors file")
    if path.suffix.lower() != ".safetensors":
        raise WeightsError(f"{path}: CLIP weights must be a .safetensors file (open_clip picks the reader by suffix)")


def _download_hint(model_name: str) -> str:
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    hubs = []
    for tag in tags:
        hub = (open_clip.get_pretrained_cfg(model_name, tag) or {}).get("hf_hub", "")
        if hub:
            hubs.append(f"https://huggingface.co/{hub.rstrip('/')} ({tag})")
    where = ("; e.g. " + ", ".join(hubs[:3])) if hubs else ""
    return (f"download the open_clip weights of {model_name} as a .safetensors file "
            f"(open_clip_model.safetensors in the model's Hugging Face repository{where}) and pass its local path")


def load_clip(
    model_name: str,
    pretrained_path: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, ClipPreprocess, Tokenizer]:
    """``(model, preprocess, tokenizer)`` for an open_clip model with local safetensors weights, in eval mode.

    ``model_name``: a built-in open_clip architecture (``open_clip.list_models()``, e.g. ``"ViT-B-32"``)
    with ``pretrained_path`` a local ``.safetensors`` file of its weights; or ``"local-dir:/folder"``
    holding ``open_clip_config.json`` and one ``.safetensors`` file (``pretrained_path`` must then be
    ``None``). Raises :class:`WeightsError` naming what to download when the weights are absent, and
    for pickled checkpoints, pretrained tags and ``hf-hub:`` names (they would download or unpickle).
    """
    if model_name.startswith("hf-hub:"):
        raise WeightsError(f"{model_name}: hf-hub models would be downloaded; download open_clip_config.json and "
                           f"open_clip_model.safetensors yourself and use 'local-dir:/that/folder'")
    if model_name.startswith(LOCAL_DIR):
        if pretrained_path is not None:
            raise ValueError("a 'local-dir:' model takes its weights from the folder; pass pretrained_path=None")
        folder = Path(model_name[len(LOCAL_DIR):]).expanduser()
        if not (folder / CONFIG_NAME).is_file():
            raise WeightsError(f"no {CONFIG_NAME} in {folder.resolve()}: a local-dir CLIP needs its config and a "
                               f".safetensors weights file (save_clip writes both)")
        weights = sorted(folder.glob("*.safetensors"))
        pickles = sorted(p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if len(weights) != 1 or pickles:
            found = ", ".join(p.name for p in weights + pickles) or "none"
            raise WeightsError(f"{folder.resolve()} must hold exactly one .safetensors weights file and no pickled "
                               f"checkpoint (found: {found}); convert pickles with "
                               f"`python -m porcelain.models.weights convert IN.bin OUT.safetensors`")
        _refuse_pickled(weights[0])
        text_cfg = json.loads((folder / CONFIG_NAME).read_text()).get("model_cfg", {}).get("text_cfg", {})
        if text_cfg.get("hf_tokenizer_name") or text_cfg.get("hf_model_name"):
            raise WeightsError(f"{folder}: its text tower or tokenizer comes from Hugging Face and would be "
                               f"downloaded; use a model with open_clip's own text tower and bundled BPE tokenizer")
        model = open_clip.create_model(model_name, device=device, pretrained_text=False, require_pretrained=True)
        tokenizer = open_clip.get_tokenizer(model_name)
    else:
        if model_name not in open_clip.list_models():
            raise ValueError(f"unknown open_clip architecture {model_name!r}; see open_clip.list_models(), "
                             f"or use 'local-dir:/folder'")
        if pretrained_path is None:
            raise WeightsError(f"no CLIP weights given for {model_name}: {_download_hint(model_name)}")
        path = Path(os.fspath(pretrained_path)).expanduser()
        if not path.is_file():
            raise WeightsError(f"CLIP weights not found at {path.resolve()}: {_download_hint(model_name)}")
        _refuse_pickled(path)
        text_cfg = (open_clip.get_model_config(model_name) or {}).get("text_cfg") or {}
        if text_cfg.get("hf_tokenizer_name") or text_cfg.get("hf_model_name"):
            raise WeightsError(f"{model_name}: its text tower or tokenizer comes from Hugging Face and would be "
                               f"downloaded; use a model with open_clip's bundled BPE tokenizer (e.g. ViT-B-32)")
        model = open_clip.create_model(model_name, pretrained=str(path), device=device, pretrained_text=False,
                                       pretrained_image=False, require_pretrained=True)
        tokenizer = open_clip.get_tokenizer(model_name)
    model.eval()
    return model, ClipPreprocess.from_model(model), tokenizer


def _set_preprocess_cfg(model: nn.Module, size: int) -> None:
    cfg = PreprocessCfg(size=size)
    open_clip.set_model_preprocess_cfg(model, {"size": size, "mode": cfg.mode, "mean": cfg.mean, "std": cfg.std,
                                               "interpolation": cfg.interpolation, "resize_mode": cfg.resize_mode,
                                               "fill_color": cfg.fill_color})


def save_clip(model: nn.Module, model_cfg: dict[str, Any], directory: str | os.PathLike) -> Path:
    """Write ``open_clip_config.json`` and ``open_clip_model.safetensors`` to ``directory``;
    :func:`load_clip` reads it back as ``f"local-dir:{directory}"``. Returns the folder."""
    folder = Path(os.fspath(directory))
    folder.mkdir(parents=True, exist_ok=True)
    pp = dict(getattr(model.visual, "preprocess_cfg", {}))
    (folder / CONFIG_NAME).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": pp}, indent=2))
    save_weights(model.state_dict(), folder / WEIGHTS_NAME)
    return folder


def build_tiny_clip(
    directory: str | os.PathLike | None = None,
    seed: int = 0,
    model_cfg: dict[str, Any] | None = None,
) -> tuple[nn.Module, ClipPreprocess, Tokenizer]:
    """A tiny random CLIP (``model_cfg``, default :data:`TINY_CLIP_CFG`), seeded without touching the
    global RNG, with the bundled BPE tokenizer. With ``directory`` its config and weights are saved
    there (:func:`save_clip`), loadable with ``load_clip(f"local-dir:{directory}")``."""
    cfg = json.loads(json.dumps(model_cfg or TINY_CLIP_CFG))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.model.CLIP(**cfg)
    _set_preprocess_cfg(model, int(cfg["vision_cfg"]["image_size"]))
    if directory is not None:
        save_clip(model, cfg, directory)
    model.eval()
    tokenizer = open_clip.SimpleTokenizer(context_length=int(cfg["text_cfg"].get("context_length", 77)))
    return model, ClipPreprocess.from_model(model), tokenizer


# --------------------------------------------------------------------------------------------
# embeddings and similarity


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_images(model: nn.Module, preprocess: ClipPreprocess, images: np.ndarray,
                  batch_size: int = 64) -> np.ndarray:
    """L2-normalised image embeddings (float32 N×D) of uint8 N×H×W×3 images."""
    device = _device_of(model)
    out = []
    for i in range(0, len(images), batch_size):
        x = preprocess(images[i:i + batch_size], device=device)
        out.append(F.normalize(model.encode_image(x).float(), dim=-1).cpu())
    dim = int(getattr(model, "text_projection", torch.empty(0, 0)).shape[-1]) if not out else out[0].shape[-1]
    return torch.cat(out).numpy() if out else np.zeros((0, dim), np.float32)


@torch.no_grad()
def encode_texts(model: nn.Module, tokenizer: Tokenizer, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """L2-normalised text embeddings (float32 T×D)."""
    device = _device_of(model)
    out = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[i:i + batch_size])).to(device)
        out.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def image_text_similarity_matrix(model: nn.Module, preprocess: ClipPreprocess, tokenizer: Tokenizer,
                                 images: np.ndarray, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Cosine similarity of every image with every text: float32 N_images × N_texts, in [-1, 1]."""
    img = encode_images(model, preprocess, images, batch_size)
    txt = encode_texts(model, tokenizer, list(texts))
    return img @ txt.T


def clip_scores(model: nn.Module, preprocess: ClipPreprocess, tokenizer: Tokenizer,
                images: np.ndarray, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Cosine similarity of image ``i`` with text ``i`` (float32, length N). Distinct texts are
    encoded once, so per-class prompts cost one text forward pass each."""
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} texts: clip_scores pairs them one to one")
    unique, inverse = np.unique(np.asarray(list(texts), dtype=object).astype(str), return_inverse=True)
    img = encode_images(model, preprocess, images, batch_size)
    if not len(img):
        return np.zeros(0, np.float32)
    txt = encode_texts(model, tokenizer, [str(t) for t in unique])
    return np.einsum("nd,nd->n", img, txt[inverse]).astype(np.float32)
