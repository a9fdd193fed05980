"""SIP with ``strength: auto``: each image at the largest candidate strength whose edit the reference
classifier still gives its source's labels (the rule sgd_mix's strength auto follows), on a tiny
closed-set refiner and a tiny reference trained here."""

from __future__ import annotations

import numpy as np
import pytest

from porcelain.config import ReferenceConfig, RuntimeConfig
from porcelain.storage import Store
from porcelain.synthesizers import get, parse_config

RES = 32
GEN = {"preset": "tiny", "resolution": RES, "train_steps": 30, "batch_size": 16}
SAMPLING = {"steps": 4, "batch_size": 16}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from porcelain.data.ingest import ingest_dataset, pack_data_shard
    from porcelain.data.source import materialize_sample
    from porcelain.evaluate.reference import train_reference

    store = Store(str(tmp_path_factory.mktemp("sip_auto") / "store"))
    src = materialize_sample(store, 60, RES, 0)
    data = ingest_dataset(store, src["manifest"], src["root"], min_images=10)
    for i in range(data["n_shards"]):
        pack_data_shard(store, data["data_hash"], i, data["n_shards"], RES)
    rt = RuntimeConfig(device="cpu", threads=1)
    reference = train_reference(store, data, ReferenceConfig(model="small_cnn", steps=12, batch_size=16, eval_every=4),
                                RES, rt)
    return store, data, reference, rt


def test_sip_needs_the_reference_only_for_strength_auto(prepared):
    store, data, _, rt = prepared
    sip = get("sip")
    fixed = parse_config({"kind": "sip", "generator": GEN, "sampling": SAMPLING, "strength": 0.5})
    auto = parse_config({"kind": "sip", "generator": GEN, "sampling": SAMPLING, "strength": "auto"})
    assert sip.needs_for(fixed) == frozenset() and sip.needs_for(auto) == frozenset({"reference"})
    # fixed strength keeps its cache keys (no auto settings in them); auto adds its candidates
    assert "auto_strengths" not in fixed.identity() and "auto_strength" not in fixed.prepare_identity()
    assert auto.identity()["auto_strengths"] == [0.3, 0.5, 0.7, 0.9] and auto.prepare_identity()["auto_strength"]
    from porcelain.synthesizers.prepare import prepare_synthesizer

    with pytest.raises(ValueError, match=r"sip needs \['reference'\]"):
        prepare_synthesizer(store, data, auto, rt)


def test_sip_strength_auto_takes_the_largest_strength_the_label_survives(prepared):
    from porcelain.generate.plan import ShardSpec
    from porcelain.synthesizers.prepare import prepare_synthesizer

    store, data, reference, rt = prepared
    sip = get("sip")
    conf = 0.3
    auto = parse_config({"kind": "sip", "generator": GEN, "sampling": SAMPLING, "strength": "auto",
                         "auto_strengths": [0.5, 1.0], "auto_confidence": conf})
    ref = prepare_synthesizer(store, data, auto, rt, {"reference": reference})
    assert ref.meta["reference"]["weights_sha256"] == reference["weights_sha256"]
    spec = sip.plan(store, data, auto, {_some_combo(store, data): 6}, 8, 7)[0]
    shard = sip.generate(store, ref, spec, auto, rt)
    assert len(shard.images) == spec.count and shard.shard["strength"] == "auto"
    fixed = {s: sip.augment(store, ref, auto, _rows(store, data, spec), seed=spec.seed, first_index=spec.start,
                            strength=s, runtime=rt)[0] for s in (0.5, 1.0)}
    for i, p in enumerate(shard.provenance):
        confidence = {float(s): c for s, c in p["auto_strength_confidence"].items()}
        assert set(confidence) == {0.5, 1.0}
        kept = [s for s, c in confidence.items() if c >= conf]
        assert p["strength"] == (max(kept) if kept else 0.5) and p["auto_strength_kept_label"] == bool(kept)
        # the image is the fixed-strength edit at the chosen strength, same seed: the choice is the only difference
        assert int(np.abs(shard.images[i].astype(int) - fixed[p["strength"]][i].astype(int)).max()) <= 1
    lines = "\n".join(sip.describe(ref, auto))
    assert "auto: the largest of [0.5, 1.0]" in lines


def _some_combo(store, data):
    from porcelain.data.ingest import load_split

    _, labels = load_split(store, data["data_hash"], RES, data["n_shards"], "train")
    return tuple(int(v) for v in labels[0])


def _rows(store, data, spec):
    from porcelain.synthesizers.sources import source_rows

    return source_rows(store, data["data_hash"], spec)
