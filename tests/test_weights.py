"""Weights I/O: safetensors round trips, refusal of pickles, hashing, user-supplied backbones."""

from __future__ import annotations

import io
import os
import pickle

import fsspec
import pytest
import torch

from porcelain.errors import WeightsError
from porcelain.models.weights import (
    _main,
    convert_checkpoint,
    load_pretrained_backbone,
    load_weights,
    save_weights,
    weights_bytes,
    weights_hash,
)


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "bn.running_mean": torch.randn(4, generator=g),
        "bn.num_batches_tracked": torch.tensor(7),
        "half": torch.randn(5, generator=g).to(torch.bfloat16),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
    }


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


class _Boom:
    """Unpickling this would create a marker file: proof that nothing was unpickled."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_round_trip_path_fileobj_and_bytes(tmp_path):
    state = _state()
    meta = {"model": "tiny", "tasks": "glaze,type"}
    digest = save_weights(state, tmp_path / "sub" / "w.safetensors", meta)
    assert digest == weights_hash(state)
    assert not list((tmp_path / "sub").glob("*.tmp"))
    loaded, got_meta = load_weights(tmp_path / "sub" / "w.safetensors")
    _assert_same(state, loaded)
    assert got_meta == meta
    assert weights_hash(loaded) == digest

    buf = io.BytesIO()
    save_weights(state, buf)
    loaded, got_meta = load_weights(buf.getvalue())
    _assert_same(state, loaded)
    assert got_meta == {}
    buf.seek(0)
    _assert_same(state, load_weights(buf)[0])


def test_round_trip_through_fsspec():
    state = _state()
    with fsspec.open("memory://porcelain-test/w.safetensors", "wb") as f:
        save_weights(state, f, {"k": "v"})
    with fsspec.open("memory://porcelain-test/w.safetensors", "rb") as f:
        loaded, meta = load_weights(f)
    _assert_same(state, loaded)
    assert meta == {"k": "v"}


def test_shared_and_non_contiguous_tensors_are_saved():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {"a": base, "tied": base, "t": base.t(), "row": base[1], "col": base[:, 2]}
    buf = io.BytesIO()
    save_weights(state, buf)
    loaded, _ = load_weights(buf.getvalue())
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    loaded["a"][0, 0] = 99.0  # independent copies after loading
    assert loaded["tied"][0, 0] == 0.0


def test_saved_bytes_are_the_same_every_time():
    """The sha256 of saved weights keys results downstream: equal content must give equal bytes
    (safetensors alone writes its metadata map in a random order)."""
    meta = {f"key{i}": str(i) for i in range(6)}
    state = _state()
    blobs = {weights_bytes(state, meta) for _ in range(20)}
    blobs.add(weights_bytes(dict(reversed(list(state.items()))), dict(reversed(list(meta.items())))))
    assert len(blobs) == 1
    blob = blobs.pop()
    assert int.from_bytes(blob[:8], "little") % 8 == 0  # header stays 8-byte aligned
    loaded, got_meta = load_weights(blob)
    _assert_same(loaded, state)
    assert got_meta == meta


def test_metadata_must_be_text():
    with pytest.raises(TypeError, match="str to str"):
        save_weights(_state(), io.BytesIO(), {"epochs": 3})  # type: ignore[dict-item]


@pytest.mark.parametrize("kind", ["torch_zip", "torch_legacy", "raw_pickle"])
def test_pickles_are_refused_unread(tmp_path, kind):
    marker = tmp_path / "pwned"
    _Boom.marker = str(marker)
    payload = {"w": torch.zeros(2), "evil": _Boom()}
    path = tmp_path / "weights.safetensors"  # the name lies; the bytes decide
    if kind == "torch_zip":
        torch.save(payload, path)
        assert path.read_bytes()[:4] == b"PK\x03\x04"
    elif kind == "torch_legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
        assert path.read_bytes()[:1] == b"\x80"
    else:
        path.write_bytes(pickle.dumps(payload, protocol=4))
    for src in (path, path.read_bytes(), io.BytesIO(path.read_bytes())):
        with pytest.raises(WeightsError, match="refusing to unpickle") as err:
            load_weights(src)
        assert "convert" in str(err.value) and "safetensors" in str(err.value)
    assert not marker.exists()


def test_not_safetensors_and_missing(tmp_path):
    with pytest.raises(WeightsError, match="not a safetensors file"):
        load_weights(b"hello, this is not a weights file")
    with pytest.raises(WeightsError, match="not a safetensors file"):
        load_weights(b"")
    with pytest.raises(WeightsError, match="looked at"):
        load_weights(tmp_path / "absent.safetensors")
    good = io.BytesIO()
    save_weights(_state(), good)
    with pytest.raises(WeightsError, match="not a safetensors file|corrupt"):
        load_weights(good.getvalue()[:-10])  # truncated


def test_weights_hash_properties():
    state = _state()
    h = weights_hash(state)
    assert len(h) == 64
    assert weights_hash(dict(reversed(list(state.items())))) == h
    t = torch.arange(6.0).reshape(2, 3)
    assert weights_hash({"x": t.t()}) == weights_hash({"x": t.t().contiguous()})
    changed = dict(state)
    changed["conv.weight"] = state["conv.weight"].clone()
    changed["conv.weight"][0, 0, 0, 0] += 1e-3
    assert weights_hash(changed) != h
    assert weights_hash({"x": t}) != weights_hash({"y": t})
    assert weights_hash({"x": t}) != weights_hash({"x": t.double()})
    assert weights_hash({"x": t}) != weights_hash({"x": t.reshape(3, 2)})


def test_pretrained_backbone_formats(tmp_path):
    state = {k: v for k, v in _state().items() if k != "empty"}
    save_weights(state, tmp_path / "b.safetensors")
    _assert_same(state, load_pretrained_backbone(tmp_path / "b.safetensors"))

    torch.save(state, tmp_path / "b.pth")  # read with weights_only=True
    _assert_same(state, load_pretrained_backbone(str(tmp_path / "b.pth")))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "c.bin")
    _assert_same(state, load_pretrained_backbone(tmp_path / "c.bin"))

    marker = tmp_path / "pwned"
    _Boom.marker = str(marker)
    torch.save({"w": torch.zeros(1), "evil": _Boom()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="weights_only=True"):
        load_pretrained_backbone(tmp_path / "evil.pth")
    assert not marker.exists()

    with pytest.raises(WeightsError, match=f"looked at {tmp_path / 'nope.pth'}"):
        load_pretrained_backbone(tmp_path / "nope.pth")


def test_pretrained_backbone_pickles_never_from_shared_storage():
    with pytest.raises(WeightsError, match="only read from a local path"):
        load_pretrained_backbone("s3://museum-bucket/backbones/mobilenetv3.pth")
    state = {"w": torch.ones(3)}
    with fsspec.open("memory://porcelain-test/backbone.safetensors", "wb") as f:
        save_weights(state, f)
    _assert_same(state, load_pretrained_backbone("memory://porcelain-test/backbone.safetensors"))
    with pytest.raises(WeightsError, match="looked at memory://porcelain-test/none.safetensors"):
        load_pretrained_backbone("memory://porcelain-test/none.safetensors")


def test_convert_checkpoint(tmp_path, capsys):
    state = {"w": torch.randn(3, 2), "b": torch.zeros(3)}
    torch.save(state, tmp_path / "in.pth")
    assert _main(["convert", str(tmp_path / "in.pth"), str(tmp_path / "out.safetensors")]) == 0
    assert "wrote" in capsys.readouterr().out
    loaded, meta = load_weights(tmp_path / "out.safetensors")
    _assert_same(state, loaded)
    assert meta == {"converted_from": "in.pth"}
    assert convert_checkpoint(tmp_path / "in.pth", tmp_path / "again.safetensors") == weights_hash(state)
    assert _main(["bogus"]) == 2
    assert os.path.exists(tmp_path / "again.safetensors")
