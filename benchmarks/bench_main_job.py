"""Wall time of the README's main job (`rdtf demo`: notebooks 01 -> 04 on the embedded model).

Runs the full main job in a fresh temporary work folder and reads each executed
notebook's own papermill duration, then writes a Markdown table to
``benchmarks/results/main_job.md``. The issue's target: under 20 minutes on 2 CPU cores.
Set-up (`make install` on a fresh clone) is timed separately by hand and noted in the file.

    .venv/bin/python benchmarks/bench_main_job.py
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rdtf.demo import FULL, run_demo

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "main_job.md"
INSTALL_SECONDS = 111  # `make install` on a fresh clone, timed by hand: not repeatable inside one venv


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="rdtf-main-job-") as workdir:
        start = time.perf_counter()
        run_demo(Path(workdir))
        total = time.perf_counter() - start
        executed = sorted((Path(workdir) / "reports" / "notebooks").glob("*.ipynb"))
        durations = {
            path.stem: json.loads(path.read_text(encoding="utf-8"))["metadata"]["papermill"]["duration"]
            for path in executed
        }
    lines = [
        "# The main job's wall time (`rdtf demo`)",
        "",
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"sizes {FULL}. Command: `{' '.join(['.venv/bin/python', *sys.argv])}`.",
        "",
        "| notebook | wall time (s) |",
        "| --- | ---: |",
        *[f"| {name} | {seconds:.0f} |" for name, seconds in durations.items()],
        f"| **whole job** (kernels, HTML export included) | **{total:.0f}** ({total / 60:.1f} min) |",
        "",
        "Target: under 20 minutes on 2 CPU cores. A fresh clone's `make install` (venv, CPU torch from",
        f"the local wheel cache, the kit and its dependencies from PyPI) took {INSTALL_SECONDS} s on this machine",
        f"(2026-11-26), so `make demo` on a fresh clone takes about {(total + INSTALL_SECONDS) / 60:.1f} minutes in all.",
    ]
    RESULTS.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
