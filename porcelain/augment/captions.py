"""Image captions for SIP (arXiv 2302.02070): BLIP captions, the caption choice, the prompt.

* :func:`load_captioner` loads ``BlipForConditionalGeneration`` + ``BlipProcessor`` (transformers)
  from a local folder or the local Hugging Face cache only (``local_files_only=True``, safetensors
  only); when absent it raises :class:`CaptionerNotFoundError` saying what to download. Nothing is
  downloaded at run time.
* :func:`caption_images` gives several captions per image: ``n_beam`` from beam search (the
  ``n_beam`` best beams of ``max(num_beams, n_beam)``) followed by ``n_sample`` from nucleus
  sampling (``top_p``, ``temperature``), seeded. Captions may repeat (a short image may have few
  plausible captions); :func:`choose_caption` copes with that.
* :func:`choose_caption` picks the caption a scoring callable (e.g. CLIP image-text similarity,
  written elsewhere) rates highest.
* :func:`sip_prompt` combines a class phrase and a caption into one text prompt, with weights
  expressed by **repetition** (see there: plain diffusers does not parse ``(text:1.2)`` weights).
* :func:`build_tiny_blip` saves a tiny random BLIP (configs, a tiny BERT WordPiece vocabulary,
  ``save_pretrained``) so tests load it through :func:`load_captioner`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from porcelain.device import choose_device, choose_dtype
from porcelain.errors import WeightsError

__all__ = [
    "DEFAULT_CAPTIONER",
    "CaptionScorer",
    "Captioner",
    "CaptionerNotFoundError",
    "build_tiny_blip",
    "caption_images",
    "choose_caption",
    "load_captioner",
    "sip_prompt",
]

DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-base"
"""The BLIP captioner used when none is named (a hub id looked up in the local cache only)."""

CaptionScorer = Callable[[np.ndarray, Sequence[str]], Sequence[float]]
"""``score_fn(image uint8 H×W×3, captions) -> one score per caption`` (higher is better)."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class CaptionerNotFoundError(WeightsError):
    """The BLIP captioner is not on this machine (nothing is downloaded at run time)."""


@dataclass
class Captioner:
    """A loaded BLIP captioner: model (eval mode, on ``device``), its processor, and where it came from."""

    model: Any  # transformers.BlipForConditionalGeneration
    processor: Any  # transformers.BlipProcessor
    device: torch.device
    dtype: torch.dtype
    source: str


def _download_hint(name: str) -> str:
    hub_id = name if _HUB_ID.match(name) else DEFAULT_CAPTIONER
    return (f"download it once, on a machine with internet access, with\n"
            f"    hf download {hub_id} --local-dir /models/{hub_id.split('/')[-1]}\n"
            f"and pass that folder (or download it without --local-dir into the Hugging Face cache, "
            f"$HF_HOME/hub, default ~/.cache/huggingface/hub, and pass {hub_id!r})")


def load_captioner(
    name_or_path: str | os.PathLike[str] = DEFAULT_CAPTIONER,
    *,
    device: str = "auto",
    dtype: str = "auto",
) -> Captioner:
    """Load a BLIP captioner from a folder or the local HF cache (never downloading; safetensors only).

    ``dtype``: ``auto`` is fp32 on CPU and fp16/bf16 on CUDA (the weights are cast; BLIP inference
    in half precision is what its model card shows). Raises :class:`CaptionerNotFoundError`.
    """
    from transformers import BlipForConditionalGeneration, BlipProcessor

    name = os.fspath(name_or_path)
    local = Path(name).expanduser()
    if not local.exists() and (not _HUB_ID.match(name) or name.startswith((".", "/", "~"))):
        raise CaptionerNotFoundError(f"captioner {name!r}: no such folder ({local.resolve()}); "
                                     + _download_hint(DEFAULT_CAPTIONER))
    where = str(local.resolve()) if local.exists() else name
    dev = choose_device(device)
    dt = choose_dtype(dtype, dev)
    try:
        processor = BlipProcessor.from_pretrained(where, local_files_only=True)
        model = BlipForConditionalGeneration.from_pretrained(where, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError) as e:  # missing files / not in the cache / no safetensors
        raise CaptionerNotFoundError(
            f"captioner {name!r}: could not load a BLIP captioner (model.safetensors, config, processor and "
            f"tokenizer files) from {'the folder ' + where if local.exists() else 'the local Hugging Face cache'} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); " + _download_hint(name)) from None
    model = model.to(device=dev, dtype=dt).eval()
    return Captioner(model=model, processor=processor, device=dev, dtype=dt, source=where)


def _batch_seed(seed: int, start: int) -> int:
    state = np.random.SeedSequence([int(seed) % (1 << 64), int(start)]).generate_state(1, np.uint64)
    return int(state[0]) & ((1 << 63) - 1)


@torch.no_grad()
def caption_images(
    captioner: Captioner,
    images: np.ndarray,
    *,
    n_beam: int = 3,
    n_sample: int = 2,
    num_beams: int = 5,
    top_p: float = 0.9,
    temperature: float = 1.0,
    max_new_tokens: int = 30,
    prompt: str | None = None,
    seed: int = 0,
    batch_size: int = 16,
) -> list[list[str]]:
    """``n_beam + n_sample`` captions per image (uint8 ``N×H×W×3``): beam captions first, then sampled.

    ``prompt``: an optional caption start (BLIP's "a picture of"); it is kept in the returned text.
    The sampled captions are deterministic in ``(seed, batch_size)``: each batch draws from torch's
    RNG seeded by ``(seed, first image index)``, with the global RNG restored afterwards.
    """
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be a uint8 array N×H×W×3, got {getattr(images, 'shape', None)}")
    if n_beam < 0 or n_sample < 0 or n_beam + n_sample < 1:
        raise ValueError(f"ask for at least one caption (n_beam={n_beam}, n_sample={n_sample})")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    if not 0 < top_p <= 1 or temperature <= 0:
        raise ValueError(f"need 0 < top_p <= 1 and temperature > 0, got {top_p}, {temperature}")
    model, proc = captioner.model, captioner.processor
    out: list[list[str]] = []
    for start in range(0, len(images), batch_size):
        batch = list(images[start:start + batch_size])
        kw: dict[str, Any] = {"images": batch, "return_tensors": "pt"}
        if prompt:
            kw["text"] = [prompt] * len(batch)
        inputs = proc(**kw).to(captioner.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(captioner.dtype)
        inputs.pop("token_type_ids", None)
        per_image: list[list[str]] = [[] for _ in batch]
        if n_beam:
            ids = model.generate(**inputs, num_beams=max(num_beams, n_beam), num_return_sequences=n_beam,
                                 do_sample=False, max_new_tokens=max_new_tokens)
            for j, text in enumerate(proc.batch_decode(ids, skip_special_tokens=True)):
                per_image[j // n_beam].append(text.strip())
        if n_sample:
            devices = [captioner.device] if captioner.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(_batch_seed(seed, start))
                ids = model.generate(**inputs, do_sample=True, top_p=top_p, top_k=0, temperature=temperature,
                                     num_return_sequences=n_sample, max_new_tokens=max_new_tokens)
            for j, text in enumerate(proc.batch_decode(ids, skip_special_tokens=True)):
                per_image[j // n_sample].append(text.strip())
        out.extend(per_image)
    return out


def choose_caption(image: np.ndarray, captions: Sequence[str], score_fn: CaptionScorer) -> tuple[str, float]:
    """The caption ``score_fn`` rates highest for ``image``, with its score (the first on ties).

    ``score_fn(image, captions)`` returns one score per caption; NaN scores never win. Raises
    ``ValueError`` on no captions, a wrong number of scores, or only NaN scores.
    """
    captions = list(captions)
    if not captions:
        raise ValueError("choose_caption needs at least one caption")
    scores = np.asarray(list(score_fn(image, captions)), dtype=np.float64)
    if scores.shape != (len(captions),):
        raise ValueError(f"score_fn returned {scores.shape} scores for {len(captions)} captions")
    if np.isnan(scores).all():
        raise ValueError("score_fn gave NaN for every caption")
    best = int(np.argmax(np.where(np.isnan(scores), -np.inf, scores)))
    return captions[best], float(scores[best])


def _clean(text: str) -> str:
    return " ".join(text.replace(",", " ").split()).strip()


def sip_prompt(label_phrase: str, caption: str, *, label_weight: int = 2, caption_weight: int = 1) -> str:
    """One prompt from a class phrase and a caption, weighted by repetition.

    Plain diffusers pipelines pass the prompt to the CLIP tokenizer verbatim: ``(text:1.2)`` or
    ``text++`` weights (A1111, compel) are read as literal characters. Repeating a phrase works with
    any text encoder: its tokens take a larger share of the prompt and of the cross-attention. So the
    weights are non-negative integers: the class phrase ``label_weight`` times (at least once), then
    the caption ``caption_weight`` times (0 leaves it out), joined by ``", "``. The class phrase
    comes first, so CLIP's 77-token truncation cuts the caption, never the label. Commas inside the
    parts are replaced by spaces so the parts stay apart.

    >>> sip_prompt("a ming dynasty vase", "a blue and white vase on a table", label_weight=2, caption_weight=1)
    'a ming dynasty vase, a ming dynasty vase, a blue and white vase on a table'
    """
    for name, w in (("label_weight", label_weight), ("caption_weight", caption_weight)):
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise ValueError(f"{name} must be a non-negative integer (a repetition count), got {w!r}")
    if label_weight < 1:
        raise ValueError("label_weight must be >= 1: the prompt must name the class")
    label, cap = _clean(label_phrase), _clean(caption)
    if not label:
        raise ValueError("label_phrase is empty")
    parts = [label] * label_weight + ([cap] * caption_weight if cap else [])
    return ", ".join(parts)


_TINY_WORDS = ("a an the of on in with and is blue white red green black brown gold small large tall round "
               "painted glazed vase bowl jar plate cup dish pot figure table background picture photo").split()


def build_tiny_blip(directory: str | os.PathLike[str], *, seed: int = 0, image_size: int = 32) -> Path:
    """Save a tiny random BLIP captioner (≈70k parameters) to ``directory``; return its path.

    Built offline from configs: a BERT WordPiece tokenizer over a ~40-word ``vocab.txt`` (plus
    BLIP's ``[DEC]`` start token), a 1-layer vision transformer on ``image_size`` px with 8 px
    patches, a 1-layer text decoder, and a ``BlipImageProcessor`` resizing to ``image_size``. Written
    with ``save_pretrained`` (``model.safetensors``), so :func:`load_captioner` loads it like real
    weights. Its captions are random words: for tests of the plumbing only.
    """
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    if image_size < 8 or image_size % 8:
        raise ValueError(f"image_size must be a positive multiple of 8, got {image_size}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab = {tok: i for i, tok in enumerate(specials + list(_TINY_WORDS))}
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(vocab=dict(vocab), do_lower_case=True, bos_token="[DEC]")
    hidden = 32
    text = dict(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=64, projection_dim=hidden,
                bos_token_id=vocab["[DEC]"], eos_token_id=vocab["[SEP]"], sep_token_id=vocab["[SEP]"],
                pad_token_id=vocab["[PAD]"])
    vision = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=2,
                  image_size=image_size, patch_size=8, projection_dim=hidden)
    config = BlipConfig(text_config=text, vision_config=vision, projection_dim=hidden, image_text_hidden_size=hidden)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(config)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
                              tokenizer=tokenizer)
    model.save_pretrained(out)  # model.safetensors
    processor.save_pretrained(out)
    return out
