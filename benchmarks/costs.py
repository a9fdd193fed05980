"""The system's costs, each a ratio of two figures measured side by side in one run (issue 12).

    .venv/bin/python benchmarks/costs.py [--quick] [--config RUN.yaml] [--storage DIR] [--ephemeral-server]

Rows (each measured in fresh processes, one after the other, in this one invocation):

* warm rerun with nothing changed / cold run (goal ≤ 0.05): the pipeline (``flows.cli.run_config``, as
  ``porcelain run``) into an empty store, then the same config again;
* rerun after one new shard of images / cold run (goal ≤ 1/shards + 0.05, shards = data shards after the
  addition): the cold run's manifest lacks ``data.shard_size`` train rows, the rerun's has them; the table
  says what the rerun recomputed (task bodies called, Prefect task states);
* the pipeline under Prefect / the same porcelain stage functions called directly (goal ≤ 1.10): both cold,
  in fresh stores; the direct run (benchmarks/_costs_child.py ``direct``) calls the functions tasks/stages.py
  calls, in flows/pipeline.py's order, fan-outs on a pool of ``runtime.workers`` threads;
* peak memory of generation at N and 10·N images (goal ≤ 1.2): ``generate_shard`` over a plan of N
  (10·N) images with the cold run's trained generator, peak RSS increment over the process after imports
  and model load (``ru_maxrss``);
* closed-set sampler images/s (goal ≥ 5×): porcelain's batched, sharded generation (``generate_shard``,
  images written to the store) against the same model and DDIM scheduler driven once per image by the
  loop of diffusers' "deconstruct a pipeline" docs (``DDIMPipeline`` cannot pass class labels), same
  steps, guidance and resolution, same threads;
* the generation stage on a 2-worker local Dask cluster (``runtime.engine: dask``) against threads of one
  process: the cold run's store rerun with ``--refresh shards`` (every other task a cache hit), timed from
  the first generation task's start to the last one's end as the Prefect server recorded them.

Default config: the built-in sample (700 images, 100 per data shard), the demo's generator with 150
training steps and 10 sampling steps, 40 classifier steps, ratios 100:0 and 90:10, seeds 0 and 1
(``--quick``: a smaller smoke run). ``--config`` runs another config (its storage is replaced; a
manifest must be local). One Prefect server is started for all runs (its start is not in any time; it
is printed); ``--ephemeral-server`` lets every run start its own, as ``porcelain run`` does (then its
start is in every time and task states are not read back).

In a checkout that others edit, run it from a copy, so that no run sees other code than the one before
it (the table warns when porcelain/, tasks/ or flows/ changed during the benchmark)::

    mkdir /tmp/porcelain-snap && tar -c --exclude=./.git --exclude=./.venv --exclude=./.prefect . | tar -x -C /tmp/porcelain-snap
    .venv/bin/python /tmp/porcelain-snap/benchmarks/costs.py
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CHILD = ROOT / "benchmarks" / "_costs_child.py"


# --- configs ------------------------------------------------------------------------------------------------

def default_config(quick: bool) -> dict[str, Any]:
    """The demo (porcelain/configs/demo.yaml) at reduced size and steps: a cold run of ~1–3 min on 2 cores."""
    from importlib.resources import files

    cfg = yaml.safe_load(files("porcelain.configs").joinpath("demo.yaml").read_text(encoding="utf-8"))
    cfg["name"] = "costs-quick" if quick else "costs"
    # n includes the shard held out of the cold run: cold 600 images in 6 data shards, rerun 700 in 7
    cfg["data"] = {"manifest": "sample", "sample": {"n": 300 if quick else 700, "size": 32, "seed": 0},
                   "shard_size": 60 if quick else 100}
    syn = cfg["synthesizers"][0]
    syn["generator"]["train_steps"] = 20 if quick else 150
    syn["sampling"]["steps"] = 4 if quick else 10
    cfg["classifier"].update(steps=8 if quick else 40, eval_every=4 if quick else 10)
    cfg["reference"].update(steps=10 if quick else 100, eval_every=5 if quick else 25)
    cfg["sweep"] = {"ratios": ["100:0", "90:10"], "seeds": [0] if quick else [0, 1]}
    # one torch thread per task: on a 2-core machine shared with other processes, stages that run alone
    # (generator and reference training) crawled with 2 spinning OpenMP threads (20 generator steps: 154 s)
    cfg["runtime"] = {**cfg.get("runtime", {}), "workers": 2, "threads": 1}
    return cfg


def prepare_data(cfg: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Manifests for the cold run (without one data shard's worth of train rows) and the rerun (with them).

    Both carry a ``split`` column (computed once with the pipeline's own seeded stratified split when the
    data has none), so adding the rows moves no existing image to another split. Written outside the image
    root: the ingest cache key fingerprints the root's listing.
    """
    from porcelain.config import config_from_dict
    from porcelain.data.ingest import default_root
    from porcelain.data.source import BUILTIN, materialize_builtin
    from porcelain.data.splits import stratified_split
    from porcelain.storage import Store

    d = config_from_dict(cfg).data
    if d.manifest in BUILTIN:
        src = materialize_builtin(Store(str(folder / "data")), d)
        manifest, root = src["manifest"], src["root"]
    else:
        if "://" in d.manifest and not d.manifest.startswith("file://"):
            raise SystemExit("costs.py: --config needs a local manifest (it writes edited copies of it)")
        manifest, root = d.manifest, d.root or default_root(d.manifest)
    with open(manifest.removeprefix("file://"), newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header, rows = list(reader.fieldnames or []), list(reader)
    tasks = d.tasks or [c for c in header if c not in ("image", "split")]
    if "split" not in header:
        splits = stratified_split([tuple(r[t] for t in tasks) for r in rows], [r["image"] for r in rows],
                                  val_fraction=d.val_fraction, test_fraction=d.test_fraction, seed=d.split_seed)
        for r, s in zip(rows, splits):
            r["split"] = s
        header.append("split")
    size = d.shard_size
    train_at = [i for i, r in enumerate(rows) if r["split"].strip().lower() == "train"]
    if len(train_at) <= size:
        raise SystemExit(f"costs.py: {len(train_at)} train rows, not enough to hold out a shard of {size}")
    held = set(train_at[-size:])
    out = folder / "manifests"
    out.mkdir(parents=True, exist_ok=True)
    for name, keep in (("cold.csv", [r for i, r in enumerate(rows) if i not in held]), ("full.csv", rows)):
        with open(out / name, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=header, lineterminator="\n")
            w.writeheader()
            w.writerows(keep)
    return {"cold": str(out / "cold.csv"), "full": str(out / "full.csv"), "root": root, "rows_cold": len(rows) - size,
            "rows_full": len(rows), "added": size, "shard_size": size,
            "shards_cold": math.ceil((len(rows) - size) / size), "shards_full": math.ceil(len(rows) / size)}


def write_config(base: dict[str, Any], path: Path, *, manifest: str, root: str, store: Path,
                 runtime: dict[str, Any] | None = None) -> Path:
    cfg = copy.deepcopy(base)
    cfg["data"] = {**{k: v for k, v in cfg.get("data", {}).items() if k not in ("sample", "digits")},
                   "manifest": manifest, "root": root}
    cfg["storage"] = {**cfg.get("storage", {}), "url": str(store)}
    if runtime:
        cfg["runtime"] = {**cfg.get("runtime", {}), **runtime}
    from porcelain.config import config_from_dict

    config_from_dict(cfg, str(path))  # fail here, not in a child, on a bad config
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


# --- processes ----------------------------------------------------------------------------------------------

class Server:
    """One Prefect API server for every run, started as Prefect starts its temporary one (uvicorn on
    127.0.0.1, no UI), with its own PREFECT_HOME (database)."""

    def __init__(self, env: dict[str, str], log: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/api"
        from importlib.util import find_spec

        prefect_dir = Path(find_spec("prefect").origin).parent  # not imported (see has_dask)
        t0 = time.monotonic()
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect_dir.parent), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"],
            env={**env, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"},
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"the Prefect server did not start (see {log})")
            time.sleep(0.5)
        self.start_seconds = time.monotonic() - t0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def child(mode: str, cfg: Path, work: Path, name: str, env: dict[str, str], *extra: str) -> dict[str, Any]:
    """Run one measurement in a fresh process; its JSON result, with the process's wall seconds added."""
    out, log = work / f"{name}.json", work / f"{name}.log"
    print(f"[costs] {name} ...", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, str(CHILD), mode, str(cfg), str(out), *extra], cwd=ROOT, env=env,
                            stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.monotonic() - t0
    if rc:
        sys.stderr.write(log.read_text()[-6000:])
        raise SystemExit(f"costs.py: {name} failed with exit code {rc} (log: {log})")
    res = json.loads(out.read_text())
    # the process from start to its result; what the child did after it (reading task states back) is not in it
    res["process_seconds"] = wall - res.get("after_seconds", 0.0)
    print(f"[costs] {name}: {res['process_seconds']:.1f} s", file=sys.stderr, flush=True)
    return res


def code_digest() -> str:
    """A digest of the code the runs import (porcelain/, tasks/, flows/): in a checkout that others edit,
    a change between two runs makes their ratio meaningless (cache keys follow stage code)."""
    import hashlib

    h = hashlib.sha256()
    for top in ("porcelain", "tasks", "flows"):
        for f in sorted((ROOT / top).rglob("*")):
            if f.is_file() and f.suffix in (".py", ".yaml", ".json") and "__pycache__" not in f.parts:
                h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def generator_refs(store: Path) -> list[str]:
    return sorted(str(p.relative_to(store)) for p in (store / "generators").glob("*/ref.json"))


# --- the table ----------------------------------------------------------------------------------------------

def _fmt(x: float, unit: str) -> str:
    return f"{x:.1f} {unit}" if unit else f"{x:.3g}"


def row(what: str, a: float, b: float, unit: str, goal: str, ok: bool | None) -> str:
    ratio = a / b if b else float("nan")
    met = "—" if ok is None else ("yes" if ok else "**no**")
    return f"| {what} | {_fmt(a, unit)} | {_fmt(b, unit)} | {ratio:.3f} | {goal} | {met} |"


def _bodies(res: dict[str, Any]) -> str:
    b = {k: v for k, v in sorted(res.get("bodies", {}).items()) if v}
    return ", ".join(f"{k}×{v}" for k, v in b.items()) or "none"


def _states(res: dict[str, Any]) -> str:
    st = res.get("task_states")
    if st is None:
        return "not read (no shared server)"
    total: dict[str, int] = {}
    for counts in st.values():
        for s, n in counts.items():
            total[s] = total.get(s, 0) + n
    return ", ".join(f"{n} {s}" for s, n in sorted(total.items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=None, help="run config YAML (default: the reduced built-in sample)")
    ap.add_argument("--storage", type=Path, default=None, help="work folder for stores and logs (default: a "
                    "fresh temporary one, deleted afterwards)")
    ap.add_argument("--quick", action="store_true", help="a fast smoke run (smaller config and N)")
    ap.add_argument("--ephemeral-server", action="store_true",
                    help="every run starts Prefect's temporary server itself (as `porcelain run`)")
    ap.add_argument("--memory-images", type=int, default=None, help="N of the peak-memory row (default 160; quick 32)")
    ap.add_argument("--memory-steps", type=int, default=2,
                    help="denoising steps in the peak-memory runs (memory does not depend on them)")
    ap.add_argument("--sampler-images", type=int, default=None, help="images of the sampler row (default 64; quick 16)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the sampler row (both methods)")
    ap.add_argument("--no-dask", action="store_true", help="skip the Dask row")
    args = ap.parse_args(argv)
    n_mem = args.memory_images or (32 if args.quick else 160)
    n_samp = args.sampler_images or (16 if args.quick else 64)

    work = (args.storage or Path(tempfile.mkdtemp(prefix="porcelain-costs-"))).resolve()
    if args.storage and work.exists() and any(work.iterdir()):
        raise SystemExit(f"costs.py: --storage {work} is not empty (cold runs need empty stores)")
    work.mkdir(parents=True, exist_ok=True)
    home = work / "prefect-home"
    home.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PREFECT_HOME": str(home),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_API_URL", None)
    server = None
    load0 = os.getloadavg()
    digest0 = code_digest()
    t_all = time.monotonic()
    try:
        base = yaml.safe_load(args.config.read_text(encoding="utf-8")) if args.config else default_config(args.quick)
        data = prepare_data(base, work)
        stores = {k: work / f"store-{k}" for k in ("flow", "direct")}
        cfgs = work / "configs"
        cfgs.mkdir()
        cold = write_config(base, cfgs / "cold.yaml", manifest=data["cold"], root=data["root"], store=stores["flow"])
        full = write_config(base, cfgs / "full.yaml", manifest=data["full"], root=data["root"], store=stores["flow"])
        direct = write_config(base, cfgs / "direct.yaml", manifest=data["cold"], root=data["root"],
                              store=stores["direct"])
        workers = base.get("runtime", {}).get("workers", 1)
        regen_threads = write_config(base, cfgs / "regen-threads.yaml", manifest=data["full"], root=data["root"],
                                     store=stores["flow"], runtime={"refresh": ["shards"], "workers": 2})
        engine = ROOT / "flows" / "engine.py"  # read, not imported: importing prefect here would pick a PREFECT_HOME
        has_dask = engine.exists() and "def task_runner_for(" in engine.read_text(encoding="utf-8")
        regen_dask = None
        if has_dask and not args.no_dask:
            regen_dask = write_config(base, cfgs / "regen-dask.yaml", manifest=data["full"], root=data["root"],
                                      store=stores["flow"], runtime={"refresh": ["shards"], "workers": 2,
                                                                     "engine": "dask", "dask_workers": 2})
        if not args.ephemeral_server:
            server = Server(env, work / "server.log")
            env["PREFECT_API_URL"] = server.url

        r_cold = child("flow", cold, work, "1-cold", env)
        refs = generator_refs(stores["flow"])
        r_direct = child("direct", direct, work, "2-direct-cold", env)
        r_warm = child("flow", cold, work, "3-warm", env)
        r_shard = child("flow", full, work, "4-one-new-shard", env)
        refs_after = generator_refs(stores["flow"])
        r_thr = r_dask = None
        if env.get("PREFECT_API_URL"):
            r_thr = child("flow", regen_threads, work, "5-generation-threads", env)
            if regen_dask is not None:
                r_dask = child("flow", regen_dask, work, "6-generation-dask", env)
        r_mem = r_mem10 = r_samp = None
        if refs:
            ref = ["--ref", str(stores["flow"]), refs[0]]
            r_mem = child("memory", cold, work, "7-memory-N", env, *ref, "--images", str(n_mem),
                          "--steps", str(args.memory_steps), "--work", str(work / "store-mem-n"))
            r_mem10 = child("memory", cold, work, "8-memory-10N", env, *ref, "--images", str(10 * n_mem),
                            "--steps", str(args.memory_steps), "--work", str(work / "store-mem-10n"))
            r_samp = child("sampler", cold, work, "9-sampler", env, *ref, "--images", str(n_samp),
                           "--threads", str(args.threads), "--work", str(work / "store-sampler"))
    finally:
        if server is not None:
            server.stop()
    total = time.monotonic() - t_all
    digest1 = code_digest()

    shards = data["shards_full"]
    goal_shard = 1 / shards + 0.05
    print(f"cores: {os.cpu_count()}; load average at start {load0[0]:.1f}; whole benchmark {total:.0f} s")
    print(f"config: {'--config ' + str(args.config) if args.config else 'built-in sample (' + ('quick' if args.quick else 'default') + ')'}; "
          f"cold data {data['rows_cold']} rows in {data['shards_cold']} data shards, rerun {data['rows_full']} rows "
          f"in {shards} (data.shard_size {data['shard_size']}); runtime.workers {workers}")
    print("Prefect server: " + (f"one for all runs, started in {server.start_seconds:.1f} s (not in any time)"
                                if server else "each run starts its own temporary server (in every time)"))
    print(f"code: {ROOT} (porcelain/tasks/flows digest {digest0})" + (
        "" if digest1 == digest0 else f"; WARNING: the code changed during the benchmark (now {digest1}): rows "
        "measured before and after the change are not comparable; run it from a copy of the checkout"))
    print("Times are whole processes (python start to exit, imports included) unless a row says otherwise.")
    print()
    print("| what | measured A | measured B | A / B | goal | met? |")
    print("|---|---|---|---|---|---|")
    pc, pw = r_cold["process_seconds"], r_warm["process_seconds"]
    print(row("warm rerun, nothing changed (A) / cold run (B)", pw, pc, "s", "≤ 0.05", pw / pc <= 0.05))
    print(row("… the flow call only, imports excluded", r_warm["seconds"], r_cold["seconds"], "s", "(≤ 0.05)",
              r_warm["seconds"] / r_cold["seconds"] <= 0.05))
    ps = r_shard["process_seconds"]
    print(row(f"rerun after one new data shard ({data['added']} images) (A) / cold run (B)", ps, pc, "s",
              f"≤ 1/{shards} + 0.05 = {goal_shard:.3f}", ps / pc <= goal_shard))
    pd = r_direct["process_seconds"]
    print(row("pipeline under Prefect, cold (A) / same porcelain functions called directly, cold (B)", pc, pd, "s",
              "≤ 1.10", pc / pd <= 1.10))
    print(row("… in-process time only (imports excluded)", r_cold["seconds"], r_direct["seconds"], "s", "(≤ 1.10)",
              r_cold["seconds"] / r_direct["seconds"] <= 1.10))
    if r_mem and r_mem10:
        a, b = r_mem10["increment_mib"], r_mem["increment_mib"]
        print(row(f"peak RSS increment of generation, {r_mem10['images']} images (A) / {r_mem['images']} images (B)",
                  a, b, "MiB", "≤ 1.2", b > 0 and a / b <= 1.2))
    else:
        print("| peak memory of generation | skipped: the config has no closed_set generator | | | ≤ 1.2 | — |")
    if r_samp:
        s = r_samp["seconds"]
        n = r_samp["images"]
        ours, plain, batched = n / s["sharded"], n / s["plain"], n / s["batched"]
        print(row(f"closed-set images/s: porcelain generate_shard, batched, written to the store (A) / plain "
                  f"per-image diffusers loop (B)", ours, plain, "img/s", "≥ 5", ours / plain >= 5))
        print(row("… porcelain sample_images alone, in memory (A) / plain per-image loop (B)", batched, plain,
                  "img/s", "(≥ 5)", batched / plain >= 5))
    else:
        print("| closed-set sampler images/s | skipped: the config has no closed_set generator | | | ≥ 5 | — |")
    if r_dask and r_thr and "generation_span_seconds" in r_dask and "generation_span_seconds" in r_thr:
        a, b = r_dask["generation_span_seconds"], r_thr["generation_span_seconds"]
        print(row("generation stage: 2-worker local Dask cluster (A) / threads of one process, 2 workers (B)", a, b,
                  "s", "none set", None))
        print(row("… the whole rerun process (Dask cluster start included) (A) / threads (B)",
                  r_dask["process_seconds"], r_thr["process_seconds"], "s", "none set", None))
    elif args.no_dask:
        print("| generation stage on the 2-worker Dask cluster / one process | skipped: --no-dask | | | | — |")
    elif not has_dask:
        print("| generation stage on the 2-worker Dask cluster / one process | skipped: engine dask not available "
              "(no flows/engine.py with task_runner_for) | | | | — |")
    else:
        print("| generation stage on the 2-worker Dask cluster / one process | skipped: needs the shared server "
              "(task run times); run without --ephemeral-server | | | | — |")

    print()
    print("What each rerun recomputed (task bodies called in the flow's process; Prefect task run states):")
    print(f"- warm: bodies {_bodies(r_warm)}; states {_states(r_warm)}")
    same_data = r_shard["data_hash"] == r_cold["data_hash"]
    retrained = len(refs_after) > len(refs)
    print(f"- one new data shard: bodies {_bodies(r_shard)}; states {_states(r_shard)}. Data hash "
          f"{'unchanged' if same_data else 'changed'} ({r_cold['data_hash'][:10]} → {r_shard['data_hash'][:10]}); "
          f"generator {'retrained (a second generators/*/ref.json)' if retrained else 'reused'}.")
    if not same_data:
        print("  Packs are keyed by their own images, so only the new rows' packs are decoded, and the reference "
              "classifier is keyed by the splits it reads (val), so its body finds it stored. But the new rows are "
              "train images: the generator learns from them, so it retrains, its shards are drawn again, and every "
              "sweep run trains on the new train split. A new shard of train images costs a retraining, not one "
              "shard's worth; only images that land in val or test could be cheaper (the reference retrains on val).")
    if r_thr:
        print(f"- generation rerun (--refresh shards), threads: bodies {_bodies(r_thr)}; states {_states(r_thr)}")
    if r_dask:
        print(f"- generation rerun, Dask: states {_states(r_dask)} (bodies ran on the workers)")
    if r_samp:
        s = r_samp
        print(f"- sampler: {s['images']} images, {s['steps']} DDIM steps, guidance {s['guidance']}, {s['resolution']} px, "
              f"sample batch {s['batch_size']}, shards of {s['shard_size']}, {s['threads']} torch thread(s); "
              f"plain loop vs batched: max |Δ| {s['max_abs_uint8_diff']} of 255 (same images); seconds "
              + ", ".join(f"{k} {v:.1f}" for k, v in s["seconds"].items()))
    if r_mem and r_mem10:
        for r in (r_mem, r_mem10):
            print(f"- memory {r['images']} images ({r['shards']} shards, {r['steps']} steps, {r['seconds']:.1f} s): "
                  f"after imports {r['after_imports_mib']:.0f} MiB, after model load {r['baseline_mib']:.0f} MiB, "
                  f"peak {r['peak_mib']:.0f} MiB, increment {r['increment_mib']:.1f} MiB")
    print(f"- peak RSS of the pipeline processes: cold under Prefect {r_cold['peak_rss_mib']:.0f} MiB, direct "
          f"{r_direct['peak_rss_mib']:.0f} MiB; imports {r_cold['import_seconds']:.1f} s / "
          f"{r_direct['import_seconds']:.1f} s; warm process imports {r_warm['import_seconds']:.1f} s of "
          f"{r_warm['process_seconds']:.1f} s")
    if args.storage is None:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"stores, configs and logs: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
