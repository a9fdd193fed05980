import csv
import json

import yaml

from flows.cli import main
from porcelain.config import RunConfig, demo_config


def test_config_example_and_schema(capsys):
    assert main(["config", "example"]) == 0
    assert RunConfig.model_validate(yaml.safe_load(capsys.readouterr().out)) == RunConfig()
    assert main(["config", "schema"]) == 0
    assert "sweep" in json.loads(capsys.readouterr().out)["properties"]


def test_sample_data_writes_manifest_and_images(tmp_path, capsys):
    assert main(["sample-data", str(tmp_path / "s"), "--n", "40", "--size", "16"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "s" / "manifest.csv")))
    assert len(rows) == 40 and set(rows[0]) == {"image", "dynasty", "kiln", "glaze", "type"}
    assert all((tmp_path / "s" / r["image"]).stat().st_size > 0 for r in rows)


def test_bad_config_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("generator:\n  train_stpes: 3\n")
    assert main(["run", str(p)]) == 2
    err = capsys.readouterr().err
    assert "generator.train_stpes: unknown key" in err and "Traceback" not in err


def test_demo_config_is_valid_and_sized_for_cpu():
    cfg = demo_config(url="/tmp/somewhere")
    assert cfg.storage.url == "/tmp/somewhere"
    assert cfg.data.manifest == "sample" and len(cfg.sweep.seeds) == 3 and len(cfg.sweep.ratios) == 3
