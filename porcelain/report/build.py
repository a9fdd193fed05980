"""Stage: the run report — Markdown, plots and a CSV of results, written to the store."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

from porcelain.data.ingest import load_split
from porcelain.evaluate.stats import mean_ci, paired_delta_ci
from porcelain.generate.shards import load_synthetic
from porcelain.hashing import code_version, stable_hash
from porcelain.report import plots
from porcelain.report.csvsafe import csv_safe, write_csv
from porcelain.storage import Store

METRICS = ("macro_f1", "accuracy", "minority_macro_f1")
MAX_GRID_ROWS = 24


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _ci(m: tuple[float, float, float]) -> str:
    mean, lo, hi = m
    if math.isnan(lo):
        return _fmt(mean)
    return f"{_fmt(mean)} [{_fmt(lo)}, {_fmt(hi)}]"


def aggregate(runs: list[dict[str, Any]], tasks: list[str], ratios: list[str]) -> dict[str, Any]:
    """Mean and 95% CI over seeds per ratio/task/metric, and the paired delta against the first ratio."""
    by = {r: sorted((x for x in runs if x["ratio"] == r), key=lambda x: x["seed"]) for r in ratios}
    stats: dict[str, dict[str, dict[str, tuple]]] = {m: {r: {} for r in ratios} for m in METRICS}
    delta: dict[str, dict[str, dict[str, tuple]]] = {m: {r: {} for r in ratios[1:]} for m in METRICS}
    base = ratios[0]
    for m in METRICS:
        for r in ratios:
            for t in tasks:
                stats[m][r][t] = mean_ci([x["metrics"]["per_task"][t][m] for x in by[r]])
        for r in ratios[1:]:
            seeds = sorted({x["seed"] for x in by[r]} & {x["seed"] for x in by[base]})
            for t in tasks:
                a = [next(x for x in by[base] if x["seed"] == s)["metrics"]["per_task"][t][m] for s in seeds]
                b = [next(x for x in by[r] if x["seed"] == s)["metrics"]["per_task"][t][m] for s in seeds]
                delta[m][r][t] = paired_delta_ci(b, a)  # ratio minus baseline
    return {"stats": stats, "delta": delta}


def _verdict(d: tuple[float, float, float]) -> str:
    mean, lo, hi = d
    if math.isnan(lo):
        return "one seed: no interval"
    if lo > 0:
        return "better (CI above 0)"
    if hi < 0:
        return "worse (CI below 0)"
    return "no clear difference (CI spans 0)"


def build_report(store: Store, summary: dict[str, Any]) -> dict[str, Any]:
    """Write ``reports/<key>/`` (report.md, results.csv, PNGs); return keys, the Markdown and a table."""
    data, plan, runs, cfg = summary["data"], summary["plan"], summary["runs"], summary["config"]
    tasks, ratios = data["tasks"], list(cfg["sweep"]["ratios"])
    key = stable_hash({"summary": summary, "code": code_version()})
    base = f"reports/{key}"
    agg = aggregate(runs, tasks, ratios)

    # Figures.
    figs: dict[str, bytes] = {}
    figs["imbalance.png"] = plots.imbalance_bars(
        tasks, plan["imbalance_before"], {r: plan["ratios"][r]["imbalance"] for r in ratios if plan["ratios"][r]["synthetic"]})
    figs["macro_f1.png"] = plots.metric_by_ratio(tasks, ratios, agg["stats"]["macro_f1"], "macro-F1 (test, 95% CI)")
    figs["minority_macro_f1.png"] = plots.metric_by_ratio(tasks, ratios, agg["stats"]["minority_macro_f1"],
                                                         "minority-class macro-F1 (test, 95% CI)")
    if summary.get("shards"):
        figs["samples.png"] = _sample_grid(store, summary, cfg["generation"]["grid_per_combination"])
    for name, blob in figs.items():
        store.write_bytes(f"{base}/{name}", blob)

    # Results table (one row per ratio × task).
    table = []
    for r in ratios:
        for t in tasks:
            row = {"ratio": r, "task": t, "seeds": len([x for x in runs if x["ratio"] == r])}
            for m in METRICS:
                mean, lo, hi = agg["stats"][m][r][t]
                row[m] = round(mean, 4)
                row[f"{m}_ci_low"] = None if math.isnan(lo) else round(lo, 4)
                row[f"{m}_ci_high"] = None if math.isnan(hi) else round(hi, 4)
            table.append(row)
    buf = io.StringIO()
    write_csv(table, buf, fieldnames=list(table[0]))
    store.write_bytes(f"{base}/results.csv", buf.getvalue().encode())

    md = _markdown(summary, agg, figs, key)
    store.write_bytes(f"{base}/report.md", md.encode("utf-8"))
    return {"key": base, "report": f"{base}/report.md", "uri": store.uri(f"{base}/report.md"),
            "markdown": md, "table": table}


def _sample_grid(store: Store, summary: dict[str, Any], per_side: int) -> bytes:
    data, gen_tasks = summary["data"], summary["data"]["tasks"]
    classes = data["classes"]
    size = summary["config"]["generator"]["resolution"]
    real_x, real_y = load_split(store, data["data_hash"], size, data["n_shards"], "train")
    have_n: dict[tuple, int] = {}
    for s in summary["shards"]:
        have_n[tuple(s["combo"])] = have_n.get(tuple(s["combo"]), 0) + s["n"]
    # the combinations that received the most synthetic images (the rarest ones), at most MAX_GRID_ROWS
    combos = sorted(sorted(have_n, key=lambda c: -have_n[c])[:MAX_GRID_ROWS])
    rows = []
    for combo in combos:
        syn_x, _ = load_synthetic(store, [s for s in summary["shards"] if tuple(s["combo"]) == combo],
                                  {combo: min(per_side, have_n[combo])}, size)
        real = real_x[np.all(real_y == np.asarray(combo), axis=1)][:per_side]
        label = " / ".join(classes[t][v] for t, v in zip(gen_tasks, combo))
        rows.append((label, list(real), list(syn_x)))
    return plots.sample_grid(rows, per_side)


def _markdown(summary: dict[str, Any], agg: dict[str, Any], figs: dict[str, bytes], key: str) -> str:
    data, plan, gen = summary["data"], summary["plan"], summary.get("generator")
    faith, cfg = summary.get("faithfulness") or {}, summary["config"]
    tasks, ratios = data["tasks"], list(cfg["sweep"]["ratios"])
    e = csv_safe  # every value that came from user data is escaped
    L: list[str] = [f"# porcelain report — {e(cfg['name'])}", ""]
    L += ["## Does synthetic data help?", "",
          "Paired difference of test macro-F1 against the real-only baseline "
          f"({e(ratios[0])}), mean over seeds with a 95% Student-t interval.", "",
          "| ratio | task | Δ macro-F1 | Δ minority macro-F1 | verdict |", "|---|---|---|---|---|"]
    for r in ratios[1:]:
        for t in tasks:
            d = agg["delta"]["macro_f1"][r][t]
            dm = agg["delta"]["minority_macro_f1"][r][t]
            L.append(f"| {r} | {e(t)} | {_ci(d)} | {_ci(dm)} | {_verdict(d)} |")
    L += ["", "## Data", "",
          f"- dataset hash `{data['data_hash']}`; tasks: {', '.join(e(t) for t in tasks)}",
          f"- images: train {data['counts']['train']}, val {data['counts']['val']}, test {data['counts']['test']}",
          f"- set aside in quarantine: {data['n_quarantined']}"
          + (f" ({', '.join(f'{e(k)}: {v}' for k, v in sorted(data['quarantine_reasons'].items()))};"
             f" see `{data['quarantine_key']}`)" if data["n_quarantined"] else ""), ""]
    L += ["## Imbalance ratio (most / least common class, train)", "",
          "| task | real only | " + " | ".join(f"with {r}" for r in ratios[1:]) + " |",
          "|---|---|" + "---|" * len(ratios[1:])]
    for t in tasks:
        L.append(f"| {e(t)} | {plan['imbalance_before'][t]:.1f}:1 | "
                 + " | ".join(f"{plan['ratios'][r]['imbalance'][t]:.1f}:1" for r in ratios[1:]) + " |")
    L += ["", "Synthetic images per ratio: " + ", ".join(f"{r} → {plan['ratios'][r]['synthetic']}" for r in ratios)
          + f" (real train images: {plan['real_train']}); rarest combinations first.", ""]
    if gen:
        L += ["## Closed-set generator", "",
              f"- trained from scratch on the {gen['train_images']} real train images only: preset "
              f"`{cfg['generator']['preset']}`, {gen['steps']} steps at {cfg['generator']['resolution']} px, "
              f"{gen['seconds']} s, final loss {_fmt(gen['final_loss'], 4)}",
              f"- sampling: DDIM {cfg['generation']['steps']} steps, guidance w={cfg['generation']['guidance']}; "
              f"weights sha256 `{gen['weights_sha256'][:16]}`", ""]
    if faith.get("n_images"):
        L += ["## Label faithfulness", "",
              f"An independent judge trained on real train images classifies the {faith['n_images']} generated "
              f"images; faithfulness is the share assigned to the conditioned value (target ≥ {faith['threshold']:.0%}).", "",
              "| task | faithfulness | judge accuracy on real test |", "|---|---|---|"]
        for t in tasks:
            L.append(f"| {e(t)} | {faith['faithfulness'][t]:.1%} | {faith['judge_accuracy'][t]:.1%} |")
        L += ["", f"All tasks at or above target: **{'yes' if faith['passed'] else 'no'}**", ""]
        if faith.get("by_rarity"):
            L += ["By how many real train images the generated image's attribute combination had "
                  "(the generator learns rare combinations least well):", "",
                  "| combination had | images | " + " | ".join(e(t) for t in tasks) + " |",
                  "|---|---|" + "---|" * len(tasks)]
            for name, row in faith["by_rarity"].items():
                L.append(f"| {name} | {row['n']} | " + " | ".join(f"{row['faithfulness'][t]:.1%}" for t in tasks) + " |")
            L.append("")
    L += ["## Results on the real test split", "", "Mean over seeds [95% CI].", "",
          "| ratio | task | accuracy | macro-F1 | minority macro-F1 |", "|---|---|---|---|---|"]
    for r in ratios:
        for t in tasks:
            L.append(f"| {r} | {e(t)} | {_ci(agg['stats']['accuracy'][r][t])} | {_ci(agg['stats']['macro_f1'][r][t])}"
                     f" | {_ci(agg['stats']['minority_macro_f1'][r][t])} |")
    L += ["", "## Figures", ""]
    L += [f"![{name}]({name})" for name in figs]
    L += ["", "## Provenance", "",
          f"- code version `{code_version()}`; report `{key}`; seeds {cfg['sweep']['seeds']}",
          f"- classifier `{e(cfg['classifier']['model'])}` at {cfg['classifier']['image_size']} px, "
          f"{cfg['classifier']['epochs']} epochs, effective-number β={cfg['classifier']['beta']}, "
          f"weighted sampler {'on' if cfg['classifier']['use_sampler'] else 'off'}", ""]
    return "\n".join(L)
