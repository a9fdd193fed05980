"""Speed of the report's paired two-level bootstrap: prints a table (classes × metric -> ms).

    .venv/bin/python benchmarks/stats_speed.py [--n-test 1136] [--seeds 3] [--n-boot 2000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from porcelain.evaluate.stats import paired_bootstrap


def runs(rng: np.random.Generator, target: np.ndarray, c: int, acc: float, k: int) -> list[np.ndarray]:
    out = []
    for _ in range(k):
        p = target.copy()
        wrong = rng.random(target.size) > acc
        p[wrong] = rng.integers(0, c, wrong.sum())
        out.append(p)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-test", type=int, default=1136)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n-boot", type=int, default=2000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"paired_bootstrap, {args.seeds} seeds × {args.n_test} test images × {args.n_boot} replicates")
    print("| classes | metric | ms (best of 3) |\n|---|---|---|")
    for c in (4, 10, 30):
        target = rng.integers(0, c, args.n_test)
        base, new = runs(rng, target, c, 0.6, args.seeds), runs(rng, target, c, 0.65, args.seeds)
        for metric in ("accuracy", "macro_f1"):
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                paired_bootstrap(base, new, target, c, metric, n_boot=args.n_boot)
                best = min(best, time.perf_counter() - t0)
            print(f"| {c} | {metric} | {best * 1000:.0f} |")


if __name__ == "__main__":
    main()
