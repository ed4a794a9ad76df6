"""Evaluation throughput: how many clips per second rdtf.evaluate scores on CPU.

Builds a test split from the built-in sticker set (OpenMoji art, procedural motions):
``--clips`` stickers of 8 frames at 64 x 64, each posed as every task in ``--tasks``,
then times

1. metrics alone (``clip_metrics`` of a perfect prediction, ground-truth flows included),
2. ``evaluate_methods`` with the task baselines (repeat_given; interpolation adds
   crossfade and optical flow),
3. ``write_report`` of that result (tables, plots, strips).

and writes the numbers, the machine and the command to
``benchmarks/results/evaluate.md``. Run from the repository root:

    python benchmarks/bench_evaluate.py
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from rdtf.cases import cases_for_tasks
from rdtf.evaluate import evaluate_methods
from rdtf.io import write_atomic
from rdtf.metrics import clip_metrics
from rdtf.report import write_report
from rdtf.synthetic import render_motion, sample_specs

RESULTS = Path(__file__).parent / "results" / "evaluate.md"


def build_split(count: int, num_frames: int, size: int, tasks: list[str]) -> list:
    """``count`` synthetic stickers, ``num_frames`` frames each, posed as every task."""
    cases = []
    for sample in sample_specs(count, seed=1, size=size):
        clip = render_motion(sample.spec, num_frames, sample.spec.fps)
        cases += cases_for_tasks(sample.key, clip.frames, tasks, caption_en=sample.spec.caption_en, fps=sample.spec.fps)
    return cases


class Timer:
    """Wall-clock and process CPU seconds of a block (CPU time is less hurt by other jobs on a shared machine)."""

    def __enter__(self) -> Timer:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return (
        f"{cpu}; {os.cpu_count()} logical CPUs visible, shared with other jobs (load average at start {load}); "
        f"Python {platform.python_version()}, numpy {np.__version__}, OpenCV {cv2.__version__} "
        f"({cv2.getNumThreads()} threads), torch {torch.__version__}; {platform.platform()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=100)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--tasks", default="i2v,interpolation,predict_forward")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    tasks = args.tasks.split(",")

    host = machine()
    with Timer() as build:
        cases = build_split(args.clips, args.frames, args.size, tasks)
    with Timer() as metrics:
        for case in cases:
            clip_metrics(case.frames.copy(), case.frames, case.condition_mask, case.loss_mask)
    with Timer() as evaluate:
        result = evaluate_methods(cases, {}, progress=False)
    with tempfile.TemporaryDirectory() as folder, Timer() as report:
        write_report(result, folder)

    per_method = {}
    for row in result.rows:
        per_method[row["method"]] = per_method.get(row["method"], 0) + 1
    summary = [
        "| task | method | PSNR (dB) | SSIM | IoU | motion EPE (px) |",
        "|---|---|---|---|---|---|",
    ]
    for task in result.tasks:
        for method in result.methods:
            cells = [result.aggregate(task, method, m) for m in ("psnr", "ssim", "iou", "motion_epe")]
            if cells[0] is not None:
                summary.append(
                    f"| {task} | {method} | "
                    + " | ".join("–" if c is None else f"{c['mean']:.3f} [{c['ci_low']:.3f}, {c['ci_high']:.3f}]" for c in cells)
                    + " |"
                )

    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__), *sys.argv[1:]])
    lines = [
        "# Evaluation throughput",
        "",
        f"- Command: `{command}`",
        f"- Machine: {host}",
        f"- Split: {args.clips} synthetic stickers (rdtf.synthetic, seed 1), {args.frames} frames at {args.size}x{args.size}, "
        f"each posed as {', '.join(tasks)}: {len(cases)} cases; building it took {build.wall:.1f} s.",
        f"- Scored predictions: {len(result.rows)} ({', '.join(f'{m}: {n}' for m, n in per_method.items())}).",
        "",
        "| stage | wall s | CPU s | throughput (wall) |",
        "|---|---|---|---|",
        f"| metrics only (`clip_metrics`, perfect prediction, GT flows recomputed) | {metrics.wall:.2f} | {metrics.cpu:.2f} "
        f"| {len(cases) / metrics.wall:.1f} cases/s |",
        f"| `evaluate_methods` with the task baselines | {evaluate.wall:.2f} | {evaluate.cpu:.2f} "
        f"| {len(cases) / evaluate.wall:.1f} cases/s, {len(result.rows) / evaluate.wall:.1f} predictions/s |",
        f"| `write_report` (tables, {len(result.metrics)} metrics, plots, {len(result.examples)} strips + sheets) "
        f"| {report.wall:.2f} | {report.cpu:.2f} | |",
        "",
        "Baseline quality on this split (mean and 95% bootstrap CI over stickers):",
        "",
        *summary,
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, "\n".join(lines).encode("utf-8"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
