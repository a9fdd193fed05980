"""Resumable training checkpoints as one safetensors file (no pickle anywhere).

``{key}/checkpoint.safetensors`` holds, as tensors:

* ``lora/<adapter>/<param>`` – every adapter's current LoRA weights,
* ``ti/<token>`` – the class-token embeddings (textual inversion), if any,
* ``optim/<index>/<name>`` – the optimizer state tensors of the phase in progress,
* ``rng/torch`` (and ``rng/cuda``) – the global torch RNG state(s) as uint8 tensors,

and as text metadata the step, the phase, an identity of the run (settings, data, base) and the
optimizer's non-tensor state (param groups, scalars) as JSON. It is written with one atomic
``Store.write_bytes``, so a reader sees the previous checkpoint or the new one, never a mixture.
Training draws its batches, noise and timesteps from generators seeded by ``(seed, step)``, so the
step plus these tensors determine the rest of the run exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

from porcelain.errors import WeightsError
from porcelain.models.weights import load_weights, weights_bytes
from porcelain.storage.store import Store

__all__ = ["CHECKPOINT_FORMAT", "Checkpoint", "checkpoint_key", "read_checkpoint", "write_checkpoint",
           "optimizer_to_tensors", "optimizer_from_tensors"]

CHECKPOINT_FORMAT = "porcelain-sd-lora-checkpoint-v1"


def checkpoint_key(key: str) -> str:
    return f"{key}/checkpoint.safetensors"


@dataclass
class Checkpoint:
    """What a checkpoint holds (see the module docstring)."""

    step: int
    phase: str
    identity: str
    lora: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    ti: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, Any] | None = None
    rng: dict[str, torch.Tensor] = field(default_factory=dict)


def optimizer_to_tensors(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer ``state_dict()`` into tensors and a JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in state_dict["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}/{name}"] = v
            else:
                scalars.setdefault(str(idx), {})[name] = v
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars,
                     "indices": sorted(int(i) for i in state_dict["state"])}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`optimizer_to_tensors`: a state dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {i: {} for i in rest["indices"]}
    for k, v in tensors.items():
        idx, name = k.split("/", 1)
        state[int(idx)][name] = v
    for idx, sc in rest["scalars"].items():
        state[int(idx)].update(sc)
    groups = []
    for g in rest["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def write_checkpoint(store: Store, key: str, ck: Checkpoint) -> str:
    """Write ``ck`` atomically at ``{key}/checkpoint.safetensors``; return the storage key."""
    tensors: dict[str, torch.Tensor] = {}
    for name, state in ck.lora.items():
        tensors.update({f"lora/{name}/{k}": v for k, v in state.items()})
    tensors.update({f"ti/{t}": v for t, v in ck.ti.items()})
    tensors.update({f"rng/{k}": v for k, v in ck.rng.items()})
    optim_rest = None
    if ck.optimizer is not None:
        opt_tensors, optim_rest = optimizer_to_tensors(ck.optimizer)
        tensors.update({f"optim/{k}": v for k, v in opt_tensors.items()})
    meta = {"format": CHECKPOINT_FORMAT, "step": str(ck.step), "phase": ck.phase, "identity": ck.identity,
            "optimizer": json.dumps(optim_rest)}
    return store.write_bytes(checkpoint_key(key), weights_bytes(tensors, meta))


def read_checkpoint(store: Store, key: str) -> Checkpoint | None:
    """The checkpoint under ``key``, or None if there is none. A foreign file is a :class:`WeightsError`."""
    k = checkpoint_key(key)
    if not store.exists(k):
        return None
    tensors, meta = load_weights(store.read_bytes(k))
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise WeightsError(f"{k} is not a porcelain SD LoRA checkpoint (format {meta.get('format')!r})")
    ck = Checkpoint(step=int(meta["step"]), phase=meta["phase"], identity=meta["identity"])
    opt_tensors: dict[str, torch.Tensor] = {}
    for name, v in tensors.items():
        kind, rest = name.split("/", 1)
        if kind == "lora":
            adapter, param = rest.split("/", 1)
            ck.lora.setdefault(adapter, {})[param] = v
        elif kind == "ti":
            ck.ti[rest] = v
        elif kind == "rng":
            ck.rng[rest] = v
        elif kind == "optim":
            opt_tensors[rest] = v
    optim_rest = json.loads(meta.get("optimizer") or "null")
    if optim_rest is not None:
        ck.optimizer = optimizer_from_tensors(opt_tensors, optim_rest)
    return ck
