import json

import pytest
import yaml

from porcelain.config import RunConfig, config_from_dict, example_yaml, json_schema, load_config, parse_ratio
from porcelain.errors import ConfigError


def test_example_round_trips(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(example_yaml())
    assert load_config(p) == RunConfig()


def test_schema_lists_sections():
    schema = json_schema()
    assert {"data", "storage", "generator", "generation", "classifier", "sweep"} <= set(schema["properties"])
    json.dumps(schema)


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump({"generator": {"train_stpes": 10}}))
    with pytest.raises(ConfigError, match=r"generator\.train_stpes: unknown key"):
        load_config(p)


def test_out_of_range_values_are_reported_together():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"generation": {"guidance": -1}, "classifier": {"epochs": 0}})
    msg = str(e.value)
    assert "generation.guidance" in msg and "classifier.epochs" in msg


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


def test_section_hash_depends_only_on_its_sections():
    a = RunConfig()
    b = config_from_dict({"classifier": {"epochs": 3}})
    assert a.section_hash("generator") == b.section_hash("generator")
    assert a.section_hash("classifier") != b.section_hash("classifier")
