import csv
import io
import math

import pytest

from porcelain.config import config_from_dict
from porcelain.report.build import aggregate, build_report
from porcelain.storage import Store

EVIL = "=HYPERLINK(\"http://x\",\"y\")"


def _metrics(f1: float) -> dict:
    return {"per_task": {t: {"accuracy": f1, "macro_f1": f1, "minority_macro_f1": f1 - 0.1} for t in ("glaze", EVIL)}}


def _summary(ratios=("100:0", "90:10"), seeds=(0, 1, 2)) -> dict:
    cfg = config_from_dict({"sweep": {"ratios": list(ratios), "seeds": list(seeds)}, "name": "@evil"})
    runs = [{"ratio": r, "seed": s, "metrics": _metrics(0.5 + 0.1 * i + 0.01 * s)}
            for i, r in enumerate(ratios) for s in seeds]
    tasks = ["glaze", EVIL]
    return {
        "config": cfg.model_dump(mode="json"),
        "data": {"data_hash": "d" * 16, "tasks": tasks, "classes": {t: ["a", "b"] for t in tasks},
                 "counts": {"train": 10, "val": 2, "test": 3}, "n_quarantined": 1,
                 "quarantine_reasons": {"not_an_image": 1}, "quarantine_key": "datasets/x/quarantine.csv",
                 "n_shards": 1},
        "plan": {"real_train": 10, "imbalance_before": {t: 5.0 for t in tasks},
                 "ratios": {r: {"synthetic": 0 if r == "100:0" else 1, "imbalance": {t: 4.0 for t in tasks}} for r in ratios}},
        "generator": None, "shards": [], "faithfulness": None, "runs": runs,
    }


def test_aggregate_gives_paired_delta_with_the_right_sign():
    s = _summary()
    agg = aggregate(s["runs"], s["data"]["tasks"], ["100:0", "90:10"])
    mean, lo, hi = agg["delta"]["macro_f1"]["90:10"]["glaze"]
    assert mean == pytest.approx(0.1)
    assert lo == pytest.approx(0.1) and hi == pytest.approx(0.1)  # identical per-seed gains: zero width
    m, lo1, hi1 = agg["stats"]["macro_f1"]["100:0"]["glaze"]
    assert lo1 < m < hi1


def test_one_seed_has_no_interval():
    s = _summary(seeds=(0,))
    agg = aggregate(s["runs"], s["data"]["tasks"], ["100:0", "90:10"])
    assert math.isnan(agg["stats"]["macro_f1"]["90:10"]["glaze"][1])


def test_report_files_escape_formula_cells(tmp_path):
    store = Store(str(tmp_path))
    out = build_report(store, _summary())
    md = store.read_bytes(out["report"]).decode()
    assert "better (CI above 0)" in md
    assert f"| 90:10 | '{EVIL} |" in md and f"| {EVIL}" not in md
    assert "# porcelain report — '@evil" in md
    rows = list(csv.reader(io.StringIO(store.read_bytes(f"{out['key']}/results.csv").decode())))
    cells = [c for row in rows for c in row]
    assert not any(c[:1] in "=+@" for c in cells if c)
    assert f"'{EVIL}" in cells
    for name in ("macro_f1.png", "imbalance.png", "minority_macro_f1.png"):
        assert store.read_bytes(f"{out['key']}/{name}").startswith(b"\x89PNG")
