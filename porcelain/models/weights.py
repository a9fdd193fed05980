"""Model weights on disk: safetensors only, never an unpickle of untrusted bytes.

* :func:`save_weights` / :func:`load_weights` read and write safetensors through bytes
  (``safetensors.torch.save`` / ``load``), so they work on local paths, on in-memory buffers
  and on fsspec file objects (S3, GCS, ``memory://``) alike.
* A pickle where weights are expected (a ``torch.save`` zip checkpoint or a raw pickle) is refused
  with :class:`~porcelain.errors.WeightsError`: unpickling runs arbitrary code.
* :func:`load_pretrained_backbone` is the one place that accepts ``.pth``/``.bin`` files, and
  only from a local path, only through ``torch.load(weights_only=True)`` (PyTorch's restricted
  unpickler that builds tensors and plain containers, nothing else).
* ``python -m porcelain.models.weights convert IN.pth OUT.safetensors`` converts a trusted local
  checkpoint once, after which it can be stored anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from porcelain.errors import WeightsError
from porcelain.hashing import canonical_safetensors

PathLike = Union[str, os.PathLike]
WeightsSource = Union[bytes, bytearray, memoryview, PathLike, IO[bytes]]

ZIP_MAGIC = b"PK\x03\x04"
PICKLE_MAGIC = b"\x80"  # PICKLE PROTO opcode: every pickle of protocol >= 2 starts with it
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl")
_CONVERT_HINT = (
    "convert it once, on a machine where you trust the file, with "
    "`python -m porcelain.models.weights convert IN.pth OUT.safetensors` "
    "(uses torch.load(weights_only=True)) and use the .safetensors file"
)


# --------------------------------------------------------------------------------------------
# saving


def _prepare_for_save(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, one storage per tensor (safetensors refuses shared or strided tensors)."""
    out: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, value in state_dict.items():
        if not isinstance(name, str):
            raise TypeError(f"state_dict keys must be str, got {type(name).__name__}: {name!r}")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict[{name!r}] is a {type(value).__name__}, not a tensor; only tensors can be saved")
        t = value.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.cpu()
        if not t.is_contiguous():
            t = t.contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else 0
        if ptr and ptr in seen_storages:
            t = t.clone()  # tied / shared weights are written twice, as independent tensors
            ptr = t.untyped_storage().data_ptr()
        if ptr:
            seen_storages.add(ptr)
        out[name] = t
    return out


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str] | None:
    if metadata is None:
        return None
    bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise TypeError(f"weights metadata must map str to str (safetensors headers are text); not str: {bad}")
    return dict(metadata)


def weights_bytes(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """The safetensors serialisation of ``state_dict`` (with optional text ``metadata``).

    Deterministic: equal tensors and metadata give equal bytes, whatever the order of either.
    """
    return canonical_safetensors(_st_save(_prepare_for_save(state_dict), metadata=_check_metadata(metadata)))


def save_weights(
    state_dict: Mapping[str, torch.Tensor],
    dest: PathLike | IO[bytes],
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Write ``state_dict`` as safetensors to a local path or a writable binary file object.

    A local path is written atomically (temporary file + rename). Tied or non-contiguous tensors
    are copied so that safetensors accepts them. Returns :func:`weights_hash` of what was written.
    """
    data = weights_bytes(state_dict, metadata)
    if hasattr(dest, "write"):
        dest.write(data)  # type: ignore[union-attr]
    else:
        path = Path(os.fspath(dest))  # type: ignore[arg-type]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return weights_hash(state_dict)


# --------------------------------------------------------------------------------------------
# loading


def _read_bytes(src: WeightsSource) -> tuple[bytes, str]:
    """The bytes of ``src`` and a description of where they came from (for error messages)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src), "<bytes>"
    if hasattr(src, "read"):
        data = src.read()  # type: ignore[union-attr]
        return bytes(data), str(getattr(src, "path", None) or getattr(src, "name", None) or "<file object>")
    path = Path(os.fspath(src))  # type: ignore[arg-type]
    if not path.is_file():
        raise WeightsError(f"weights file not found: looked at {path.resolve()}")
    return path.read_bytes(), str(path)


def _refuse_pickle(data: bytes, where: str) -> None:
    if data[:4] == ZIP_MAGIC:
        raise WeightsError(
            f"refusing to unpickle {where}: it is a torch.save (zip/pickle) checkpoint, not safetensors, "
            f"and unpickling can run arbitrary code; {_CONVERT_HINT}"
        )
    if data[:1] == PICKLE_MAGIC:
        raise WeightsError(
            f"refusing to unpickle {where}: it is a Python pickle, not safetensors, "
            f"and unpickling can run arbitrary code; {_CONVERT_HINT}"
        )


def _parse_header(data: bytes, where: str) -> dict:
    """The JSON header of a safetensors blob (8-byte little-endian length, then JSON)."""
    if len(data) < 8:
        raise WeightsError(f"{where} is not a safetensors file: only {len(data)} bytes")
    (n,) = struct.unpack("<Q", data[:8])
    if n == 0 or 8 + n > len(data) or data[8:9] != b"{":
        raise WeightsError(
            f"{where} is not a safetensors file (header length {n} for {len(data)} bytes, "
            f"starts with {data[:8]!r})"
        )
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{where} is not a safetensors file: unreadable header ({e})") from e
    if not isinstance(header, dict):
        raise WeightsError(f"{where} is not a safetensors file: header is not a JSON object")
    return header


def load_weights(src: WeightsSource) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read safetensors weights from bytes, a local path or a readable binary file object.

    Returns ``(state_dict, metadata)``, tensors on CPU. A pickle / ``torch.save`` file, a missing
    file or anything else that is not safetensors raises :class:`WeightsError`.
    """
    data, where = _read_bytes(src)
    _refuse_pickle(data, where)
    header = _parse_header(data, where)
    metadata = header.get("__metadata__") or {}
    try:
        state = _st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise WeightsError(f"{where}: corrupt safetensors file ({e})") from e
    return dict(state), {str(k): str(v) for k, v in metadata.items()}


def weights_hash(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 (hex) over the sorted tensor names, dtypes, shapes and raw bytes.

    Independent of dict order, device, memory layout and of safetensors metadata; any change of a
    name, dtype, shape or value changes it.
    """
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        head = json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape)]).encode("utf-8")
        h.update(struct.pack("<Q", len(head)))
        h.update(head)
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        h.update(struct.pack("<Q", len(raw)))
        h.update(raw)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# user-supplied pretrained backbones


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _unwrap_checkpoint(obj: object, where: str) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or the usual ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict", "module"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{where}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise WeightsError(f"{where}: entries that are not tensors: {not_tensors[:5]}")
    state = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in state):  # saved from DataParallel/DDP
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def load_pretrained_backbone(path: PathLike) -> dict[str, torch.Tensor]:
    """A user-supplied backbone state dict (e.g. ImageNet weights downloaded by the user).

    * ``.safetensors`` (or any file whose bytes are safetensors): loaded directly; fsspec URLs
      (``s3://…``) are allowed for safetensors only.
    * ``.pth``/``.pt``/``.bin``/``.ckpt``: only from a local path, only with
      ``torch.load(weights_only=True)``; never from shared storage.

    Nothing is downloaded. Raises :class:`WeightsError` for a missing file (saying where it
    looked), a remote pickle, or a file that is not a state dict.
    """
    spec = os.fspath(path)
    suffix = Path(spec.split("?")[0]).suffix.lower()
    if _is_url(spec):
        if suffix in PICKLE_SUFFIXES:
            raise WeightsError(
                f"refusing to load {spec}: {suffix} checkpoints are pickles and are only read from a local path, "
                f"never from shared storage; {_CONVERT_HINT}"
            )
        import fsspec  # only needed for remote safetensors

        try:
            with fsspec.open(spec, "rb") as f:
                return _unwrap_checkpoint(load_weights(f)[0], spec)
        except FileNotFoundError as e:
            raise WeightsError(f"backbone weights file not found: looked at {spec}") from e
    local = Path(spec.removeprefix("file://")).expanduser()
    if not local.is_file():
        raise WeightsError(f"backbone weights file not found: looked at {local.resolve()}")
    with local.open("rb") as f:
        head = f.read(8)
    if suffix in PICKLE_SUFFIXES or head[:4] == ZIP_MAGIC or head[:1] == PICKLE_MAGIC:
        try:
            obj = torch.load(local, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError for anything beyond tensors and containers
            raise WeightsError(
                f"{local}: could not be read with torch.load(weights_only=True), which refuses "
                f"anything but tensors and plain containers ({type(e).__name__}: {str(e)[:300]})"
            ) from e
        return _unwrap_checkpoint(obj, str(local))
    return _unwrap_checkpoint(load_weights(local)[0], str(local))


def convert_checkpoint(src: PathLike, dst: PathLike, metadata: Mapping[str, str] | None = None) -> str:
    """Convert a trusted local ``.pth``/``.bin`` checkpoint to safetensors; returns its hash."""
    state = load_pretrained_backbone(src)
    return save_weights(state, dst, {"converted_from": Path(os.fspath(src)).name, **(metadata or {})})


def _main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "convert":
        print("usage: python -m porcelain.models.weights convert IN.pth OUT.safetensors", file=sys.stderr)
        return 2
    digest = convert_checkpoint(argv[1], argv[2])
    print(f"wrote {argv[2]} (sha256 of tensors {digest})")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
