import json

import pytest
import yaml

from porcelain.config import RunConfig, config_from_dict, example_yaml, json_schema, load_config, parse_ratio
from porcelain.errors import ConfigError


def test_every_shipped_config_survives_the_flows_round_trip():
    from porcelain.config import demo_config

    from pathlib import Path

    shipped = sorted(Path("porcelain/configs").glob("*.yaml"))
    assert len(shipped) >= 6
    for cfg in (demo_config(), *(load_config(p) for p in shipped)):
        assert config_from_dict(cfg.model_dump(mode="json")) == cfg


def test_example_round_trips(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(example_yaml())
    assert load_config(p) == RunConfig()


def test_schema_lists_sections():
    schema = json_schema()
    assert {"data", "storage", "synthesizers", "generation", "classifier", "sweep"} <= set(schema["properties"])
    json.dumps(schema)


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump({"generator": {"train_stpes": 10}}))
    with pytest.raises(ConfigError, match=r"generator\.train_stpes: unknown key"):
        load_config(p)


def test_out_of_range_values_are_reported_together():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"generation": {"guidance": -1}, "classifier": {"steps": 0}})
    msg = str(e.value)
    assert "generation.guidance" in msg and "classifier.steps" in msg


def test_invalid_yaml_gives_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("data:\n  manifest: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(p)


def test_non_mapping_and_missing_and_non_utf8(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    q = tmp_path / "latin1.yaml"
    q.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(q)


@pytest.mark.parametrize("ratio,frac", [("100:0", 0.0), ("90:10", 0.1), ("3:1", 0.25)])
def test_parse_ratio(ratio, frac):
    assert parse_ratio(ratio) == pytest.approx(frac)


@pytest.mark.parametrize("bad", ["90-10", "0:10", "a:b", "90:-1"])
def test_bad_ratios_rejected(bad):
    with pytest.raises(ConfigError, match="sweep.ratios"):
        config_from_dict({"sweep": {"ratios": [bad]}})


def test_the_baseline_is_the_real_only_run_and_is_added_when_missing():
    cfg = config_from_dict({"sweep": {"ratios": ["90:10", "50:50"]}})
    assert cfg.sweep.ratios == ["100:0", "90:10", "50:50"] and cfg.sweep.baseline == "100:0"
    # listed second, still the baseline (the report used ratios[0] before)
    assert config_from_dict({"sweep": {"ratios": ["90:10", "100:0"]}}).sweep.baseline == "100:0"


def test_duplicate_ratios_by_value_are_an_error():
    with pytest.raises(ConfigError, match=r"sweep.ratios.*'90:10' and '9:1' are the same mix"):
        config_from_dict({"sweep": {"ratios": ["100:0", "90:10", "9:1"]}})


def test_synthetic_per_real_becomes_ratios():
    cfg = config_from_dict({"sweep": {"synthetic_per_real": [0.5, 1, 2, 4]}})
    assert cfg.sweep.ratios == ["100:0", "1:0.5", "1:1", "1:2", "1:4"]
    assert cfg.sweep.synthetic_fractions()[-1] == pytest.approx(0.8)
    with pytest.raises(ConfigError, match="either sweep.ratios or sweep.synthetic_per_real"):
        config_from_dict({"sweep": {"ratios": ["100:0"], "synthetic_per_real": [1]}})
    # the flow re-reads the config it was given as a dump: every config must survive that round trip
    assert config_from_dict(cfg.model_dump(mode="json")) == cfg


def test_step_budget_is_the_same_for_every_ratio_and_floored_when_given_in_epochs():
    c = config_from_dict({"classifier": {"steps": 700}}).classifier
    assert c.budget(97) == c.budget(5000) == 700
    e = config_from_dict({"classifier": {"epochs": 6, "batch_size": 64, "min_steps": 300}}).classifier
    assert e.budget(97) == 300  # 6 epochs of 97 images would be 10 steps: the floor holds
    assert e.budget(6400) == 600


def test_removed_judge_keys_say_how_to_rewrite():
    with pytest.raises(ConfigError, match=r"faithfulness.epochs was removed.*reference"):
        config_from_dict({"faithfulness": {"epochs": 10}})


def test_old_closed_set_keys_become_one_synthesizer_entry():
    old = config_from_dict({"generator": {"train_steps": 7}, "generation": {"guidance": 1.5, "shard_size": 8}})
    (syn,) = old.synthesizers
    assert syn.kind == "closed_set" and syn.generator.train_steps == 7 and syn.sampling.guidance == 1.5
    assert old.generation.shard_size == 8 and old.generator is None
    new = config_from_dict({"synthesizers": [{"kind": "closed_set", "generator": {"train_steps": 7},
                                              "sampling": {"guidance": 1.5}}], "generation": {"shard_size": 8}})
    assert new == old
    with pytest.raises(ConfigError, match="move them into its entry"):
        config_from_dict({"synthesizers": [{"kind": "closed_set"}], "generator": {"train_steps": 7}})


def test_synthesizer_entries_are_checked_by_their_kind():
    with pytest.raises(ConfigError, match=r"unknown synthesizer kind 'gan'.*closed_set"):
        config_from_dict({"synthesizers": [{"kind": "gan"}]})
    # a key of another kind (or a typo) is named, with the entry and its kind
    with pytest.raises(ConfigError, match=r"synthesizers.0 \(kind closed_set\): lora_scale: unknown key"):
        config_from_dict({"synthesizers": [{"kind": "closed_set", "lora_scale": 0.4}]})
    with pytest.raises(ConfigError, match=r"generator.train_steps: Input should be greater than or equal to 1"):
        config_from_dict({"synthesizers": [{"kind": "closed_set", "generator": {"train_steps": 0}}]})
    with pytest.raises(ConfigError, match="both called 'closed_set'"):
        config_from_dict({"synthesizers": [{"kind": "closed_set"}, {"kind": "closed_set"}]})
    two = config_from_dict({"synthesizers": [{"kind": "closed_set"}, {"kind": "closed_set", "name": "w1",
                                                                        "sampling": {"guidance": 1.0}}]})
    assert [s.label for s in two.synthesizers] == ["closed_set", "w1"]
    assert config_from_dict({"synthesizers": []}).synthesizers == []


def test_runtime_engine_keys_are_checked_and_stay_out_of_cache_keys():
    from porcelain.runtime import runtime_identity

    rt = config_from_dict({"runtime": {"engine": "dask", "dask_workers": 4, "dask_threads_per_worker": 2,
                                       "device": "cpu"}}).runtime
    assert (rt.engine, rt.dask_address, rt.dask_workers, rt.dask_threads_per_worker, rt.gpus_per_worker) == \
        ("dask", None, 4, 2, None)
    assert config_from_dict({}).runtime.engine == "threads"
    # the engine says where tasks run, not what they compute: the same numeric identity, so the same keys
    assert runtime_identity(rt) == runtime_identity(config_from_dict({"runtime": {"device": "cpu"}}).runtime)
    # a config re-read from its own full dump (as the flow does) passes, for both engines
    for data in ({}, {"runtime": {"engine": "dask", "dask_address": "tcp://10.0.0.5:8786"}}):
        cfg = config_from_dict(data)
        assert config_from_dict(cfg.model_dump(mode="json")) == cfg
    with pytest.raises(ConfigError, match=r"runtime.dask_address applies to engine dask only"):
        config_from_dict({"runtime": {"dask_address": "tcp://10.0.0.5:8786"}})
    with pytest.raises(ConfigError, match=r"runtime.dask_workers applies to engine dask only"):
        config_from_dict({"runtime": {"dask_workers": 3}})
    with pytest.raises(ConfigError, match=r"runtime.dask_workers sets up a local cluster, but dask_address"):
        config_from_dict({"runtime": {"engine": "dask", "dask_address": "tcp://h:8786", "dask_workers": 3}})
    with pytest.raises(ConfigError, match=r"is not a scheduler address"):
        config_from_dict({"runtime": {"engine": "dask", "dask_address": "tcp://h: 8786"}})
    with pytest.raises(ConfigError, match=r"gpus_per_worker is 0 but device is cuda.*wait forever"):
        config_from_dict({"runtime": {"engine": "dask", "device": "cuda", "gpus_per_worker": 0}})
    with pytest.raises(ConfigError, match=r"gpus_per_worker is 1 but device is cpu"):
        config_from_dict({"runtime": {"engine": "dask", "device": "cpu", "gpus_per_worker": 1}})
    with pytest.raises(ConfigError, match=r"runtime.engine: Input should be 'threads' or 'dask'"):
        config_from_dict({"runtime": {"engine": "ray"}})
    with pytest.raises(ConfigError, match=r"runtime.dask_worker: unknown key"):
        config_from_dict({"runtime": {"engine": "dask", "dask_worker": 2}})


def test_a_synthesizer_can_carry_its_own_filters_and_they_do_not_change_its_images():
    cfg = config_from_dict({"filters": {"memorisation": 1.0}, "synthesizers": [
        {"kind": "closed_set"}, {"kind": "closed_set", "name": "faithful", "filters": {"faithfulness": 0.9}}]})
    plain, faithful = cfg.synthesizers
    assert cfg.filters_for(plain).memorisation == 1.0 and cfg.filters_for(plain).faithfulness is None
    assert cfg.filters_for(faithful).faithfulness == 0.9 and cfg.filters_for(faithful).memorisation is None
    assert plain.identity() == faithful.identity()  # one set of generated images, two chains over it
    with pytest.raises(ConfigError, match=r"synthesizers\.1 \(faithful\): filters\.faithfulnes: unknown key"):
        config_from_dict({"synthesizers": [{"kind": "closed_set"},
                                           {"kind": "closed_set", "name": "faithful", "filters": {"faithfulnes": 0.9}}]})


def test_two_filter_chains_over_one_shard_are_two_training_sets():
    from porcelain.config import ClassifierConfig, RuntimeConfig
    from porcelain.results import ShardRef
    from porcelain.train.sweep import run_key

    shard = ShardRef(key="shards/a/manifest.json", combo=[0, 1], start=0, n=8, synthesizer="closed_set")
    key = lambda s: run_key("d" * 16, "1:1", 0, {"alloc": [[0, 1, 4]], "shards": [s]},  # noqa: E731
                            ClassifierConfig(), RuntimeConfig())
    unfiltered, all_kept = key(shard), key(shard.model_copy(update={"kept": list(range(8))}))
    some = key(shard.model_copy(update={"kept": [0, 2, 3, 5]}))
    assert len({unfiltered, all_kept, some}) == 3
    assert key(shard.model_copy(update={"kept": [5, 3, 2, 0]})) == some
