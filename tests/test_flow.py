"""End-to-end: the whole flow on a tiny config, under one session-scoped Prefect test server."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from porcelain.config import config_from_dict
from porcelain.storage import Store
from tests.flowkit import LAST_RUN, flow_run_record
from tests.flowkit import run_flow as _run
from tests.flowkit import tiny_config
from tests.sd_fixtures import tiny_base  # noqa: F401  (a session fixture)

pytestmark = pytest.mark.slow
# uncached by design: they publish, or look up and record, what a run found
ALWAYS_RUN = {"publish-report", "previous-run", "record-run"}


@pytest.fixture(scope="module")
def first_run(tiny_run):
    return tiny_run


def test_flow_produces_report_and_metrics(first_run):
    cfg, result, states = first_run
    store = Store(cfg["storage"]["url"])
    md = store.read_bytes(result["report"]["report"]).decode()
    for heading in ("Does synthetic data help?", "Imbalance ratio", "Label faithfulness", "Results on the real test split"):
        assert heading in md
    report_dir = result["report"]["key"]
    assert {f"{report_dir}/{n}" for n in ("macro_f1.png", "imbalance.png", "samples-closed_set.png", "results.csv")} \
        <= set(store.list(report_dir))
    faith = result["faithfulness"]["closed_set"]
    assert set(faith["faithfulness"]) == {"dynasty", "kiln", "glaze", "type"}
    for f in faith["faithfulness"].values():
        assert 0.0 <= f["low"] <= f["share"] <= f["high"] <= 1.0 and f["n"] == faith["n_images"]
    assert {"generated_median", "test_median", "near_copy_share"} <= set(faith["memorisation"])
    # every task ran and completed once on the first run
    assert all(s == ["Completed"] or set(s) == {"Completed"} for s in states.values()), states
    assert len(states["train-closed_set 80:20-seed0"]) == 1 and "train-100:0-seed1" in states
    # each shard is recorded with its provenance, and holds the images asked of it (at most shard_size)
    shard_keys = [k for k in store.list("synthetic") if k.endswith(".json")]
    doc = store.read_json(shard_keys[0])
    assert {"synthesizer", "combination", "seed", "model_sha256", "steps", "guidance", "runtime"} <= set(doc["provenance"])
    assert doc["provenance"]["synthesizer"] == "closed_set"
    assert len(doc["images"]) == doc["provenance"]["count"] <= cfg["generation"]["shard_size"]
    # the report beside it opens alone (figures embedded), and the UI followed the long stages
    html = store.read_bytes(result["report"]["html"]).decode()
    assert "<table" in html and "data:image/png;base64," in html
    _, artifacts = flow_run_record(result["flow_run_id"])
    progress = {a.key: a.data for a in artifacts if a.type == "progress"}
    assert {"reference-classifier", "prepare-closed-set", "generation-closed-set", "sweep"} <= set(progress), progress
    assert all(float(v) == 100.0 for v in progress.values()), progress


def test_sweep_runs_train_on_their_synthetic_images_for_equal_steps(first_run):
    cfg, result, _ = first_run
    store = Store(cfg["storage"]["url"])
    runs = [store.read_json(k) for k in store.list("runs") if k.endswith("metrics.json")]
    by = {(r["ratio"], r["seed"]): r for r in runs}
    base, mixed = by[("100:0", 0)], by[("80:20", 0)]
    assert base["n_synthetic"] == 0 and base["n_real"] == mixed["n_real"]
    # 80:20 of the real train images: a synthetic share of 20% of the training set
    assert mixed["n_synthetic"] == round(mixed["n_real"] * 0.2 / 0.8)
    assert {r["steps"] for r in runs} == {12} and all(1 <= r["selected_step"] <= 12 for r in runs)
    md = store.read_bytes(result["report"]["report"]).decode()
    assert "## Training budget" in md and "## Verdict" in md


def test_second_run_executes_no_task_body_and_still_shows_its_findings(first_run, body_calls):
    cfg, result, _ = first_run
    result2, states = _run(cfg)
    assert result2["report"] == result["report"]
    assert body_calls == []
    publish = states.pop("publish-report")
    # (what changed since the previous run is looked up and recorded every time; nothing is computed)
    assert states.pop("previous-run") == states.pop("record-run") == ["Completed"]
    flat = [s for v in states.values() for s in v]
    assert flat and set(flat) == {"Cached"}, states
    # the UI shows what this rerun ran and found: its name says the config and the data ...
    run, artifacts = flow_run_record(LAST_RUN["id"])
    assert publish == ["Completed"]
    assert run.name == f"tiny-{result['data_hash'][:10]}"
    # ... and a cached report is published again, with its figures embedded (no relative links)
    by_key = {a.key: a for a in artifacts if a.key}
    assert {"tiny-report", "tiny-results"} <= set(by_key), sorted(by_key)
    md = by_key["tiny-report"].data
    assert "Does synthetic data help?" in md and "data:image/png;base64," in md
    assert not re.search(r"!\[[^\]]*\]\((?!data:)", md)
    rows = by_key["tiny-results"].data
    rows = rows if isinstance(rows, list) else __import__("json").loads(rows)
    assert {r["arm"] for r in rows} == {"100:0", "closed_set 80:20"}


def test_changing_one_ratio_recomputes_only_what_depends_on_it(first_run, body_calls):
    cfg, _, _ = first_run
    changed = tiny_config(cfg["storage"]["url"], sweep={"ratios": ["100:0", "50:50"], "seeds": [0, 1]})
    store = Store(cfg["storage"]["url"])
    before = {k: [im["key"] for im in store.read_json(k)["images"]] for k in store.list("synthetic") if k.endswith(".json")}
    result, states = _run(changed)
    assert body_calls.count("train_and_evaluate") == 2 and "prepare_synthesizer" not in body_calls
    # the report says what changed since the previous run of these runs (same data, a new arm)
    changes = store.read_json(f"{result['report']['key']}/changes.json")
    assert not changes["first_run"] and not changes["data_changed"] and changes["n_added"] == 0
    assert "closed_set 50:50" in changes["new_arms"]
    assert "## Since the previous run" in store.read_bytes(result["report"]["report"]).decode()
    ran = {name for name, s in states.items() if "Completed" in s}
    cached = {name for name, s in states.items() if s == ["Cached"] * len(s)}
    assert {"train-100:0-seed0", "train-100:0-seed1", "ingest", "prepare-closed_set"} <= cached
    assert {"train-closed_set 50:50-seed0", "train-closed_set 50:50-seed1", "plan-generation", "report"} <= ran
    # shard keys do not depend on the ratio: every image made before is kept as it was, and shards
    # that a larger ratio needs more of grow by the missing images only
    after = {k: [im["key"] for im in store.read_json(k)["images"]] for k in store.list("synthetic") if k.endswith(".json")}
    assert all(after[k][: len(v)] == v for k, v in before.items())
    grown = [k for k, v in before.items() if len(after[k]) > len(v)]
    assert grown and body_calls.count("generate_shard") == len([n for n in ran if n.startswith("generate-")])


def test_equivalence_runs_and_the_adaptive_arm_join_the_sweep_and_the_report(first_run, body_calls):
    """sweep.real_fractions: real-only runs on half the real set (same steps), not verdict arms; the
    report fits how many synthetic images are worth a real one. sweep.adaptive: an arm chosen on val,
    judged on test beside the fixed ratio. Everything else is cached (one flow run for both, to keep
    the suite short)."""
    cfg, _, _ = first_run
    eq = tiny_config(cfg["storage"]["url"], sweep={"ratios": ["100:0", "80:20"], "seeds": [0, 1],
                                                   "real_fractions": [0.5], "adaptive": True})
    result, states = _run(eq)
    assert states["train-real 50%-seed0"] == ["Completed"] and states["train-100:0-seed0"] == ["Cached"]
    assert states["choose-adaptive-closed_set"] == ["Completed"] and "train-closed_set adaptive-seed1" in states
    assert states["train-closed_set 80:20-seed0"] == ["Cached"]
    assert body_calls.count("train_and_evaluate") == 4 and "prepare_synthesizer" not in body_calls
    store = Store(cfg["storage"]["url"])
    runs = [store.read_json(k) for k in store.list("runs") if k.endswith("metrics.json")]
    half = [r for r in runs if r.get("real_fraction") == 0.5]
    full = [r for r in runs if r["ratio"] == "100:0" and r.get("real_fraction", 1.0) == 1.0]
    assert len(half) == 2 and {r["steps"] for r in half} == {r["steps"] for r in full}
    assert all(r["n_real"] < full[0]["n_real"] for r in half)
    md = store.read_bytes(result["report"]["report"]).decode()
    assert "## How many synthetic images are worth one real image" in md
    verdicts = md.split("## Which method helps which task", 1)[-1].split("\n## ", 1)[0]
    assert "real 50%" not in verdicts  # a learning-curve point is not a method
    assert "## Adaptive per-task weights of the synthetic images" in md
    section = md.split("## Adaptive per-task weights", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| closed_set |")]
    assert len(rows) == 4 and all(" 80:20 " in ln for ln in rows)  # one row per task, at the only ratio
    header = next(ln for ln in md.splitlines() if ln.startswith("| task | closed_set 80:20"))
    assert "closed_set adaptive" in header  # judged on test beside the fixed ratio


def test_tasks_side_by_side_give_the_same_results(first_run, tmp_path):
    """runtime.workers = 2 (shards and sweep runs two at a time, sharing threads): same bytes, same metrics."""
    cfg, result, _ = first_run
    other = tiny_config(str(tmp_path / "runs"), runtime={"workers": 2})
    result2, _ = _run(other)
    a, b = Store(cfg["storage"]["url"]), Store(other["storage"]["url"])
    # (other tests may have added shards and runs to the first store since, or grown its shards:
    # compare what b made with the same images of a)
    shards = {k for k in b.list("synthetic") if k.endswith(".json")}
    assert shards and shards <= set(a.list("synthetic"))  # same content-addressed shard keys
    for k in shards:
        mine = b.read_json(k)["images"]
        assert a.read_json(k)["images"][: len(mine)] == mine, k
    metrics = sorted(k for k in b.list("runs") if k.endswith("metrics.json"))
    assert len(metrics) == 4
    for k in metrics:
        assert a.read_json(k)["metrics"] == b.read_json(k)["metrics"], k
    assert result2["faithfulness"]["closed_set"]["faithfulness"] == result["faithfulness"]["closed_set"]["faithfulness"]


SECRET = "porcelain-planted-secret-7Qx9"


def test_flow_on_s3_storage_keeps_credentials_out_of_everything(prefect_harness, moto_server, s3_bucket,
                                                               monkeypatch, capfd):
    from pathlib import Path

    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    cfg = tiny_config(f"{s3_bucket}/runs", sweep={"ratios": ["100:0", "90:10"], "seeds": [0]})
    cfg["storage"]["endpoint_url"] = moto_server.endpoint
    result, states = _run(cfg)
    store = Store(cfg["storage"]["url"], config_from_dict(cfg).storage.storage_options())
    assert store.exists(result["report"]["report"])
    assert result["report"]["uri"].startswith("s3://")
    # Prefect's own result records live in the bucket too, as JSON, not pickles
    records = store.list("prefect-results")
    assert records
    for key in records:
        assert store.read_bytes(key).lstrip()[:1] == b"{"
    # the planted secret is nowhere: not in any stored object (results, reports, manifests, CSVs) ...
    for path in store.fs.find(store.root):
        assert SECRET.encode() not in store.fs.cat_file(path), path
    # ... nor in the console output, nor in the Prefect database (parameters, logs, artifacts, blocks, states)
    out, err = capfd.readouterr()
    assert SECRET not in out + err
    db = Path(PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split("///", 1)[1])
    for f in db.parent.glob(db.name + "*"):
        assert SECRET.encode() not in f.read_bytes(), f


def test_a_new_kind_plugs_in_beside_closed_set_with_no_other_file_changed(first_run, body_calls):
    """A kind registered from its own module runs through plan, shards, faithfulness, sweep and report
    next to closed_set, against one shared real-only baseline."""
    import tests.fake_kind  # noqa: F401  (registers `solid`)

    cfg, _, _ = first_run
    both = tiny_config(cfg["storage"]["url"], sweep={"ratios": ["100:0", "80:20"], "seeds": [0, 1]})
    entry = {"kind": "closed_set", "generator": both.pop("generator"),
             "sampling": {k: both["generation"].pop(k) for k in ("steps", "batch_size")}}
    both["synthesizers"] = [entry, {"kind": "solid"}]
    result, states = _run(both)
    # closed_set's model and shards come from the first run's cache; only `solid` is new
    assert body_calls.count("prepare_synthesizer") == 1
    assert states["prepare-closed_set"] == ["Cached"] and states["prepare-solid"] == ["Completed"]
    assert states["train-100:0-seed0"] == ["Cached"] and states["train-closed_set 80:20-seed0"] == ["Cached"]
    assert states["train-solid 80:20-seed0"] == ["Completed"]
    assert body_calls.count("train_and_evaluate") == 2  # solid's two seeds; the baseline is shared
    store = Store(cfg["storage"]["url"])
    solid = [k for k in store.list("synthetic") if k.endswith(".json") and store.read_json(k)["provenance"]["synthesizer"] == "solid"]
    doc = store.read_json(solid[0])
    assert doc["images"][0]["provenance"]["colour"] and len(doc["images"]) == doc["provenance"]["count"]
    md = store.read_bytes(result["report"]["report"]).decode()
    assert "## Which method helps which task" in md
    header = next(ln for ln in md.splitlines() if ln.startswith("| task | closed_set 80:20"))
    assert "solid 80:20" in header
    assert "## Synthesizer `solid` (kind `solid`)" in md and "## Synthesizer `closed_set`" in md
    assert set(result["faithfulness"]) == {"closed_set", "solid"}


def test_closed_set_and_sd_lora_side_by_side_through_sweep_and_report(first_run, tiny_base, body_calls):
    """The porcelain paper's kind on a tiny random SD pipeline saved by the test, loaded by the real
    loading code, beside closed_set (cached from the first run), one shared baseline."""
    cfg, _, _ = first_run
    both = tiny_config(cfg["storage"]["url"], sweep={"ratios": ["100:0", "80:20"], "seeds": [0, 1]})
    entry = {"kind": "closed_set", "generator": both.pop("generator"),
             "sampling": {k: both["generation"].pop(k) for k in ("steps", "batch_size")}}
    sd = {"kind": "sd_lora", "name": "sd", "base": str(tiny_base), "resolution": 32,
          "prompts": {"vocabulary": "sample"},
          "lora": {"train_steps": 3, "batch_size": 2, "checkpoint_every": 2, "lr": 5e-2},
          "inference": {"steps": 3, "guidance": 3.0, "batch_size": 8}}
    both["synthesizers"] = [entry, sd]
    # two shards at a time: they share one in-process diffusers pipeline, which is not thread-safe
    # (without the kind's lock most shards failed this way)
    both["runtime"]["workers"] = 2
    result, states = _run(both)
    sd_runs = [s for name, s in states.items() if name.startswith("generate-sd-")]
    assert len(sd_runs) >= 4 and all(s == ["Completed"] for s in sd_runs), sd_runs
    assert states["prepare-closed_set"] == ["Cached"] and states["prepare-sd"] == ["Completed"]
    assert states["train-100:0-seed0"] == ["Cached"] and states["train-sd 80:20-seed1"] == ["Completed"]
    store = Store(cfg["storage"]["url"])
    runs = [store.read_json(k) for k in store.list("runs") if k.endswith("metrics.json")]
    assert {r["steps"] for r in runs} == {12}  # every arm, every kind: the same budget
    sd_shards = [store.read_json(k) for k in store.list("synthetic") if k.endswith(".json")]
    sd_shards = [d for d in sd_shards if d["provenance"]["synthesizer"] == "sd_lora"]
    assert sd_shards and all(len(d["images"]) == d["provenance"]["count"] for d in sd_shards)
    prov = sd_shards[0]["images"][0]["provenance"]
    assert "Chinese porcelain" in prov["prompt"] and prov["lora_scale"] == 0.4  # the paper's default scale
    md = store.read_bytes(result["report"]["report"]).decode()
    header = next(ln for ln in md.splitlines() if ln.startswith("| task | closed_set 80:20"))
    assert "sd 80:20" in header
    assert "## Synthesizer `sd` (kind `sd_lora`)" in md and "LoRA scale 0.4" in md
    assert set(result["faithfulness"]) == {"closed_set", "sd"}


def test_a_stage_version_invalidates_that_stage_and_what_depends_on_it_only(first_run, body_calls, monkeypatch):
    """A new report version reruns the report alone; a new sweep version reruns the sweep runs and the
    report, and leaves the data, the reference, the generator and every shard cached."""
    import dataclasses

    from porcelain import versions

    cfg, _, _ = first_run
    monkeypatch.setitem(versions.STAGES, "report", dataclasses.replace(versions.STAGES["report"], version="test-2"))
    _run(cfg)
    assert body_calls == ["build_report"]
    body_calls.clear()
    monkeypatch.setitem(versions.STAGES, "sweep", dataclasses.replace(versions.STAGES["sweep"], version="test-2"))
    _, states = _run(cfg)
    n_runs = len(cfg["sweep"]["ratios"]) * len(cfg["sweep"]["seeds"])
    assert sorted(set(body_calls)) == ["build_report", "train_and_evaluate"]
    assert body_calls.count("train_and_evaluate") == n_runs
    assert states["prepare-closed_set"] == ["Cached"] and states["reference-classifier"] == ["Cached"]
    assert all(s == ["Cached"] for n, s in states.items() if n.startswith("generate-"))


def test_sgd_mix_starts_from_real_train_images_of_the_combination_and_reuses_its_saliency(first_run, body_calls):
    """The image-conditioned kind beside closed_set: its refiner is closed_set's cached generator, its
    sources are train images of the combination each image is labelled with, and a second run is cached."""
    cfg, _, _ = first_run
    both = tiny_config(cfg["storage"]["url"], sweep={"ratios": ["100:0", "80:20"], "seeds": [0]})
    gen = both.pop("generator")
    sampling = {k: both["generation"].pop(k) for k in ("steps", "batch_size")}
    both["synthesizers"] = [{"kind": "closed_set", "generator": gen, "sampling": sampling},
                            {"kind": "sgd_mix", "generator": gen, "sampling": sampling, "strength": 0.5,
                             "candidates": 5, "drift_images": 12}]
    result, states = _run(both)
    assert states["prepare-sgd_mix"] == ["Completed"]
    assert body_calls.count("prepare_synthesizer") == 1  # the refiner came from closed_set's stored generator
    store = Store(cfg["storage"]["url"])
    docs = [store.read_json(k) for k in store.list("synthetic") if k.endswith(".json")]
    mixes = [d for d in docs if d["provenance"]["synthesizer"] == "sgd_mix"]
    assert mixes
    meta = store.read_json(next(k for k in store.list("datasets") if k.endswith("dataset.json")))
    by_sha = {r["sha256"]: r for r in meta["records"]}
    for d in mixes:
        combo = d["provenance"]["combination"]
        for im in d["images"]:
            p = im["provenance"]
            src, tgt = by_sha[p["source"]], by_sha[p["target"]]
            assert src["split"] == "train" and tgt["split"] == "train" and p["source"] != p["target"]
            assert src["labels"] == combo  # the label of a mixed image is its source's
            assert 0.0 < p["mask_area"] <= 1.0 and p["strength"] == 0.5
    assert len(store.list("saliency")) == 1
    md = store.read_bytes(result["report"]["report"]).decode()
    assert "## Synthesizer `sgd_mix` (kind `sgd_mix`)" in md and "sgd_mix 80:20" in md
    # semantic drift per strength, and the audit grid, for the image-conditioned kind
    drift = md.split("### Semantic drift by strength")[1].split("###")[0]
    rows = [ln for ln in drift.splitlines() if ln.startswith("| 0.") or ln.startswith("| 1 ")]
    assert [r.split(" | ")[0] for r in rows] == ["| 0.3", "| 0.5", "| 0.7", "| 0.9", "| 1"]
    dist = [float(r.rstrip(" |").rsplit("| ", 1)[1]) for r in rows]
    assert dist[-1] > dist[0]  # more strength, further from the source
    report_dir = result["report"]["key"]
    assert store.read_bytes(f"{report_dir}/audit-sgd_mix.png").startswith(b"\x89PNG")
    body_calls.clear()
    _, again = _run(both)
    computed = {k: v for k, v in again.items() if k not in ALWAYS_RUN}
    assert body_calls == [] and set(s for v in computed.values() for s in v) == {"Cached"}
    # strength auto: each image at the largest candidate S whose result the reference still labels as
    # its source (every task at least auto_confidence); the smallest when none does
    auto = {**both["synthesizers"][1], "name": "mix_auto", "strength": "auto", "auto_strengths": [0.3, 0.9],
            "auto_confidence": 0.3}
    both["synthesizers"] = [both["synthesizers"][0], auto]
    result, states = _run(both)
    assert states["generate-mix_auto-" + next(k.split("generate-mix_auto-")[1] for k in states
                                              if k.startswith("generate-mix_auto-"))] == ["Completed"]
    docs = [store.read_json(k) for k in store.list("synthetic") if k.endswith(".json")]
    prov = [im["provenance"] for d in docs if d["provenance"]["synthesizer"] == "sgd_mix"
            and d["provenance"].get("strength") == "auto" for im in d["images"]]
    assert prov and {p["strength"] for p in prov} <= {0.3, 0.9}
    for p in prov:  # the choice follows the rule, from the reference's confidence at each candidate
        conf = {float(s): c for s, c in p["auto_strength_confidence"].items()}
        kept = [s for s, c in conf.items() if c >= 0.3]
        assert p["strength"] == (max(kept) if kept else 0.3) and p["auto_strength_kept_label"] == bool(kept)
    assert "mix_auto 80:20" in store.read_bytes(result["report"]["report"]).decode()


@pytest.fixture(scope="session")
def tiny_clip_and_blip(tmp_path_factory):
    from porcelain.augment.captions import build_tiny_blip
    from porcelain.evaluate.clip import build_tiny_clip

    root = tmp_path_factory.mktemp("vl")
    build_tiny_clip(root / "clip", seed=0)
    return f"local-dir:{root / 'clip'}", str(build_tiny_blip(root / "blip", seed=0, image_size=32))


def test_sip_edits_train_images_with_captions_and_clip_derived_guidance(first_run, tiny_clip_and_blip, body_calls):
    cfg, _, _ = first_run
    clip, blip = tiny_clip_and_blip
    run = tiny_config(cfg["storage"]["url"], sweep={"ratios": ["100:0", "80:20"], "seeds": [0]})
    gen = run.pop("generator")
    sampling = {k: run["generation"].pop(k) for k in ("steps", "batch_size")}
    run["synthesizers"] = [{"kind": "sip", "generator": gen, "sampling": sampling, "strength": 0.6, "clip": clip,
                            "captioner": blip, "n_beam": 1, "n_sample": 2, "w_min": 0.25, "w_max": 1.5,
                            "drift_images": 8, "drift_strengths": [0.3, 1.0]}]
    result, states = _run(run)
    assert states["prepare-sip"] == ["Completed"]
    store = Store(cfg["storage"]["url"])
    docs = [store.read_json(k) for k in store.list("synthetic") if k.endswith(".json")]
    edits = [im["provenance"] for d in docs if d["provenance"]["synthesizer"] == "sip" for im in d["images"]]
    assert edits
    for p in edits:
        assert p["caption"] and p["prompt"].endswith(p["caption"]) and p["prompt"] != p["caption"]
        assert 0.25 <= p["guidance"] <= 1.5 and p["strength"] == 0.6
    assert len({p["guidance"] for p in edits}) > 1  # guidance follows each source's similarity
    md = store.read_bytes(result["report"]["report"]).decode()
    assert "## Synthesizer `sip` (kind `sip`)" in md and "label-conditioned SDEdit" in md
    assert len(store.list("captions")) == 1
    body_calls.clear()  # a second run: captions, CLIP choices and edits all come from cache
    _, again = _run(run)
    computed = {k: v for k, v in again.items() if k not in ALWAYS_RUN}
    assert body_calls == [] and set(s for v in computed.values() for s in v) == {"Cached"}
    assert len(store.list("captions")) == 1


def test_filters_drop_unfaithful_images_and_top_up_keeps_the_planned_counts(first_run, body_calls):
    """A faithfulness filter with a strict threshold drops images; top-up generates more of the
    combinations left short, and every sweep run still trains on the planned number of synthetic images."""
    cfg, _, _ = first_run
    run = tiny_config(cfg["storage"]["url"], sweep={"ratios": ["100:0", "80:20"], "seeds": [0]},
                      filters={"faithfulness": 0.3, "max_attempts": 4, "rounds": 2})
    result, states = _run(run)
    assert any(n.startswith("filter-") for n in states) and "plan-top-up-closed_set-0" in states
    store = Store(cfg["storage"]["url"])
    md = store.read_bytes(result["report"]["report"]).decode()
    section = md.split("### Filters")[1].split("###")[0]
    made, kept = (int(x) for x in re.search(r"Made (\d+) images, kept (\d+)", section).groups())
    need = sum(n for _, n in result_plan(store, result))
    assert made > kept and "faithfulness:" in section
    assert made > need  # top-up made more than the plan asked for, to refill what the filter dropped
    faith = result["faithfulness"]["closed_set"]  # judged on what the sweep trains on: the kept images
    assert faith["kept_only"] and faith["n_images"] == kept and "images its filters kept" in md
    runs = [store.read_json(k) for k in store.list("runs") if k.endswith("metrics.json")]
    mixed = [r for r in runs if r["n_synthetic"] and r["seed"] == 0]
    plan_n = round(mixed[0]["n_real"] * 0.2 / 0.8) if mixed else None
    short = re.search(r"(\d+) combinations stayed short", section)
    if short is None:  # every combination refilled: the ratio holds exactly its planned count
        assert any(r["n_synthetic"] == plan_n for r in mixed)
    else:  # the report says so, and no run trained on images the filter dropped
        assert kept == 0 or mixed
    # filtered verdicts are stored per shard, with a reason for every dropped image
    verdicts = [store.read_json(k) for k in store.list("filtered")]
    assert verdicts and all(bool(r) != k for v in verdicts for k, r in zip(v["keep"], v["reasons"]))
    # the stage runs the one chain (run_chain): its reasons are the faithfulness filter's own, and its
    # verdict is what the stored score says (min over tasks of p(intended value) against 0.3)
    for v in verdicts:
        p_min = v["scores"]["faithfulness"]["values"]["min_probability"]
        assert v["keep"] == [p >= 0.3 for p in p_min] and v["steps"] == ["faithfulness"]
        assert v["passes"]["faithfulness"]["reached"] == v["n"] and v["passes"]["faithfulness"]["passed"] == sum(v["keep"])
        assert all(re.match(r"\w+: p\(\d+\)=", r) and f == "faithfulness"
                   for k, r, f in zip(v["keep"], v["reasons"], v["filter"]) if not k)
    # the report: pass rate per step (overall, per task value, per combination), score histogram and
    # a grid of rejected images beside it
    rate = re.search(r"Pass rate per step .*?: faithfulness (\d+)% \((\d+)/(\d+)\)", section)
    assert rate and (int(rate.group(2)), int(rate.group(3))) == (kept, made)
    assert "| task value | made | kept | pass rate | faithfulness |" in section
    assert "Combinations, lowest pass rate first" in section and "`rejected-closed_set.png`" in section
    report_dir = result["report"]["key"]
    grid = Image.open(io.BytesIO(store.read_bytes(f"{report_dir}/rejected-closed_set.png")))
    assert grid.size[0] > 400 and grid.size[1] > 150 and np.asarray(grid.convert("L")).std() > 10
    assert store.exists(f"{report_dir}/filter-scores-closed_set.png")
    # the texture table (always, filters or not): generated vs real test per class, with the KS statistic
    assert "#### Texture (GLCM) against real test images" in md and "| all | all images |" in md and "| glaze |" in md
    texture = result["faithfulness"]["closed_set"]["texture"]
    assert set(texture["tasks"]) == {"dynasty", "kiln", "glaze", "type"}
    assert all(0 <= r["ks"] <= 1 for rows in texture["tasks"].values() for r in rows if r["ks"] is not None)


def result_plan(store: Store, result: dict) -> list:
    """The plan's images per combination, from the report's flow summary stored with the run."""
    md = store.read_bytes(result["report"]["report"]).decode()
    n = re.search(r"80:20 → (\d+)", md)
    return [[None, int(n.group(1))]] if n else []
