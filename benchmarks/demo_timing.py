"""Time the demo cold (empty storage) and warm (everything cached) and print a table.

    .venv/bin/python benchmarks/demo_timing.py [--storage DIR]

Targets (issue 2): cold ≤ 10 min on 2 CPU cores including model training; warm ≤ 60 s.
The venv is not counted: `make demo` creates it once (about 3.5 min here).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(storage: str) -> tuple[float, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_HOME": str(ROOT / ".prefect")}
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "flows.cli", "demo", "--storage", storage], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    seconds = time.monotonic() - start
    if out.returncode:
        sys.stderr.write(out.stdout[-4000:] + out.stderr[-4000:])
        raise SystemExit(f"demo failed with exit code {out.returncode}")
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(("label faithfulness", "report:"))]
    return seconds, "; ".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--storage", default=None, help="storage folder (default: a fresh temporary one)")
    args = p.parse_args()
    storage = args.storage or tempfile.mkdtemp(prefix="porcelain-bench-")
    try:
        cold, info = run(storage)
        warm, _ = run(storage)
    finally:
        if args.storage is None:
            shutil.rmtree(storage, ignore_errors=True)
    print(f"cores: {os.cpu_count()}")
    print("| run | seconds | target |")
    print("|---|---|---|")
    print(f"| cold (empty storage) | {cold:.0f} | ≤ 600 |")
    print(f"| warm (all cached) | {warm:.0f} | ≤ 60 |")
    print(info)


if __name__ == "__main__":
    main()
