"""The deployments: one purpose each (weekly ratio sweep, image watcher, rerun on new images), the whole
run config as their parameter, prefect.yaml in step with build_deployments(); the flow keeps
runtime.workers itself."""

from __future__ import annotations

import threading
import time

from flows.pipeline import _submit


class _FakeFuture:
    """A future on a thread, calling its done callbacks when the body ends (as Prefect's futures do)."""

    def __init__(self, body):
        self.callbacks, self.done, self.lock = [], False, threading.Lock()
        self.thread = threading.Thread(target=self._run, args=(body,))
        self.thread.start()

    def _run(self, body):
        body()
        with self.lock:
            self.done = True
            callbacks = list(self.callbacks)
        for fn in callbacks:
            fn(self)

    def add_done_callback(self, fn):
        with self.lock:
            if not self.done:
                self.callbacks.append(fn)
                return
        fn(self)

    def wait(self):
        self.thread.join()


class _FakeTask:
    def __init__(self, durations=None):
        self.running, self.peak, self.lock = 0, 0, threading.Lock()
        self.durations, self.started, self.began, self.ended = list(durations or []), [], {}, {}

    def _body(self, i):
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.started.append(i)
            self.began[i] = time.monotonic()
        time.sleep(self.durations[i] if i < len(self.durations) else 0.02)
        with self.lock:
            self.running -= 1
            self.ended[i] = time.monotonic()

    def submit(self, *args):
        return _FakeFuture(lambda i=args[0] if args else 0: self._body(i))


def test_the_flow_keeps_at_most_runtime_workers_tasks_in_flight():
    for workers in (1, 3):
        task = _FakeTask()
        futures = _submit(task, [(i,) for i in range(10)], workers)
        assert all(not f.thread.is_alive() for f in futures)  # _submit returns when every run has ended
        assert len(futures) == 10 and task.peak == workers


def test_a_long_run_does_not_hold_back_the_short_ones_behind_it():
    """Two slots, a 1.5 s run first and eight short ones: the short ones go through the free slot while
    the long one runs (waiting for the oldest run first would start the third only after 1.5 s)."""
    task = _FakeTask([1.5] + [0.02] * 8)
    futures = _submit(task, [(i,) for i in range(9)], 2)
    assert task.peak == 2 and [f.thread.is_alive() for f in futures] == [False] * 9
    assert task.began[8] < task.ended[0]  # the last short run started while the long one still ran
    assert task.started == list(range(9))  # started in the order of the calls


def _museum(tmp_path, **data):
    from porcelain.config import config_from_dict

    return config_from_dict({"name": "museum", "data": {"manifest": "s3://museum/collection/manifest.csv", **data},
                             "storage": {"url": str(tmp_path)}, "runtime": {"workers": 2}})


def test_each_deployment_has_one_purpose_and_carries_the_whole_config(tmp_path):
    from datetime import timedelta

    from deployments.serve import build_deployments

    cfg = _museum(tmp_path)
    sweep, rerun, watcher = build_deployments(cfg, debounce_s=45, watch_every_s=300)
    assert (sweep.name, rerun.name, watcher.name) == ("museum-ratio-sweep", "museum-rerun", "museum-watch-images")
    assert sweep.entrypoint.endswith("flows/pipeline.py:pipeline") and rerun.entrypoint == sweep.entrypoint
    assert watcher.entrypoint.endswith("flows/watcher.py:watch_images")
    # one schedule each where a schedule is the purpose; the rerun starts only from its trigger
    assert [s.schedule.cron for s in sweep.schedules] == ["0 2 * * 1"]
    assert [s.schedule.interval for s in watcher.schedules] == [timedelta(seconds=300)]
    assert not rerun.schedules
    (trigger,) = rerun.triggers
    assert trigger.expect == {"porcelain.images.landed"} and trigger.for_each == {"porcelain.snapshot"}
    assert trigger.match.get("prefect.resource.id") == ["porcelain.dataset.s3://museum/collection/manifest.csv"]
    assert (trigger.threshold, trigger.within, trigger.posture.value) == (1, timedelta(seconds=45), "Reactive")
    # the run config travels whole, runtime.workers included (the flow applies it, see _submit)
    for d in (sweep, rerun, watcher):
        assert d.parameters["config"] == cfg.model_dump(mode="json")
        assert d.parameters["config"]["runtime"]["workers"] == 2
        assert d.concurrency_limit == 1  # a slow run is never overlapped by the next one of its deployment


def test_a_built_in_dataset_gets_the_ratio_sweep_only(tmp_path):
    from deployments.serve import build_deployments
    from porcelain.config import config_from_dict

    cfg = config_from_dict({"name": "demo", "storage": {"url": str(tmp_path)}})
    assert [d.name for d in build_deployments(cfg)] == ["demo-ratio-sweep"]


def test_prefect_yaml_defines_the_same_deployments_for_work_pools():
    import importlib.util
    from datetime import timedelta
    from pathlib import Path

    import yaml
    from prefect import Flow
    from prefect.events import DeploymentEventTrigger

    from deployments.serve import build_deployments
    from porcelain.config import config_from_dict

    root = Path(__file__).resolve().parents[1]
    doc = yaml.safe_load((root / "deployments" / "prefect.yaml").read_text())
    cfg = config_from_dict(doc["definitions"]["config"], "deployments/prefect.yaml")
    built = {d.name: d for d in build_deployments(cfg)}
    assert [d["name"] for d in doc["deployments"]] == list(built)
    for d in doc["deployments"]:
        b = built[d["name"]]
        path, name = d["entrypoint"].split(":")
        assert b.entrypoint.endswith(d["entrypoint"])
        spec = importlib.util.spec_from_file_location(f"_entry_{name}", root / path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert isinstance(getattr(module, name), Flow)
        assert config_from_dict(d["parameters"]["config"]).model_dump(mode="json") == b.parameters["config"]
        assert d["concurrency_limit"] == b.concurrency_limit and d["work_pool"]["name"] == "porcelain"
        schedules = d.get("schedules", [])
        assert [s.get("cron") for s in schedules if "cron" in s] == [s.schedule.cron for s in b.schedules
                                                                      if hasattr(s.schedule, "cron")]
        assert [timedelta(seconds=s["interval"]) for s in schedules if "interval" in s] == [
            s.schedule.interval for s in b.schedules if hasattr(s.schedule, "interval")]
        triggers = [DeploymentEventTrigger.model_validate(t) for t in d.get("triggers", [])]
        assert [t.model_dump(exclude={"parameters", "job_variables"}) for t in triggers] == \
            [t.model_dump(exclude={"parameters", "job_variables"}) for t in b.triggers]
