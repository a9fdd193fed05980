"""The served deployments start the same flow as the CLI, and the flow keeps runtime.workers itself."""

from __future__ import annotations

import threading
import time

from flows.pipeline import _submit


class _FakeFuture:
    def __init__(self, thread):
        self.thread = thread

    def wait(self):
        self.thread.join()


class _FakeTask:
    def __init__(self):
        self.running, self.peak, self.lock = 0, 0, threading.Lock()

    def _body(self):
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        time.sleep(0.02)
        with self.lock:
            self.running -= 1

    def submit(self, *args):
        t = threading.Thread(target=self._body)
        t.start()
        return _FakeFuture(t)


def test_the_flow_keeps_at_most_runtime_workers_tasks_in_flight():
    for workers in (1, 3):
        task = _FakeTask()
        futures = _submit(task, [()] * 10, workers)
        for f in futures:
            f.wait()
        assert len(futures) == 10 and task.peak == workers


def test_deployments_run_the_pipeline_on_their_schedules(tmp_path):
    from deployments.serve import build_deployments
    from porcelain.config import config_from_dict

    cfg = config_from_dict({"name": "museum", "storage": {"url": str(tmp_path)}, "runtime": {"workers": 2}})
    sweep, refresh = build_deployments(cfg)
    assert (sweep.name, refresh.name) == ("museum-ratio-sweep", "museum-refresh")
    assert sweep.entrypoint.endswith("flows/pipeline.py:pipeline")
    assert sweep.schedules[0].schedule.cron == "0 2 * * 1" and refresh.schedules[0].schedule.cron == "30 1 * * *"
    # the run config travels whole, runtime.workers included (the flow applies it, see _submit)
    assert sweep.parameters["config"]["runtime"]["workers"] == 2
