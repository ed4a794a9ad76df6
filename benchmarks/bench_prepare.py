"""Dataset preparation throughput (stickers/s) with 1 and 2 worker processes, one run.

Generates one folder of GIF and APNG stickers (64-128 px, 8-24 frames, transparent
backgrounds, a moving shape), prepares it into a fresh output folder per measurement and
writes the numbers to ``benchmarks/results/prepare.md``.

    .venv/bin/python benchmarks/bench_prepare.py [--count 200] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL

from rdtf.data import prepare_dataset
from rdtf.io import Clip, write_clip

RESULTS = Path(__file__).resolve().parent / "results" / "prepare.md"


def make_sticker(rng: np.random.Generator) -> Clip:
    """A transparent sticker: a coloured disc bouncing along a random path."""
    count = int(rng.integers(8, 25))
    height, width = (int(v) for v in rng.integers(64, 129, size=2))
    ys, xs = np.mgrid[:height, :width]
    colour = rng.integers(0, 256, size=3)
    radius = min(height, width) / 4
    frames = np.zeros((count, height, width, 4), np.uint8)
    start, step = rng.uniform(radius, min(height, width) - radius, size=2), rng.uniform(-3, 3, size=2)
    for index in range(count):
        cy, cx = start + step * index
        inside = (ys - cy) ** 2 + (xs - cx) ** 2 <= radius**2
        frames[index][inside] = (*colour, 255)
        frames[index, 2:6, 2 : 2 + index * 2 % (width - 4)] = (0, 0, 0, 255)  # a growing bar: every frame differs
    return Clip(frames, rng.integers(40, 160, size=count))


def build_folder(root: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    records = []
    for index in range(count):
        name = f"sticker_{index:04d}.{'gif' if index % 2 == 0 else 'png'}"
        write_clip(make_sticker(rng), root / name)
        records.append({"file": name, "caption_en": f"sticker {index}", "caption_zh": f"贴纸 {index}"})
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    (root / "captions.jsonl").write_text(lines, encoding="utf-8")


SETTINGS: list[tuple[str, int, int | None]] = [  # (selection, workers, shard_size)
    ("uniform", 1, None),
    ("uniform", 2, None),
    ("max_change", 1, None),
    ("cluster", 1, None),
    ("uniform", 2, 100),
]


def cpu_seconds() -> float:
    """CPU time of this process plus its finished worker processes."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def time_prepare(source: Path, out: Path, selection: str, workers: int, shard_size: int | None) -> tuple[float, float]:
    """(wall, CPU) seconds to prepare ``source`` into a fresh ``out``."""
    shutil.rmtree(out, ignore_errors=True)
    wall, cpu = time.perf_counter(), cpu_seconds()
    report = prepare_dataset(source, out, progress=False, selection=selection, workers=workers, shard_size=shard_size)
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    assert not report.skipped, report.skipped
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as scratch_dir:
        source, out = Path(scratch_dir) / "src", Path(scratch_dir) / "out"
        build_folder(source, args.count)
        size_mb = sum(p.stat().st_size for p in source.iterdir()) / 1e6
        # rounds interleave the settings, so a burst of load from other jobs hits them all alike
        seconds: dict[tuple[str, int, int | None], list[float]] = {setting: [] for setting in SETTINGS}
        cpu: dict[tuple[str, int, int | None], list[float]] = {setting: [] for setting in SETTINGS}
        for _ in range(args.repeats):
            for setting in SETTINGS:
                wall, used = time_prepare(source, out, *setting)
                seconds[setting].append(wall)
                cpu[setting].append(used)
    rows = []
    for setting, times in seconds.items():
        best, median = min(times), statistics.median(times)
        cpu_ms = 1000 * statistics.median(cpu[setting]) / args.count
        rows.append((*setting, best, median, args.count / best, args.count / median, cpu_ms))
        print(f"{setting}: best {best:.2f} s, median {median:.2f} s, {cpu_ms:.1f} CPU ms per sticker")

    one, two = seconds[("uniform", 1, None)], seconds[("uniform", 2, None)]
    cpu_one, cpu_two = cpu[("uniform", 1, None)], cpu[("uniform", 2, None)]
    lines = [
        "# Dataset preparation throughput",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_prepare.py --count {args.count} --repeats {args.repeats}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs "
        f"(`os.cpu_count()`; shared with other jobs), {platform.system()} {platform.release()}; "
        f"Python {sys.version.split()[0]}, numpy {np.__version__}, Pillow {PIL.__version__}. "
        f"1-minute load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after the run "
        "(other jobs share the CPUs, so compare rows of one run only).",
        "",
        f"Input: {args.count} generated stickers (half GIF, half APNG), 64-128 px, 8-24 frames, transparent, "
        f"{size_mb:.1f} MB in all. Output: 8 frames at 64 x 64 on white (the defaults). Each setting prepares "
        f"into a fresh folder, {args.repeats} rounds over all settings; times include starting the worker "
        f"processes ({multiprocessing.get_start_method()} start method).",
        "",
        "| selection | workers | shard_size | best s | median s | stickers/s (best) | stickers/s (median) "
        "| CPU ms per sticker (median) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *(
            f"| {s} | {w} | {z or '-'} | {b:.2f} | {m:.2f} | {rb:.1f} | {rm:.1f} | {c:.1f} |"
            for s, w, z, b, m, rb, rm, c in rows
        ),
        "",
        f"Two workers vs one (uniform): {min(one) / min(two):.2f}x on best times, "
        f"{statistics.median(one) / statistics.median(two):.2f}x on medians. CPU time (this process plus its "
        "finished workers) hardly depends on other jobs' load: 2 workers used "
        f"{statistics.median(cpu_two) / statistics.median(cpu_one) - 1:+.0%} CPU time against 1 worker. "
        "Wall-clock gains need idle cores; compare the load average above with the CPU count.",
        "",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
