"""Thread budget per stage: concurrent tasks share the CPU threads."""

from __future__ import annotations

import torch

from porcelain.config import RuntimeConfig
from porcelain.runtime import apply_runtime, available_cores, stage_threads


def test_concurrent_tasks_share_the_thread_budget():
    rt = RuntimeConfig(threads=4, workers=2)
    assert stage_threads(rt) == 4  # a stage that runs alone gets all of them
    assert stage_threads(rt, concurrent=2) == 2
    assert stage_threads(rt, concurrent=8) == 2  # never more at once than there are workers
    assert stage_threads(RuntimeConfig(threads=1, workers=2), concurrent=2) == 1  # at least one
    assert stage_threads(RuntimeConfig(workers=1), concurrent=4) == available_cores()


def test_apply_runtime_sets_torch_threads():
    old = torch.get_num_threads()
    try:
        assert apply_runtime(RuntimeConfig(threads=2, workers=2), concurrent=2) == 1
        assert torch.get_num_threads() == 1
        assert apply_runtime(RuntimeConfig(threads=2, workers=2)) == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)
