"""Textual inversion: one new token per label value (``<glaze_celadon>``), only its embedding row learned.

* :func:`add_class_tokens` adds the tokens to the tokenizer, grows the text encoder's token
  embedding and initialises each new row with the mean embedding of its descriptor's BPE tokens.
* During training only the new rows are a parameter (:class:`TrainableRows`, spliced into the
  embedding lookup by a forward hook): no other row can change, and the optimizer state is small.
* :func:`embeddings_state` / :func:`load_class_tokens` save and reload the learned rows as a
  safetensors state ``{token: vector}``, into a fresh pipeline's tokenizer and text encoder (the
  SGD-Mix refiner reuses them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from porcelain.errors import WeightsError

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

__all__ = [
    "TI_FORMAT",
    "add_class_tokens",
    "embeddings_state",
    "load_class_tokens",
    "TrainableRows",
    "ti_metadata",
    "token_ids",
]

TI_FORMAT = "porcelain-textual-inversion-v1"


def token_ids(pipe: "StableDiffusionPipeline", tokens: Sequence[str]) -> list[int]:
    """Ids of single added tokens (each must be one token of the tokenizer)."""
    ids = pipe.tokenizer.convert_tokens_to_ids(list(tokens))
    unk = pipe.tokenizer.unk_token_id
    bad = [t for t, i in zip(tokens, ids) if i is None or i == unk]
    if bad:
        raise WeightsError(f"tokens {bad[:5]} are not in the tokenizer")
    return list(ids)


def add_class_tokens(pipe: "StableDiffusionPipeline", init_texts: Mapping[str, str]) -> list[int]:
    """Add each token of ``init_texts`` (``{token: descriptor}``), initialised from its descriptor.

    Tokens are added in sorted order, so their ids depend only on the set of tokens. Returns the ids.
    """
    tokens = sorted(init_texts)
    existing = [t for t in tokens if t in pipe.tokenizer.get_vocab()]
    if existing:
        raise WeightsError(f"class tokens {existing[:5]} are already in the tokenizer")
    emb = pipe.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        inits = []
        for t in tokens:
            ids = pipe.tokenizer(init_texts[t], add_special_tokens=False).input_ids or [pipe.tokenizer.eos_token_id]
            inits.append(emb[torch.tensor(ids, device=emb.device)].float().mean(0))
    added = pipe.tokenizer.add_tokens(tokens)
    if added != len(tokens):
        raise WeightsError(f"the tokenizer added {added} of {len(tokens)} class tokens")
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer), mean_resizing=False)
    ids = token_ids(pipe, tokens)
    emb = pipe.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for i, v in zip(ids, inits):
            emb[i] = v.to(emb.dtype)
    return ids


class TrainableRows:
    """The embedding rows of ``ids`` as one small trainable fp32 parameter, spliced into the lookup.

    A forward hook on the token embedding replaces the output at positions holding one of ``ids``
    with the matching row of :attr:`param`; gradients reach :attr:`param` only, so the optimizer
    (and its state) covers ``len(ids)`` rows, not the whole vocabulary, and no other row can change.
    :meth:`commit` writes :attr:`param` back into the embedding matrix (after every step);
    :meth:`close` removes the hook.
    """

    def __init__(self, pipe: "StableDiffusionPipeline", ids: Sequence[int]):
        self.embedding = pipe.text_encoder.get_input_embeddings()
        self.ids = torch.tensor(list(ids), device=self.embedding.weight.device)
        self.param = torch.nn.Parameter(self.embedding.weight.detach()[self.ids].float().clone())
        lookup = torch.full((self.embedding.weight.shape[0],), -1, dtype=torch.long)
        lookup[self.ids.cpu()] = torch.arange(len(ids))
        self.lookup = lookup.to(self.ids.device)
        self.handle = self.embedding.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        rows = self.lookup[args[0]]
        new = self.param[rows.clamp(min=0)].to(output.dtype)
        return torch.where((rows >= 0).unsqueeze(-1), new, output)

    def commit(self) -> None:
        with torch.no_grad():
            self.embedding.weight[self.ids] = self.param.detach().to(self.embedding.weight.dtype)

    def close(self) -> None:
        self.commit()
        self.handle.remove()


def embeddings_state(pipe: "StableDiffusionPipeline", tokens: Sequence[str]) -> dict[str, torch.Tensor]:
    """``{token: embedding row}`` (fp32, CPU) of the given added tokens."""
    weight = pipe.text_encoder.get_input_embeddings().weight
    return {t: weight[i].detach().to("cpu", torch.float32, copy=True)
            for t, i in zip(tokens, token_ids(pipe, tokens))}


def ti_metadata(tokens: Sequence[str], extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Text metadata stored with the learned embeddings."""
    return {"format": TI_FORMAT, "tokens": json.dumps(sorted(tokens)), **dict(extra or {})}


def load_class_tokens(pipe: "StableDiffusionPipeline", state: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> list[int]:
    """Add learned tokens (``{token: vector}``) to a fresh pipeline's tokenizer and text encoder."""
    if metadata is not None and metadata.get("format") != TI_FORMAT:
        raise WeightsError(f"not porcelain textual-inversion embeddings (format {metadata.get('format')!r})")
    dim = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    bad = {t: tuple(v.shape) for t, v in state.items() if tuple(v.shape) != (dim,)}
    if bad:
        raise WeightsError(f"embeddings of the wrong size for this text encoder (dim {dim}): {bad}")
    ids = add_class_tokens(pipe, {t: t for t in state})
    weight = pipe.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for t, i in zip(sorted(state), ids):
            weight[i] = state[t].to(weight.device, weight.dtype)
    return ids
