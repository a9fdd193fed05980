"""Stage: the run report — Markdown, plots and a CSV of results, written to the store.

The report's product is a verdict per task: did synthetic images help? It refuses to give one where
the comparison cannot carry it: a real-only baseline that did not learn the task, runs that did
not train the same number of steps, or intervals too wide for the differences that matter.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

from porcelain.config import FilterConfig, parse_ratio
from porcelain.data.ingest import load_split
from porcelain.evaluate.equivalence import scale_from_runs
from porcelain.evaluate.metrics import minority_classes
from porcelain.evaluate.stats import bootstrap_mean, paired_bootstrap, verdict
from porcelain.generate.shards import load_synthetic
from porcelain.hashing import code_version, stable_hash
from porcelain.results import ModelRef
from porcelain.synthesizers import get as get_synthesizer
from porcelain.versions import stage_identity
from porcelain.report import plots
from porcelain.report.html import render_html
from porcelain.report.csvsafe import csv_safe, write_csv
from porcelain.storage import Store
from porcelain.watch import changes_markdown, changes_since, run_digest, with_images

METRICS = ("macro_f1", "accuracy", "minority_macro_f1")
DELTA_METRICS = ("macro_f1", "minority_macro_f1")
MAX_GRID_ROWS = 24


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _ci(m: tuple[float, float, float] | list) -> str:
    mean, lo, hi = m
    if lo is None or math.isnan(lo):
        return _fmt(mean)
    return f"{_fmt(mean)} [{_fmt(lo)}, {_fmt(hi)}]"


def _dci(d: dict[str, Any]) -> str:
    return f"{d['delta']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def chance_macro_f1(target: np.ndarray, n_classes: int) -> float:
    """Macro-F1 of the best label-blind predictor: always one class, or uniformly random classes.

    Always predicting class k (share p_k of the test images) scores F1 2p_k/(1+p_k) on k and 0 on
    the other present classes; guessing uniformly among K classes scores 2p_j(1/K)/(p_j+1/K) on
    class j in expectation. The better of these is what a classifier that learned nothing reaches.
    """
    support = np.bincount(target, minlength=n_classes).astype(float)
    p = support / max(support.sum(), 1.0)
    present = support > 0
    k_present = present.sum()
    constant = max((2 * p[k] / (1 + p[k])) / (k_present + (0 if present[k] else 1)) for k in range(n_classes))
    q = 1.0 / n_classes
    uniform = float(np.mean([2 * p[j] * q / (p[j] + q) for j in range(n_classes) if present[j]]))
    return float(max(constant, uniform))


def load_predictions(store: Store, runs: list[dict[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
    """Test predictions of every run, by run key and task."""
    out = {}
    for r in runs:
        doc = store.read_json(r["predictions"])
        out[r["key"]] = {t: np.asarray(v, dtype=np.int64) for t, v in doc["test"].items()}
    return out


def arms_of(runs: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """The baseline arm (the real-only runs) and every arm in run order: ``"<ratio>"`` for the
    baseline, ``"<synthesizer> <ratio>"`` for the others."""
    arms = list(dict.fromkeys(_arm(x) for x in runs))
    base = next(_arm(x) for x in runs if x.get("synthesizer") is None and parse_ratio(x["ratio"]) == 0.0)
    return base, [base] + [a for a in arms if a != base]


def _arm(x: dict[str, Any]) -> str:
    return x.get("arm") or x["ratio"]


def aggregate(runs: list[dict[str, Any]], tasks: list[str], ratios: list[str], target: np.ndarray,
              preds: dict[str, dict[str, np.ndarray]], num_classes: list[int], train_counts: list[list[int]],
              n_boot: int = 2000) -> dict[str, Any]:
    """Per arm/task/metric the mean with a two-level bootstrap interval, and per non-baseline arm the
    paired bootstrap difference against the real-only baseline (same seeds, same test images).
    ``ratios`` are the arms (see :func:`arms_of`), the baseline first."""
    base = ratios[0]
    by = {r: sorted((x for x in runs if _arm(x) == r), key=lambda x: x["seed"]) for r in ratios}
    stats: dict[str, dict[str, dict[str, tuple]]] = {m: {r: {} for r in ratios} for m in METRICS}
    delta: dict[str, dict[str, dict[str, dict]]] = {m: {r: {} for r in ratios if r != base} for m in DELTA_METRICS}
    # Every (arm, task) pair is one comparison; at 95% each, about 5% of them would exclude 0 by
    # chance. Verdicts use Bonferroni-corrected intervals (95% for the family of comparisons).
    n_comparisons = (len(ratios) - 1) * len(tasks)
    family: dict[str, dict[str, dict]] = {r: {} for r in ratios if r != base}
    rare: dict[str, dict[str, dict]] = {r: {} for r in ratios if r != base}
    for t, task in enumerate(tasks):
        y, c = target[:, t], num_classes[t]
        minority = minority_classes(train_counts[t])
        for r in ratios:
            arm = [preds[x["key"]][task] for x in by[r]]
            for m in METRICS:
                stats[m][r][task] = bootstrap_mean(arm, y, c, m, minority=minority, n_boot=n_boot)
        base_seeds = {x["seed"]: x for x in by[base]}
        for r in ratios:
            if r == base:
                continue
            pairs = [(base_seeds[x["seed"]], x) for x in by[r] if x["seed"] in base_seeds]
            a_preds = [preds[a["key"]][task] for a, _ in pairs]
            b_preds = [preds[b["key"]][task] for _, b in pairs]
            for m in DELTA_METRICS:
                delta[m][r][task] = paired_bootstrap(a_preds, b_preds, y, c, m, minority=minority, n_boot=n_boot)
            if n_comparisons > 1:  # the verdict's interval, corrected for the number of comparisons
                family[r][task] = paired_bootstrap(a_preds, b_preds, y, c, "macro_f1", minority=minority,
                                                   n_boot=n_boot, confidence=1 - 0.05 / n_comparisons)
                # the rare classes' own verdict: a second family of the same comparisons, corrected alike
                rare[r][task] = paired_bootstrap(a_preds, b_preds, y, c, "minority_macro_f1", minority=minority,
                                                 n_boot=n_boot, confidence=1 - 0.05 / n_comparisons)
    return {"baseline": base, "stats": stats, "delta": delta, "family": family, "rare_family": rare,
            "n_comparisons": n_comparisons}


def learned(runs: list[dict[str, Any]], tasks: list[str], baseline: str, target: np.ndarray,
            num_classes: list[int], margin: float) -> dict[str, dict[str, Any]]:
    """Per task: did the real-only baseline learn it (mean test macro-F1 ≥ chance + margin)?"""
    base = [x for x in runs if _arm(x) == baseline]
    out = {}
    for t, task in enumerate(tasks):
        score = float(np.mean([x["metrics"]["per_task"][task]["macro_f1"] for x in base]))
        chance = chance_macro_f1(target[:, t], num_classes[t])
        out[task] = {"macro_f1": score, "chance": chance, "learned": score >= chance + margin}
    return out


def fairness(runs: list[dict[str, Any]]) -> list[str]:
    """Reasons the comparison is confounded (empty when every run had the same budget and selection)."""
    problems = []
    steps = {x.get("steps") for x in runs}
    if len(steps) > 1:
        problems.append(f"runs trained different numbers of optimizer steps ({sorted(s for s in steps if s is not None)})")
    if any(x.get("selected_step") is None for x in runs):
        problems.append("some runs were evaluated at their last step without model selection on val")
    return problems


def build_report(store: Store, summary: dict[str, Any]) -> dict[str, Any]:
    """Write ``reports/<key>/`` (report.md, results.csv, PNGs); return keys, the Markdown and a table."""
    key = stable_hash({"summary": summary, "stage": stage_identity("report")})
    # real-only runs on shares of the real set are learning-curve points, not arms with a verdict
    all_runs = summary["runs"]
    summary = {**summary, "runs": [x for x in all_runs if float(x.get("real_fraction", 1.0)) >= 1.0]}
    data, plan, runs, cfg = summary["data"], summary["plan"], summary["runs"], summary["config"]
    tasks = data["tasks"]
    _, ratios = arms_of(runs)  # the arms: real-only baseline, then synthesizer × ratio
    base = f"reports/{key}"
    num_classes = [len(data["classes"][t]) for t in tasks]
    _, target = load_split(store, data["data_hash"], cfg["classifier"]["image_size"], data["n_shards"], "test")
    preds = load_predictions(store, runs)
    agg = aggregate(runs, tasks, ratios, target, preds, num_classes, data["train_counts"],
                    n_boot=cfg["sweep"]["bootstrap"])
    agg["learned"] = learned(runs, tasks, agg["baseline"], target, num_classes, cfg["sweep"]["learned_margin"])
    agg["confounded"] = fairness(runs)
    agg["equivalence"] = scale_from_runs(all_runs, tasks, agg["baseline"]) if len(all_runs) > len(runs) else None
    agg["filters"] = {}
    for label, shards in (summary.get("shards") or {}).items():
        filtered = [x for x in shards if x.get("filter_key")]
        if filtered:
            from porcelain.filter.stage import filter_summary
            from porcelain.generate.targeting import decode_alloc

            agg["filters"][label] = filter_summary(store, filtered, decode_alloc(plan.get("need", [])),
                                                   data["classes"], tasks)

    figs: dict[str, bytes] = {}
    mixes = [r for r in cfg["sweep"]["ratios"] if plan["ratios"][r]["synthetic"]]
    figs["imbalance.png"] = plots.imbalance_bars(
        tasks, plan["imbalance_before"], {r: plan["ratios"][r]["imbalance"] for r in mixes})
    figs["macro_f1.png"] = plots.metric_by_ratio(tasks, ratios, agg["stats"]["macro_f1"], "macro-F1 (test, 95% CI)")
    figs["minority_macro_f1.png"] = plots.metric_by_ratio(tasks, ratios, agg["stats"]["minority_macro_f1"],
                                                         "minority-class macro-F1 (test, 95% CI)")
    for label, drift in (summary.get("drift") or {}).items():
        if drift and drift.get("audit"):
            figs[f"audit-{_slug(label)}.png"] = store.read_bytes(drift["audit"])
    for label, shards in (summary.get("shards") or {}).items():
        if shards:
            figs[f"samples-{_slug(label)}.png"] = _sample_grid(store, summary, label, cfg["generation"]["grid_per_combination"])
    for label, f in agg["filters"].items():
        panels = [(f"{step}: {series.replace('_', ' ')}", v["passed"], v["dropped"], v["thresholds"])
                  for step in f["steps"] for series, v in f["scores"].get(step, {}).items()
                  if series != "threshold" and (v["passed"] or v["dropped"])]
        if panels:
            figs[f"filter-scores-{_slug(label)}.png"] = plots.score_histograms(panels)
        if f["rejected"]:
            figs[f"rejected-{_slug(label)}.png"] = _rejected_grid(store, f["rejected"], data, cfg["classifier"]["image_size"])
    for name, blob in figs.items():
        store.write_bytes(f"{base}/{name}", blob)

    table = []
    for r in ratios:
        for t in tasks:
            arm_runs = [x for x in runs if _arm(x) == r]
            row = {"arm": r, "synthesizer": arm_runs[0].get("synthesizer") or "", "ratio": arm_runs[0]["ratio"],
                   "task": t, "seeds": len(arm_runs)}
            for m in METRICS:
                mean, lo, hi = agg["stats"][m][r][t]
                row[m] = round(mean, 4)
                row[f"{m}_ci_low"] = None if math.isnan(lo) else round(lo, 4)
                row[f"{m}_ci_high"] = None if math.isnan(hi) else round(hi, 4)
            d = agg["delta"]["macro_f1"].get(r, {}).get(t)
            row["delta_macro_f1"] = None if d is None else round(d["delta"], 4)
            row["verdict"] = "baseline" if d is None else _task_verdict(agg, r, t)
            table.append(row)
    buf = io.StringIO()
    write_csv(table, buf, fieldnames=list(table[0]))
    store.write_bytes(f"{base}/results.csv", buf.getvalue().encode())
    store.write_json(f"{base}/table.json", {"rows": table})

    md = _markdown(summary, agg, figs, key)
    if "previous" in summary:  # the flow looked up the previous run of this deployment (None: the first)
        changes = changes_since(with_images(store, summary["previous"]),
                                with_images(store, run_digest(data["data_hash"], table)))
        store.write_json(f"{base}/changes.json", changes)
        md = md.rstrip("\n") + "\n\n" + "\n".join(changes_markdown(changes))
    store.write_bytes(f"{base}/report.md", md.encode("utf-8"))
    # one file to mail or open from the store: the same report with its figures embedded
    store.write_bytes(f"{base}/report.html",
                      render_html(md, figs, f"porcelain report — {cfg['name']}").encode("utf-8"))
    return {"key": base, "report": f"{base}/report.md", "uri": store.uri(f"{base}/report.md"),
            "html": f"{base}/report.html", "markdown": md, "table": table}


def _cell(value: Any) -> str:
    """A value from user data in the report: spreadsheet formulas defused, and ``|`` escaped so that a
    label holding one keeps its table intact."""
    return csv_safe(value).replace("|", "\\|")


def _short(verdict_text: str) -> str:
    return "(not compared)" if verdict_text.startswith("not compared") else f"({verdict_text})"


CEILING = 0.999
"""A real-only test score at or above this leaves synthetic images nothing to gain on that task."""


def _task_verdict(agg: dict[str, Any], ratio: str, task: str, metric: str = "macro_f1") -> str:
    """The corrected verdict of one comparison on ``metric`` (``minority_macro_f1``: the rare classes)."""
    if agg["confounded"]:
        return "not compared: the runs are not comparable (see Training budget)"
    if not agg["learned"][task]["learned"]:
        return "not compared: classifier did not learn this task"
    family = agg.get("family" if metric == "macro_f1" else "rare_family") or {}
    v = verdict(family.get(ratio, {}).get(task) or agg["delta"][metric][ratio][task])
    base = agg["stats"][metric][agg["baseline"]][task][0]
    if v == "no clear difference" and base >= CEILING:  # nothing left to gain; a loss would still show
        return f"no room to gain (real-only at {base:.3f})"
    return v


def _uncorrected(agg: dict[str, Any], ratio: str, task: str) -> str | None:
    """'better'/'worse' at 95% for this comparison alone where the corrected verdict says otherwise."""
    raw = verdict(agg["delta"]["macro_f1"][ratio][task])
    if raw in ("better", "worse") and _task_verdict(agg, ratio, task) != raw \
            and not _task_verdict(agg, ratio, task).startswith("not compared"):
        return raw
    return None


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label)


def _sample_grid(store: Store, summary: dict[str, Any], label: str, per_side: int) -> bytes:
    data, gen_tasks = summary["data"], summary["data"]["tasks"]
    classes = data["classes"]
    size = summary["config"]["classifier"]["image_size"]
    real_x, real_y = load_split(store, data["data_hash"], size, data["n_shards"], "train")
    have_n: dict[tuple, int] = {}
    shards = summary["shards"][label]
    for s in shards:
        n = s["n"] if s.get("kept") is None else len(s["kept"])
        have_n[tuple(s["combo"])] = have_n.get(tuple(s["combo"]), 0) + n
    # the combinations that received the most synthetic images (the rarest ones), at most MAX_GRID_ROWS
    combos = sorted(sorted((c for c in have_n if have_n[c]), key=lambda c: -have_n[c])[:MAX_GRID_ROWS])
    rows = []
    for combo in combos:
        syn_x, _ = load_synthetic(store, [s for s in shards if tuple(s["combo"]) == combo],
                                  {combo: min(per_side, have_n[combo])}, size)
        real = real_x[np.all(real_y == np.asarray(combo), axis=1)][:per_side]
        label = " / ".join(classes[t][v] for t, v in zip(gen_tasks, combo))
        rows.append((label, list(real), list(syn_x)))
    return plots.sample_grid(rows, per_side)


def _rejected_grid(store: Store, rejected: list[dict[str, Any]], data: dict[str, Any], size: int) -> bytes:
    """The rejected images, each captioned with its combination, the step that dropped it and why."""
    import textwrap

    from porcelain.data.images import decode_image, to_array

    items = []
    for r in rejected:
        combo = "/".join(str(data["classes"][t][v]) for t, v in zip(data["tasks"], r["combo"]))
        why = textwrap.fill(textwrap.shorten(r["reason"] or "-", 72, placeholder="…"), 26)
        combo = combo if len(combo) <= 26 else combo[:25] + "…"
        items.append((to_array(decode_image(store.read_bytes(r["image"])), size), f"{combo}\n{r['filter']}\n{why}"))
    return plots.image_grid(items)


def _markdown(summary: dict[str, Any], agg: dict[str, Any], figs: dict[str, bytes], key: str) -> str:
    data, plan, runs = summary["data"], summary["plan"], summary["runs"]
    faiths, cfg = summary.get("faithfulness") or {}, summary["config"]
    tasks, base = data["tasks"], agg["baseline"]
    _, ratios = arms_of(runs)
    others = [r for r in ratios if r != base]
    mixes = [r for r in cfg["sweep"]["ratios"] if parse_ratio(r) > 0]
    e = _cell  # every value that came from user data is escaped
    L: list[str] = [f"# porcelain report — {e(cfg['name'])}", ""]

    # First lines: what a reader must know before any number.
    warn = []
    for problem in agg["confounded"]:
        warn.append(f"**The comparison is confounded**: {problem}. No verdict is drawn.")
    for t in tasks:
        lt = agg["learned"][t]
        if not lt["learned"]:
            steps = sorted({x.get("steps") for x in runs if _arm(x) == base})
            warn.append(f"**Classifier did not learn `{e(t)}`**: real-only test macro-F1 {lt['macro_f1']:.3f} against "
                        f"{lt['chance']:.3f} for a label-blind guess (margin {cfg['sweep']['learned_margin']}), after "
                        f"{steps} optimizer steps. No verdict for this task: raise `classifier.steps`, try another "
                        "`classifier.model`, or check the labels.")
    def where(v: str, metric: str = "macro_f1") -> list[str]:
        return [f"{e(t)} ({', '.join(r for r in others if _task_verdict(agg, r, t, metric) == v)})" for t in tasks
                if any(_task_verdict(agg, r, t, metric) == v for r in others)]

    worse, better = where("worse"), where("better")
    if worse:
        warn.append(f"**Synthetic images made these tasks worse** (interval below 0): {', '.join(worse)}.")
    if better:
        warn.append(f"Synthetic images helped (interval above 0): {', '.join(better)}.")
    rare_worse, rare_better = where("worse", "minority_macro_f1"), where("better", "minority_macro_f1")
    if rare_worse:
        warn.append(f"**Their rare classes got worse** (minority-class macro-F1, corrected interval below 0): "
                    f"{', '.join(rare_worse)}.")
    if rare_better:
        warn.append(f"Their rare classes gained (minority-class macro-F1, corrected interval above 0): "
                    f"{', '.join(rare_better)}.")
    loose = [f"{e(t)} ({r}: {_uncorrected(agg, r, t)})" for r in others for t in tasks if _uncorrected(agg, r, t)]
    if loose:
        warn.append(f"Looked better or worse at 95% taken alone, but not after correcting for the "
                    f"{agg['n_comparisons']} comparisons of this run (Bonferroni; by chance about "
                    f"{0.05 * agg['n_comparisons']:.1f} of them would): {', '.join(loose)}. Treat these as leads to "
                    "rerun with more seeds or test images, not as findings.")
    unjudged = sorted({t for faith in faiths.values() for t, f in (faith.get("faithfulness") or {}).items()
                       if "not_measurable" in f})
    for t in unjudged:
        why = next(f["faithfulness"][t]["not_measurable"] for f in faiths.values() if t in f.get("faithfulness", {}))
        warn.append(f"Label faithfulness of `{e(t)}` is **not measurable**: {why}.")
    if not worse and not better and not agg["confounded"]:
        warn.append("No synthesizer or ratio changed any task's macro-F1 by more than this run can tell apart from "
                    "noise (see the smallest detectable difference per task).")
    L += ["## Verdict", ""] + [f"- {w}" for w in warn] + [""]
    if others:
        L += ["## Which method helps which task", "",
              f"Δ test macro-F1 against the real-only baseline ({e(base)}) [95% paired bootstrap interval], and the "
              "verdict, per synthesizer and ratio.", "",
              "| task | " + " | ".join(e(r) for r in others) + " |", "|---|" + "---|" * len(others)]
        for t in tasks:
            L.append(f"| {e(t)} | " + " | ".join(
                f"{_dci(agg['delta']['macro_f1'][r][t])} {_short(_task_verdict(agg, r, t))}" for r in others) + " |")
        L += [""]
        L += _best_on_val_section(summary, agg, tasks, e)

    L += ["## Does synthetic data help?", "",
          f"Difference of test macro-F1 against the real-only baseline ({e(base)}), mean over seeds, with a 95% "
          f"paired bootstrap interval ({cfg['sweep']['bootstrap']} replicates resampling seeds and test images; the "
          "same images for both arms). *Detectable* is the smallest true difference this run would detect with "
          "80% power: a difference smaller than that can hide in 'no clear difference'. The verdict uses the "
          f"interval corrected for the {agg['n_comparisons']} comparisons (Bonferroni, "
          f"{1 - 0.05 / max(1, agg['n_comparisons']):.2%} each), so that the run as a whole errs at most 5% of the time.", "",
          "| synthesizer and ratio | task | Δ macro-F1 | Δ minority macro-F1 | detectable | verdict | rare classes |",
          "|---|---|---|---|---|---|---|"]
    for r in others:
        for t in tasks:
            d, dm = agg["delta"]["macro_f1"][r][t], agg["delta"]["minority_macro_f1"][r][t]
            L.append(f"| {r} | {e(t)} | {_dci(d)} | {_dci(dm)} | ±{_fmt(d['mde'])} | {_task_verdict(agg, r, t)} | "
                     f"{_task_verdict(agg, r, t, 'minority_macro_f1')} |")
    L += ["", "*Rare classes*: the same verdict on minority-class macro-F1 (the classes at or below the median "
          "train count), its interval corrected alike for the run's comparisons; a second family of tests, read "
          "beside the first, not instead of it.", ""]

    L += ["## Training budget", "",
          "Every run trains the same number of optimizer steps whatever its ratio, with class weights from the "
          "real train counts, and keeps the checkpoint with the best mean macro-F1 on the real val split "
          "(never synthetic images).", "",
          "| arm | seed | real | synthetic | steps | selected step | val macro-F1 | model | s |",
          "|---|---|---|---|---|---|---|---|---|"]
    for x in sorted(runs, key=lambda x: (ratios.index(_arm(x)), x["seed"])):
        L.append(f"| {e(_arm(x))} | {x['seed']} | {x['n_real']} | {x['n_synthetic']} | {x.get('steps')} | "
                 f"{x.get('selected_step')} | {_fmt(x.get('best_val_macro_f1'))} | `{e(x.get('model', '?'))}` | {x['seconds']} |")
    if runs and runs[0].get("model_reason"):
        L += ["", f"Classifier: {e(runs[0]['model_reason'])}"]
    L += [""]

    L += ["## Data", "",
          f"- dataset hash `{data['data_hash']}`; tasks: {', '.join(e(t) for t in tasks)}",
          f"- images: train {data['counts']['train']}, val {data['counts']['val']}, test {data['counts']['test']}",
          f"- set aside in quarantine: {data['n_quarantined']}"
          + (f" ({', '.join(f'{e(k)}: {v}' for k, v in sorted(data['quarantine_reasons'].items()))};"
             f" see `{data['quarantine_key']}`)" if data["n_quarantined"] else "")]
    if data.get("n_near_duplicates"):
        L.append(f"- **{data['n_near_duplicates']} near-duplicate image pairs span different splits** (perceptual "
                 f"hash; kept, listed in `{data['quarantine_key']}`): a test image that nearly repeats a train "
                 "image flatters every score")
    L += [f"- {e(w)}" for w in data.get("warnings", [])]
    missing = plan.get("targeted_without_test") or []
    if missing:
        names = ["/".join(e(data["classes"][t][v]) for t, v in zip(tasks, c)) for c in missing[:12]]
        L.append(f"- {len(missing)} of the targeted label combinations have **no test image**, so gains on them "
                 f"cannot be measured: {', '.join(names)}{' …' if len(missing) > 12 else ''}")
    L += [""]
    L += ["## Imbalance ratio (most / least common class, train)", "",
          "| task | real only | " + " | ".join(f"with {r}" for r in mixes) + " |",
          "|---|---|" + "---|" * len(mixes)]
    for t in tasks:
        L.append(f"| {e(t)} | {plan['imbalance_before'][t]:.1f}:1 | "
                 + " | ".join(f"{plan['ratios'][r]['imbalance'][t]:.1f}:1" for r in mixes) + " |")
    L += ["", "Synthetic images per ratio (the same for every synthesizer): "
          + ", ".join(f"{r} → {plan['ratios'][r]['synthetic']}" for r in cfg["sweep"]["ratios"])
          + f" (real train images: {plan['real_train']}); rarest combinations first.", ""]
    entries = {(c.get("name") or c["kind"]): c for c in cfg.get("synthesizers", [])}
    for label, model in (summary.get("models") or {}).items():
        syn_cfg = get_synthesizer(entries[label]["kind"]).config.model_validate(entries[label])
        ref = ModelRef.model_validate(model)
        L += [f"## Synthesizer `{e(label)}` (kind `{e(ref.kind)}`)", ""]
        L += get_synthesizer(ref.kind).describe(ref, syn_cfg) + [""]
        own = entries[label].get("filters")  # its own chain, else the run's
        fcfg = FilterConfig.model_validate(own).model_dump(mode="json") if own else cfg.get("filters") or {}
        if label in agg.get("filters", {}):
            L += _filter_section(agg["filters"][label], fcfg, label, figs, e)
        drift = (summary.get("drift") or {}).get(label)
        if drift:
            L += _drift_section(drift, label, e)
        faith = faiths.get(label) or {}
        if faith.get("n_images"):
            L += _faithfulness_section(faith, tasks, e)
        if faith.get("texture"):
            L += _texture_section(faith["texture"], fcfg.get("texture_tasks") or tasks, e)
    if summary.get("adaptive"):
        L += _adaptive_section(summary["adaptive"], tasks, e)
    if agg.get("equivalence"):
        L += _equivalence_section(agg["equivalence"], tasks, e)
    L += ["## Results on the real test split", "", "Mean over seeds [95% bootstrap interval].", "",
          "| ratio | task | accuracy | macro-F1 | minority macro-F1 |", "|---|---|---|---|---|"]
    for r in ratios:
        for t in tasks:
            L.append(f"| {e(r)} | {e(t)} | {_ci(agg['stats']['accuracy'][r][t])} | {_ci(agg['stats']['macro_f1'][r][t])}"
                     f" | {_ci(agg['stats']['minority_macro_f1'][r][t])} |")
    L += ["", "### F1 per class, with its test support", "",
          "Mean over seeds. A class with few test images has a noisy F1.", ""]
    for t in tasks:
        first = next(x for x in runs if _arm(x) == base)["metrics"]["per_task"][t]
        L += [f"**{e(t)}**", "", "| class | train | test | " + " | ".join(ratios) + " |",
              "|---|---|---|" + "---|" * len(ratios)]
        for k, name in enumerate(data["classes"][t]):
            cells = []
            for r in ratios:
                vals = [x["metrics"]["per_task"][t]["per_class_f1"][k] for x in runs if _arm(x) == r]
                cells.append(_fmt(float(np.mean(vals))) if vals else "n/a")
            L.append(f"| {e(name)} | {first['train_counts'][k]} | {first['support'][k]} | " + " | ".join(cells) + " |")
        L.append("")
    L += ["## Figures", ""]
    L += [f"![{name}]({name})" for name in figs]
    L += ["", "## Provenance", "",
          f"- code version `{code_version()}`; report `{key}`; seeds {cfg['sweep']['seeds']}",
          f"- classifier `{e(cfg['classifier']['model'])}` at {cfg['classifier']['image_size']} px, "
          f"{sorted({x.get('steps') for x in runs})} steps, batch {cfg['classifier']['batch_size']}, "
          f"effective-number β={cfg['classifier']['beta']} from real counts, weighted sampler "
          f"{'on' if cfg['classifier']['use_sampler'] else 'off'}, weighted loss "
          f"{'on' if cfg['classifier']['class_weighted_loss'] else 'off'}", ""]
    return "\n".join(L)


MAX_COMBO_ROWS = 10
MAX_TEXTURE_CLASSES = 6


def _rate(rp: list[int] | dict[str, int] | None) -> str:
    """``passed/reached`` as a share, or "–" where no image reached the step."""
    if rp is None:
        return "–"
    r, p = (rp["reached"], rp["passed"]) if isinstance(rp, dict) else rp
    return f"{p / r:.0%} ({p}/{r})" if r else "–"


def _filter_section(f: dict[str, Any], fcfg: dict[str, Any], label: str, figs: dict[str, bytes], e) -> list[str]:
    keys = ("faithfulness", "memorisation", "texture", "clip_score")
    on = ", ".join(f"{k} {v}" for k, v in fcfg.items() if k in keys and v is not None)
    apk = "n/a" if f["attempts_per_kept"] is None else f"{f['attempts_per_kept']:.2f}"
    steps = f.get("steps") or []
    L = ["### Filters", "",
         f"Chain: {on}. Made {f['made']} images, kept {f['kept']} ({apk} made per kept image); dropped by "
         + (", ".join(f"{k or '?'}: {v}" for k, v in sorted(f["dropped_by"].items())) or "none") + ".", ""]
    if f["short"]:
        L.append(f"- **{len(f['short'])} combinations stayed short of their planned count** after top-up (at most "
                 f"{fcfg.get('max_attempts')} × planned made): their ratios hold fewer synthetic images than planned.")
    if steps:
        L += ["", "Pass rate per step (passed / images that reached it; each step sees only the survivors of the "
              "ones before): " + ", ".join(f"{e(s)} {_rate(f['by_step'][s])}" for s in steps) + "."]
    L += ["", "| task value | made | kept | pass rate | " + " | ".join(e(s) for s in steps) + " |",
          "|---|---|---|---|" + "---|" * len(steps)]
    for k, v in f["by_value"].items():
        L.append(f"| {e(k)} | {v['made']} | {v['kept']} | {v['kept'] / v['made']:.0%} | "
                 + " | ".join(_rate(f["by_step_value"].get(s, {}).get(k)) for s in steps) + " |")
    combos = sorted(f.get("by_combo") or [], key=lambda c: (c["kept"] / c["made"] if c["made"] else 1.0, c["name"]))
    if combos:
        L += ["", f"Combinations, lowest pass rate first ({min(len(combos), MAX_COMBO_ROWS)} of {len(combos)}):", "",
              "| combination | made | kept | " + " | ".join(e(s) for s in steps) + " |",
              "|---|---|---|" + "---|" * len(steps)]
        for c in combos[:MAX_COMBO_ROWS]:
            L.append(f"| {e(c['name'])} | {c['made']} | {c['kept']} | "
                     + " | ".join(_rate(c["steps"].get(s)) for s in steps) + " |")
    hist, grid = f"filter-scores-{_slug(label)}.png", f"rejected-{_slug(label)}.png"
    if hist in figs:
        L += ["", f"Scores of the images each step judged, passed and dropped (dashed: its threshold): `{hist}`"]
    if grid in figs:
        L += ["", f"{len(f['rejected'])} rejected images, taken in turn from each step, each captioned with its "
              f"combination, the step that dropped it and why: `{grid}`"]
    if f.get("rejected"):
        L += ["", "Rejected, with the reason: " + "; ".join(f"{e(x['filter'])}: {e(x['reason'])}"
                                                        for x in f["rejected"][:4])]
    return L + [""]


def _texture_section(tex: dict[str, Any], tasks: list[str], e) -> list[str]:
    """GLCM texture of the generated images against real test images: per task all classes pooled,
    then the classes whose distributions differ most (largest KS statistic)."""
    L = ["#### Texture (GLCM) against real test images", "",
         f"Grey-level co-occurrence ({tex['levels']} grey levels, 1-pixel offsets, at the reference's image size) "
         f"of {tex['n_synthetic']} generated and {tex['n_real']} real test images: mean contrast and homogeneity, and "
         "the two-sample KS statistic (0: same distribution, 1: disjoint). Generated images smoother or noisier than "
         "real ones show up here before they show up in a classifier.", "",
         "| task | class | n gen / real | contrast gen / real | KS | homogeneity gen / real | KS |",
         "|---|---|---|---|---|---|---|"]

    def num(x: Any, d: int = 3) -> str:
        return "n/a" if x is None else f"{x:.{d}f}"

    def row(task: str, name: str, st: dict[str, dict[str, Any]]) -> str:
        c, h = st["contrast"], st["homogeneity"]
        return (f"| {e(task)} | {e(name)} | {c['n_synthetic']} / {c['n_real']} | {num(c['synthetic_mean'])} / "
                f"{num(c['real_mean'])} | {num(c['ks'], 2)} | {num(h['synthetic_mean'])} / {num(h['real_mean'])} | "
                f"{num(h['ks'], 2)} |")

    pooled_done = False
    for t in tasks:
        by: dict[str, dict[str, dict[str, Any]]] = {}
        for r in tex["tasks"].get(t) or []:
            by.setdefault(str(r["class"]), {})[r["statistic"]] = r
        pooled = by.pop("(all)", None)
        if pooled and not pooled_done:  # every class of every task: the same images, shown once
            L.append(row("all", "all images", pooled))
            pooled_done = True
        # the classes whose generated images differ most from real ones (largest KS) first
        shown = sorted((c for c in by.items() if any(r["n_synthetic"] for r in c[1].values())),
                       key=lambda c: (-max((r["ks"] or 0.0) for r in c[1].values()), c[0]))
        L += [row(t, name, st) for name, st in shown[:MAX_TEXTURE_CLASSES]]
        if len(shown) > MAX_TEXTURE_CLASSES:
            L.append(f"| {e(t)} | … {len(shown) - MAX_TEXTURE_CLASSES} more classes with generated images (smaller KS) "
                     "| | | | | |")
    return L + [""]


def _drift_section(drift: dict[str, Any], label: str, e) -> list[str]:
    tasks = drift["tasks"]
    L = ["### Semantic drift by strength", "",
         f"On {drift['n_images']} real train images: the share whose label the reference classifier no longer sees "
         "as the source's, per task, and the RMS pixel distance to the source (0–255). Pick the largest strength "
         f"whose drift you accept; this run uses S = {drift['strength']}.", "",
         "| S | " + " | ".join(f"drift `{e(t)}`" for t in tasks) + " | median distance |",
         "|---|" + "---|" * (len(tasks) + 1)]
    for r in drift["rows"]:
        L.append(f"| {r['strength']:g} | " + " | ".join(f"{r['drift'][t]:.1%}" for t in tasks)
                 + f" | {r['distance_median']:.1f} |")
    L += ["", f"Audit grid ({', '.join(drift['audit_columns'])}): `audit-{_slug(label)}.png`", ""]
    return L


def _faithfulness_section(faith: dict[str, Any], tasks: list[str], e) -> list[str]:
    ref = faith["reference"]
    L = ["### Label faithfulness", "",
         f"The reference classifier (`{e(ref['architecture'])}`, trained on real {ref['trained_on']} images only, "
         f"selected at step {ref['selected_step']}) classifies the {faith['n_images']} generated images"
         f"{' its filters kept (those the sweep trains on)' if faith.get('kept_only') else ''}; "
         "faithfulness is the share assigned to the value they were generated for [95% Wilson interval]. "
         f"It counts only where the reference itself is accurate: balanced accuracy on real test images at "
         f"least {ref['floor']:.0%}. Target: {faith['threshold']:.0%}.", "",
         "| task | faithfulness | reference balanced accuracy (real test) | status |", "|---|---|---|---|"]
    for t in tasks:
        f, j = faith["faithfulness"][t], faith["judge"][t]
        if "not_measurable" in f:
            L.append(f"| {e(t)} | not measurable | {j['balanced_accuracy']:.1%} | reference cannot judge this task |")
        else:
            ok = "meets target" if faith["meets_target"][t] else "below target"
            L.append(f"| {e(t)} | {f['share']:.1%} [{f['low']:.1%}, {f['high']:.1%}] | {j['balanced_accuracy']:.1%} | {ok} |")
    passed = faith.get("passed")
    L += ["", "All tasks at or above target: **" + ("not measurable for every task" if passed is None
                                                   else "yes" if passed else "no") + "**", ""]
    if faith.get("by_rarity"):
        L += ["By how many real train images the generated image's attribute combination had "
              "(the generator learns rare combinations least well):", "",
              "| combination had | images | " + " | ".join(e(t) for t in tasks) + " |",
              "|---|---|" + "---|" * len(tasks)]
        for name, row in faith["by_rarity"].items():
            L.append(f"| {name} | {row['n']} | " + " | ".join(
                "n/m" if "not_measurable" in faith["faithfulness"][t] else f"{row['faithfulness'][t]['share']:.1%}"
                for t in tasks) + " |")
        L.append("")
    mem = faith.get("memorisation")
    if mem:
        L += ["#### Memorisation", "",
              f"Median distance to the nearest real train image (RMS pixel difference, 0–1): generated "
              f"{mem['generated_median']:.3f}, real test images {mem['test_median']:.3f} (ratio {mem['ratio']:.2f}; "
              "well below 1 means the generator reproduces its training images). "
              f"{mem['near_copy_share']:.1%} of generated images are closer to a train image than 99% of real test "
              f"images are (distance < {mem['copy_threshold']:.3f}).", ""]
    q = faith.get("set_quality")
    if q:
        L += _set_quality_section(q, tasks, e)
    return L


def _best_on_val_section(summary: dict[str, Any], agg: dict[str, Any], tasks: list[str], e) -> list[str]:
    """Per kind with more than one arm: the arm best on val, and its test result as in the table above."""
    from porcelain.evaluate.selection import best_on_val

    kinds = {s.get("name") or s["kind"]: s["kind"] for s in summary["config"].get("synthesizers") or []}
    best = {k: b for k, b in best_on_val(summary["runs"], kinds, agg["baseline"]).items() if len(b["candidates"]) > 1}
    if not best:
        return []
    L = ["### Best setting per kind, chosen on val", "",
         "Each kind's arm (setting × ratio) with the best mean val macro-F1 over seeds: what to keep. It is chosen "
         "on the real val split, so its test difference below is the one in the table above, with the same "
         "corrected verdict (picking the best arm on test would report the luckiest draw).", "",
         "| kind | chosen on val | val macro-F1 (real-only) | other arms on val | task | Δ test macro-F1 | verdict |",
         "|---|---|---|---|---|---|---|"]
    for kind, b in best.items():
        arm = b["arm"]
        base = "n/a" if b["baseline_val_macro_f1"] is None else f"{b['baseline_val_macro_f1']:.3f}"
        rest = ", ".join(f"{e(a)} {v:.3f}" for a, v in b["candidates"].items() if a != arm)
        behind = b["baseline_val_macro_f1"] is not None and b["val_macro_f1"] < b["baseline_val_macro_f1"]
        chosen = f"{e(arm)}{' (below real-only on val: keep real-only)' if behind else ''}"
        for i, t in enumerate(tasks):
            head = (f"| {e(kind)} | {chosen} | {b['val_macro_f1']:.3f} ({base}) | {rest} " if i == 0 else "| | | | ")
            d = agg["delta"]["macro_f1"].get(arm, {}).get(t)
            L.append(head + f"| {e(t)} | {'n/a' if d is None else _dci(d)} | "
                     f"{'n/a' if d is None else _task_verdict(agg, arm, t)} |")
    return L + [""]


def _adaptive_section(adaptive: dict[str, Any], tasks: list[str], e) -> list[str]:
    L = ["## Adaptive per-task weights of the synthetic images", "",
         "For each synthesizer, its best ratio on the real val split, retrained with a weight on the synthetic "
         "images' loss per task head, each weight from that ratio's val difference to real-only (paired bootstrap "
         "over seeds and val images): 0 where synthetic data hurts on val, 0.5 where it may, 1 where it may help, "
         "2 where it clearly helps. Chosen on val only; its test result is the arm `<synthesizer> adaptive` in the "
         "tables above, beside every fixed ratio.", "",
         "| synthesizer | ratio (best on val) | task | val Δ macro-F1 [95%] | weight | why |", "|---|---|---|---|---|---|"]
    for label, c in adaptive.items():
        for t in tasks:
            d = c["val_deltas"][t]
            L.append(f"| {e(label)} | {e(c['ratio'])} | {e(t)} | {d['delta']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] | "
                     f"{c['weights'][t]:g} | {e(c['reasons'][t])} |")
    L.append("")
    return L


def _equivalence_section(q: dict[str, Any], tasks: list[str], e) -> list[str]:
    def rate(v: float) -> str:
        if v > 1e4 and not math.isinf(v):  # a flat synthetic curve divides by ~0: no measurable gain
            return "> 10⁴ (no measurable gain)"
        return "∞ (no gain)" if math.isinf(v) else "n/a" if math.isnan(v) else f"{v:.2f}"

    L = ["## How many synthetic images are worth one real image", "",
         f"Learning curves of test {q['metric'].replace('_', '-')}: real-only on {q.get('real_sizes')} and "
         f"{q.get('n_base')} real images, and each synthesizer's arms on all {q.get('n_base')} real images "
         "(every run the same optimizer steps). Both are fitted with a saturating power law (log-linear when "
         "that fails) and compared (after arXiv 2508.09550). Intervals: bootstrap over seeds, coarse with few seeds.",
         ""]
    if q.get("skipped"):
        return L + [f"Not measured: {e(q['skipped'])}.", ""]
    L += ["| synthesizer | task | synthetic per real (measured range) [95%] | at the base | real images gained by "
          "the largest arm | fits | reading |", "|---|---|---|---|---|---|---|"]
    for syn, by_task in q["by"].items():
        for t in tasks:
            r = by_task.get(t) or {"skipped": "no runs"}
            if "skipped" in r:
                L.append(f"| {e(syn)} | {e(t)} | not measured: {e(r['skipped'])} | | | | |")
                continue
            lo, hi = r["interval"]["synthetic_per_real"]
            gained = "beyond the real curve" if math.isinf(r["real_equivalent"]) else f"{r['real_equivalent']:+.1f}"
            L.append(f"| {e(syn)} | {e(t)} | {rate(r['synthetic_per_real'])} [{rate(lo)}, {rate(hi)}] | "
                     f"{rate(r['marginal_synthetic_per_real'])} | {gained} of {r['n_syn_max']} "
                     f"synthetic | {r['real_curve']}/{r['synthetic_curve']} | {equivalence_reading(r)} |")
    L += ["", "∞: the synthetic images did not raise the score beyond the real base; a rate of 0 means they reached "
          "a score above the fitted real curve's ceiling, where no number of real images compares. *Unstable* marks "
          "a rate this run cannot pin down: its point estimate lies outside its own bootstrap interval, or most "
          "bootstrap refits failed; read it as not measured, and add seeds or real-fraction sizes.", ""]
    return L


def equivalence_reading(r: dict[str, Any]) -> str:
    """How far an exchange rate can be trusted: 'unstable' (and why) or 'stable'."""
    point = r["synthetic_per_real"]
    lo, hi = r["interval"]["synthetic_per_real"]
    failed, n = r.get("n_boot_failed", 0), r.get("n_boot", 0)
    if n and failed > n / 2:
        return f"unstable: {failed} of {n} bootstrap refits gave no rate"
    if point == 0.0:
        return "unstable: above the real curve's fitted ceiling (no rate)"
    if not lo <= point <= hi:  # (False with a NaN bound too)
        return "unstable: the point lies outside its bootstrap interval"
    return "stable"


def _set_quality_section(q: dict[str, Any], tasks: list[str], e) -> list[str]:
    def cell(d: dict[str, Any]) -> str:
        if d.get("fid") is None:
            return f"n/a (n={d['n_synthetic']})"
        return f"{d['fid']:.2f} / {1e3 * d['kid_mean']:.2f} (n={d['n_synthetic']})"

    syn, floor = q["synthetic"], q["floor"]
    L = ["#### Set-level distance (FID / KID×10³)", "",
         f"Generated images against real test images in the feature space of the {e(q['extractor'])}; numbers "
         "from another extractor (e.g. Inception) are not comparable with these. The floor is two real splits "
         f"({q['floor_pair']}) at their own sizes: a generator as good as real data scores near it, not near 0.", "",
         "| set | generated vs test | floor (real vs real) |", "|---|---|---|",
         f"| all | {cell(syn['overall'])} | {cell(floor['overall'])} |"]
    for t in tasks:
        for v, d in syn["per_value"].get(t, {}).items():
            f = floor["per_value"].get(t, {}).get(v)
            L.append(f"| {e(t)} = {e(v)} | {cell(d)} | {cell(f) if f else 'n/a'} |")
    L.append("")
    return L
