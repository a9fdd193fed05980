"""A tiny random Stable Diffusion pipeline, for tests and benchmarks (no download).

Same classes and code paths as the real model: :class:`UNet2DConditionModel` with cross-attention
(``to_q``/``to_k``/``to_v``/``to_out.0``, so LoRA targets the same modules), :class:`AutoencoderKL`,
:class:`CLIPTextModel`, and the **real CLIP BPE tokenizer** (49408 tokens) rebuilt offline from the
vocabulary that open_clip bundles (``bpe_simple_vocab_16e6.txt.gz``): the same merges and ids as
``openai/clip-vit-large-patch14``'s tokenizer. The pipeline is written with ``save_pretrained`` so
that tests load it through the real :func:`porcelain.diffusion.loading.load_pipeline`.

At 64 px the UNet works on 16×16 latents (the VAE downsamples 4×).
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import torch

__all__ = ["CLIP_VOCAB_SIZE", "build_clip_tokenizer", "build_tiny_pipeline", "write_clip_tokenizer_files"]

CLIP_VOCAB_SIZE = 49408
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def write_clip_tokenizer_files(directory: str | os.PathLike[str]) -> Path:
    """Write CLIP's ``vocab.json`` and ``merges.txt`` into ``directory`` from open_clip's bundled BPE file.

    The vocabulary is built as open_clip's ``SimpleTokenizer`` builds it: the 256 byte symbols,
    the same with ``</w>``, one token per merge (the first 48894 merges), then the two specials.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [_BOS, _EOS]
    if len(vocab) != CLIP_VOCAB_SIZE or len(set(vocab)) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"rebuilt CLIP vocabulary has {len(vocab)} tokens ({len(set(vocab))} distinct), "
                           f"expected {CLIP_VOCAB_SIZE}: open_clip's BPE file changed")
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
                                  encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                  encoding="utf-8")
    return d


def build_clip_tokenizer(directory: str | os.PathLike[str]):
    """The real CLIP tokenizer, loaded with ``from_pretrained`` from files written into ``directory``.

    (In transformers 5, ``CLIPTokenizer(vocab_file=..., merges_file=...)`` silently builds a
    3-token vocabulary; ``from_pretrained`` on the folder reads the files properly.)
    """
    from transformers import CLIPTokenizer

    d = write_clip_tokenizer_files(directory)
    tok = CLIPTokenizer.from_pretrained(str(d), bos_token=_BOS, eos_token=_EOS, unk_token=_EOS,
                                        pad_token=_EOS, model_max_length=77)
    if len(tok) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"CLIP tokenizer loaded with {len(tok)} tokens, expected {CLIP_VOCAB_SIZE}")
    return tok


def build_tiny_pipeline(directory: str | os.PathLike[str], seed: int = 0) -> Path:
    """Build a tiny random :class:`StableDiffusionPipeline` and ``save_pretrained`` it into ``directory``.

    Deterministic in ``seed`` (the global torch RNG is left as it was). Returns the folder, a valid
    ``base`` for :func:`~porcelain.diffusion.loading.load_pipeline`.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_clip_tokenizer(out / "_tokenizer_src")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
            attention_head_dim=4, norm_num_groups=16,
        )
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
            block_out_channels=(16, 32, 32), norm_num_groups=8, sample_size=64,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        )
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type="epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)
    pipe.save_pretrained(str(out), safe_serialization=True)
    for f in (out / "_tokenizer_src").iterdir():
        f.unlink()
    (out / "_tokenizer_src").rmdir()
    return out
