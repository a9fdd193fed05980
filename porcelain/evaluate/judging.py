"""Stage: label faithfulness of the generated images.

An independent judge (a small CNN trained on real train images only) classifies every generated
image; faithfulness per task is the fraction assigned to the attribute value the image was
conditioned on. The judge's own accuracy on the real test split is reported beside it: faithfulness
is only as meaningful as the judge is accurate.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from porcelain.config import FaithfulnessConfig, RuntimeConfig
from porcelain.data.ingest import load_split
from porcelain.evaluate.faithfulness import judge_accuracy, label_faithfulness, train_judge
from porcelain.generate.shards import load_synthetic
from porcelain.runtime import apply_runtime
from porcelain.storage import Store


# Bins of "real train images of the image's attribute combination".
RARITY_BINS = (("1-2 real", 1, 2), ("3-5 real", 3, 5), ("6-20 real", 6, 20), (">20 real", 21, 10**12))


def _bin(n: int) -> str:
    return next(name for name, lo, hi in RARITY_BINS if lo <= n <= hi)


def measure_faithfulness(store: Store, data: dict[str, Any], shards: list[dict[str, Any]], size: int,
                         cfg: FaithfulnessConfig, runtime: RuntimeConfig, seed: int = 0) -> dict[str, Any]:
    apply_runtime(runtime)
    tasks = data["tasks"]
    num_classes = [len(data["classes"][t]) for t in tasks]
    have: Counter = Counter()
    for ref in shards:
        have[tuple(ref["combo"])] += ref["n"]
    syn_x, syn_y = load_synthetic(store, shards, dict(have), size)
    if not len(syn_x):
        return {"n_images": 0, "faithfulness": {}, "judge_accuracy": {}, "threshold": cfg.threshold, "passed": None}
    x, y = load_split(store, data["data_hash"], size, data["n_shards"], "train")
    judge = train_judge(x, y, num_classes, epochs=cfg.epochs, seed=seed, device=runtime.device)
    test_x, test_y = load_split(store, data["data_hash"], size, data["n_shards"], "test")
    acc = judge_accuracy(judge, test_x, test_y)
    faith = label_faithfulness(judge, syn_x, syn_y)
    faith_named = {tasks[int(t)]: float(v) for t, v in faith.items()}
    # How faithful the generator is depends on how many real images its combination had.
    real_count = Counter(map(tuple, y.tolist()))
    rarity = np.array([_bin(real_count[tuple(row)]) for row in syn_y.tolist()])
    by_rarity = {}
    for name, _, _ in RARITY_BINS:
        m = rarity == name
        if m.any():
            f = label_faithfulness(judge, syn_x[m], syn_y[m])
            by_rarity[name] = {"n": int(m.sum()), "faithfulness": {tasks[int(t)]: float(v) for t, v in f.items()}}
    return {
        "n_images": int(len(syn_x)),
        "by_rarity": by_rarity,
        "judge_accuracy": {tasks[int(t)]: float(v) for t, v in acc.items()},
        "faithfulness": faith_named,
        "threshold": cfg.threshold,
        "passed": all(v >= cfg.threshold for v in faith_named.values()),
    }
