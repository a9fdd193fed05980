import csv
import io

import numpy as np

from porcelain.config import config_from_dict
from porcelain.report.build import aggregate, build_report, fairness
from porcelain.storage import Store
from tests.flowkit import write_split

EVIL = "=HYPERLINK(\"http://x\",\"y\")"
TASKS = ["glaze", EVIL]
N_TEST = 200


def _target() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 2, size=(N_TEST, len(TASKS))).astype(np.int64)


def _preds(accuracy: float, seed: int) -> dict[str, list[int]]:
    """Predictions right on the first ``accuracy`` share of the test images (a little seed noise)."""
    y, rng = _target(), np.random.default_rng(100 + seed)
    out = {}
    for t, task in enumerate(TASKS):
        p = y[:, t].copy()
        k = int(accuracy * N_TEST) + int(rng.integers(-2, 3))
        p[k:] = 1 - p[k:]
        out[task] = p.tolist()
    return out


def _summary(store: Store, ratios=("100:0", "90:10"), seeds=(0, 1, 2), acc=(0.6, 0.9), steps=(50, 50)) -> dict:
    # every non-baseline ratio is an arm of one synthesizer, as the flow names them
    cfg = config_from_dict({"sweep": {"ratios": list(ratios), "seeds": list(seeds), "bootstrap": 500},
                            "name": "@evil", "classifier": {"image_size": 8}})
    y = _target()
    write_split(store, "d" * 16, TASKS, {t: ["a", "b"] for t in TASKS}, y, 8)
    runs = []
    for i, r in enumerate(ratios):
        for s in seeds:
            key = f"run-{i}-{s}"
            p = _preds(acc[i], s)
            store.write_json(f"runs/{key}/predictions.json", {"tasks": TASKS, "test": p})
            metrics = {"per_task": {t: {"accuracy": 0.5, "macro_f1": acc[i], "minority_macro_f1": acc[i],
                                        "per_class_f1": [acc[i], acc[i]], "support": [100, 100],
                                        "train_counts": [9, 3]} for t in TASKS}}
            runs.append({"key": key, "ratio": r, "arm": r if r == "100:0" else f"closed_set {r}",
                         "synthesizer": None if r == "100:0" else "closed_set", "seed": s, "metrics": metrics, "predictions": f"runs/{key}/predictions.json",
                         "n_real": 12, "n_synthetic": 0 if r == "100:0" else 2, "steps": steps[i], "selected_step": 40,
                         "best_val_macro_f1": 0.5, "model": "small_cnn", "model_reason": "small images", "seconds": 1.0})
    return {
        "config": cfg.model_dump(mode="json"),
        "data": {"data_hash": "d" * 16, "tasks": TASKS, "classes": {t: ["a", "b"] for t in TASKS},
                 "counts": {"train": 12, "val": 2, "test": N_TEST}, "n_quarantined": 1,
                 "quarantine_reasons": {"not_an_image": 1}, "quarantine_key": "datasets/x/quarantine.csv",
                 "n_shards": 1, "train_counts": [[9, 3], [9, 3]]},
        "plan": {"real_train": 12, "imbalance_before": {t: 3.0 for t in TASKS}, "targeted_without_test": [[1, 1]],
                 "ratios": {r: {"synthetic": 0 if r == "100:0" else 2, "imbalance": {t: 2.0 for t in TASKS}} for r in ratios}},
        "models": {}, "shards": {}, "faithfulness": {}, "runs": runs,
    }


def test_paired_bootstrap_delta_has_the_right_sign_and_bounded_intervals(tmp_path):
    store = Store(str(tmp_path))
    s = _summary(store)
    preds = {r["key"]: {t: np.asarray(v) for t, v in store.read_json(r["predictions"])["test"].items()} for r in s["runs"]}
    arms = ["100:0", "closed_set 90:10"]
    agg = aggregate(s["runs"], TASKS, arms, _target(), preds, [2, 2], [[9, 3], [9, 3]], n_boot=500)
    d = agg["delta"]["macro_f1"]["closed_set 90:10"]["glaze"]
    assert d["delta"] > 0.2 and 0 < d["low"] <= d["delta"] <= d["high"]
    for r in arms:
        m, lo, hi = agg["stats"]["accuracy"][r]["glaze"]
        assert 0.0 <= lo <= m <= hi <= 1.0


def test_report_gives_verdicts_and_escapes_formula_cells(tmp_path):
    store = Store(str(tmp_path))
    out = build_report(store, _summary(store))
    md = store.read_bytes(out["report"]).decode()
    assert "| closed_set 90:10 | glaze |" in md and "| better |" in md
    row = next(ln for ln in md.splitlines() if ln.startswith("| closed_set 90:10 | glaze | +"))
    assert row.endswith("| better | better |")  # macro-F1, then the rare classes' own corrected verdict
    assert "Their rare classes gained (minority-class macro-F1, corrected interval above 0): glaze (closed_set 90:10)" in md
    assert "Synthetic images helped (interval above 0): glaze (closed_set 90:10), '" + EVIL + " (closed_set 90:10)" in md
    assert "| detectable |" in md and "## Training budget" in md
    assert "**no test image**" in md
    assert f"| closed_set 90:10 | '{EVIL} |" in md and f"| {EVIL}" not in md
    assert "# porcelain report — '@evil" in md
    rows = list(csv.reader(io.StringIO(store.read_bytes(f"{out['key']}/results.csv").decode())))
    cells = [c for row in rows for c in row]
    assert not any(c[:1] in "=+@" for c in cells if c)
    assert f"'{EVIL}" in cells
    for name in ("macro_f1.png", "imbalance.png", "minority_macro_f1.png"):
        assert store.read_bytes(f"{out['key']}/{name}").startswith(b"\x89PNG")


def test_unequal_training_budgets_get_no_verdict(tmp_path):
    store = Store(str(tmp_path))
    s = _summary(store, steps=(6, 18))  # more synthetic images once meant more optimizer steps
    assert fairness(s["runs"]) and "different numbers of optimizer steps" in fairness(s["runs"])[0]
    md = store.read_bytes(build_report(store, s)["report"]).decode()
    assert "**The comparison is confounded**" in md
    table = md.split("## Does synthetic data help?")[1].split("## ")[0]
    assert "| better |" not in table and "not compared: the runs are not comparable" in table


def test_the_baseline_is_the_real_only_run_wherever_it_is_listed(tmp_path):
    store = Store(str(tmp_path))
    s = _summary(store, ratios=("90:10", "100:0"), acc=(0.9, 0.6))
    md = store.read_bytes(build_report(store, s)["report"]).decode()
    assert "against the real-only baseline (100:0)" in md
    assert "| closed_set 90:10 | glaze | +0.3" in md


def test_a_lone_uncorrected_difference_among_many_comparisons_is_not_a_verdict(tmp_path):
    """With many comparisons, one interval that excludes 0 at 95% alone is reported as a lead, not as
    'better': the verdict uses Bonferroni-corrected intervals."""
    store = Store(str(tmp_path))
    s = _summary(store, ratios=("100:0", "90:10", "80:20", "70:30", "60:40", "50:50"), acc=(0.6, 0.6, 0.6, 0.6, 0.6, 0.66),
                 steps=(50,) * 6)
    preds = {r["key"]: {t: np.asarray(v) for t, v in store.read_json(r["predictions"])["test"].items()} for r in s["runs"]}
    arms = ["100:0"] + [f"closed_set {r}" for r in ("90:10", "80:20", "70:30", "60:40", "50:50")]
    agg = aggregate(s["runs"], TASKS, arms, _target(), preds, [2, 2], [[9, 3], [9, 3]], n_boot=500)
    assert agg["n_comparisons"] == 10
    raw, fam = agg["delta"]["macro_f1"]["closed_set 50:50"]["glaze"], agg["family"]["closed_set 50:50"]["glaze"]
    assert fam["low"] < raw["low"] <= raw["high"] < fam["high"]  # the corrected interval is wider
    md = store.read_bytes(build_report(store, s)["report"]).decode()
    assert "corrected for the 10 comparisons" in md


def test_best_setting_per_kind_is_the_val_choice_with_its_test_verdict(tmp_path):
    store = Store(str(tmp_path))
    summary = _summary(store, ratios=("100:0", "90:10", "50:50"), acc=(0.6, 0.9, 0.62), steps=(50, 50, 50))
    for r in summary["runs"]:  # 50:50 is best on val, 90:10 on test
        r["best_val_macro_f1"] = {"100:0": 0.6, "90:10": 0.55, "50:50": 0.7}[r["ratio"]]
    md = build_report(store, summary)["markdown"]
    section = md.split("### Best setting per kind, chosen on val")[1].split("\n## ")[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| closed_set |")]
    assert len(rows) == 1 and "| closed_set 50:50 | 0.700 (0.600) | closed_set 90:10 0.550 |" in rows[0]
    assert "| glaze |" in rows[0] and "no clear difference" in rows[0]  # 0.62 vs 0.60: not told apart
    for r in summary["runs"]:  # every arm below real-only on val: the choice says to keep real-only
        r["best_val_macro_f1"] = {"100:0": 0.8, "90:10": 0.55, "50:50": 0.7}[r["ratio"]]
    md = build_report(store, summary)["markdown"]
    assert "| closed_set 50:50 (below real-only on val: keep real-only) | 0.700 (0.800) |" in md
    # one arm per kind: nothing to choose, no section
    single = _summary(Store(str(tmp_path / "one")))
    assert "Best setting per kind" not in build_report(Store(str(tmp_path / "one")), single)["markdown"]


def test_an_exchange_rate_the_run_cannot_pin_down_is_marked_unstable():
    import math

    from porcelain.report.build import equivalence_reading

    def res(point, lo, hi, failed=0):
        return {"synthetic_per_real": point, "interval": {"synthetic_per_real": (lo, hi)}, "n_boot": 500,
                "n_boot_failed": failed}

    assert equivalence_reading(res(1.4, 0.9, 3.9)) == "stable"
    assert equivalence_reading(res(math.inf, 2.0, math.inf)) == "stable"  # no gain, and replicates agree it is large
    assert "outside its bootstrap interval" in equivalence_reading(res(0.33, 0.5, 2.3))
    assert "fitted ceiling" in equivalence_reading(res(0.0, 4.8, 19.6))  # the digits-filters case
    assert "400 of 500" in equivalence_reading(res(1.0, 0.5, 2.0, failed=400))
    assert "outside" in equivalence_reading(res(1.0, math.nan, math.nan))


def test_the_equivalence_table_never_prints_a_ratio_that_divided_by_a_flat_curve():
    import math

    from porcelain.report.build import _cell, _equivalence_section

    flat = {"synthetic_per_real": math.inf, "marginal_synthetic_per_real": 1.3779720914845274e16,
            "real_equivalent": -9.5, "n_syn_max": 408, "interval": {"synthetic_per_real": (math.nan, math.nan)},
            "n_boot": 500, "n_boot_failed": 500, "real_curve": "power", "synthetic_curve": "power"}
    q = {"metric": "macro_f1", "real_sizes": [29, 55], "n_base": 102, "by": {"closed_set": {"digit": flat}}}
    row = next(ln for ln in _equivalence_section(q, ["digit"], _cell) if ln.startswith("| closed_set | digit"))
    assert "∞ (no gain) [n/a, n/a] | > 10⁴ (no measurable gain) | -9.5 of 408" in row
    assert "unstable: 500 of 500 bootstrap refits gave no rate" in row and "13779720914845274" not in row


def test_a_task_the_real_only_run_already_solves_has_no_room_to_gain(tmp_path):
    store = Store(str(tmp_path))
    md = build_report(store, _summary(store, acc=(1.01, 1.01)))["markdown"]  # every test image right, both arms
    row = next(ln for ln in md.splitlines() if ln.startswith("| closed_set 90:10 | glaze | +"))
    assert row.endswith("| no room to gain (real-only at 1.000) | no room to gain (real-only at 1.000) |")
    assert "no clear difference" not in row
