"""GIF decode throughput (frames/s): rdtf.io.read_clip vs imageio.v3.imread(..., index=None), side by side.

Generates GIFs with Pillow (64-256 px, 8-48 frames, transparent backgrounds, mixed disposal
1/2/3, frames cropped to what changed, per-frame palettes), decodes every file with both
readers in interleaved rounds and writes the medians to ``benchmarks/results/io.md``.

    .venv/bin/python benchmarks/bench_io.py [--count 20] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import imageio
import imageio.v3 as iio
import numpy as np
import PIL
from PIL import Image, ImageDraw

from rdtf.io import read_clip

RESULTS = Path(__file__).resolve().parent / "results" / "io.md"


def make_gif(path: Path, rng: np.random.Generator) -> int:
    """A sticker-like GIF: discs moving over a clear background, mixed disposal; returns its frame count."""
    count = int(rng.integers(8, 49))
    width, height = (int(v) for v in rng.integers(64, 257, size=2))
    discs = [(rng.uniform(0, width), rng.uniform(0, height), rng.uniform(-4, 4), rng.uniform(-4, 4)) for _ in range(3)]
    colours = [tuple(int(c) for c in rng.integers(0, 256, size=3)) for _ in discs]
    radius = min(width, height) / 6
    frames = []
    for index in range(count):
        image = Image.new("RGBA", (width, height), (0, 0, 0, 0))
        draw = ImageDraw.Draw(image)
        for (x, y, dx, dy), colour in zip(discs, colours):
            cx, cy = (x + dx * index) % width, (y + dy * index) % height
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=(*colour, 255))
        draw.rectangle([2, 2, 2 + index * 3 % (width - 4), 6], fill=(0, 0, 0, 255))  # every frame differs
        frames.append(image)
    disposal = [int(d) for d in rng.choice([1, 2, 3], size=count)]
    frames[0].save(path, save_all=True, append_images=frames[1:], disposal=disposal, duration=80, loop=0)
    return count


def same_frames(ours: np.ndarray, theirs: np.ndarray) -> bool:
    """Equal RGBA, except that fully transparent pixels match whatever their RGB."""
    if ours.shape != theirs.shape:
        return False
    clear = (ours[..., 3] == 0) & (theirs[..., 3] == 0)
    return not ((ours != theirs).any(axis=-1) & ~clear).any()


DECODERS: dict[str, Callable[[Path], np.ndarray]] = {
    "rdtf.io.read_clip": lambda path: read_clip(path).frames,
    'imageio.v3.imread(index=None, mode="RGBA")': lambda path: iio.imread(path, index=None, mode="RGBA"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as scratch:
        files = [Path(scratch) / f"sticker_{index:02d}.gif" for index in range(args.count)]
        frames_total = sum(make_gif(path, rng) for path in files)
        size_mb = sum(path.stat().st_size for path in files) / 1e6
        agree = sum(same_frames(*(decode(path) for decode in DECODERS.values())) for path in files)
        # rounds interleave the decoders, so a burst of load from other jobs hits both alike
        seconds: dict[str, list[float]] = {name: [] for name in DECODERS}
        for _ in range(args.repeats):
            for name, decode in DECODERS.items():
                started = time.perf_counter()
                for path in files:
                    decode(path)
                seconds[name].append(time.perf_counter() - started)

    rows = []
    for name, times in seconds.items():
        median = statistics.median(times)
        rows.append((name, min(times), median, frames_total / median))
        print(f"{name}: median {median:.3f} s, {frames_total / median:.0f} frames/s")
    ours, theirs = (statistics.median(t) for t in seconds.values())
    lines = [
        "# GIF decode throughput",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_io.py --count {args.count} --repeats {args.repeats}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs "
        f"(`os.cpu_count()`; shared with other jobs), {platform.system()} {platform.release()}; "
        f"Python {sys.version.split()[0]}, numpy {np.__version__}, Pillow {PIL.__version__}, "
        f"imageio {imageio.__version__}. 1-minute load average {load_before:.1f} before and "
        f"{os.getloadavg()[0]:.1f} after the run (other jobs share the CPUs, so compare rows of one run only).",
        "",
        f"Input: {args.count} GIFs written by Pillow, 64-256 px, 8-48 frames ({frames_total} in all, "
        f"{size_mb:.1f} MB), transparent backgrounds, disposal 1/2/3 mixed at random, frames cropped to "
        f"what changed. Each round decodes every file with each reader in turn; {args.repeats} rounds; "
        "frames/s uses the median round.",
        "",
        "| reader | best s | median s | frames/s (median) |",
        "| --- | --- | --- | --- |",
        *(f"| `{name}` | {best:.3f} | {median:.3f} | {fps:.0f} |" for name, best, median, fps in rows),
        "",
        f"rdtf.io.read_clip vs imageio: {theirs / ours:.2f}x the throughput on medians. "
        f"Both readers gave the same RGBA frames (fully transparent pixels compared by alpha only) "
        f"for {agree} of {args.count} files.",
        "",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
