import csv
import json

import pytest
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


def test_store_check_finds_damage_and_cleans_leftovers_of_killed_writers(tmp_path, capsys):
    import os

    from porcelain.storage import Store

    store = Store(str(tmp_path / "runs"))
    key = store.put_object(b"fine", "bin")
    leftover = tmp_path / "runs" / "objects" / "x.bin.tmp-123"
    leftover.write_bytes(b"half")
    os.utime(leftover, (0, 0))  # written long ago by a writer that was killed
    assert main(["store", "check", store.url]) == 0
    assert "sound" in capsys.readouterr().out and leftover.exists()
    assert main(["store", "check", store.url, "--clean"]) == 0
    assert "removed 1 temporary files" in capsys.readouterr().out and not leftover.exists()
    (tmp_path / "runs" / key).write_bytes(b"tampered")
    assert main(["store", "check", store.url]) == 1
    out = capsys.readouterr().out
    assert f"{key}: content does not match its name" in out and "1 problems" in out


@pytest.mark.slow
def test_run_with_its_own_temporary_server_exits_cleanly_and_records_every_task(tmp_path):
    """What `make demo` does: no PREFECT_API_URL, so the CLI starts Prefect's temporary server itself
    (early, while the pipeline imports) and stops it only once every task run is recorded. (The race
    this guards against, the server stopped while it still writes the last states, showed in the
    demo's 88 task runs, not reliably in this small run: the test checks the path works end to end.)"""
    import os
    import sqlite3
    import subprocess
    import sys

    from tests.conftest import ROOT
    from tests.flowkit import tiny_config

    cfg = tiny_config(str(tmp_path / "runs"), sweep={"ratios": ["100:0", "80:20"], "seeds": [0]})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "report:" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr  # no cancelled writes of a server stopped too soon
    db = sqlite3.connect(tmp_path / "prefect-home" / "prefect.db")
    rows = db.execute("select name, state_type from task_run").fetchall()
    db.close()
    assert {state for _, state in rows} == {"COMPLETED"}, rows
    names = {name for name, _ in rows}
    assert {"builtin-data-sample", "ingest", "plan-generation", "reference-classifier", "prepare-closed_set",
            "label-faithfulness-closed_set", "train-100:0-seed0", "train-closed_set 80:20-seed0", "report"} <= names, names
    assert any(n.startswith("generate-") for n in names)
