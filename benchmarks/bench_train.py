"""Training throughput and memory on CPU, measured side by side in one run.

1. Steps/s with the precompute cache vs encoding on the fly (same tiny model, same data).
2. Peak resident memory of a training run with and without gradient checkpointing
   (each configuration in a fresh process, read from ru_maxrss).

Writes benchmarks/results/train.md. Usage: python benchmarks/bench_train.py [--steps N]
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "train.md"


def _workspace(root: Path, size: int) -> tuple[Path, Path]:
    from rdtf.data import prepare_dataset
    from rdtf.models import build_tiny_components
    from rdtf.synthetic import build_sticker_set

    build_sticker_set(root / "stickers", count=64, size=size, seed=0, progress=False)
    prepare_dataset(root / "stickers", root / "data", num_frames=8, size=size, progress=False)
    build_tiny_components(seed=0, unet_channels=(32, 64, 64), vae_channels=(32, 64, 64), text_width=32,
                          image_size=32, sample_size=size // 4).save_pretrained(root / "model")
    return root / "model", root / "data"


def _run(model: Path, data: Path, out: Path, steps: int, **overrides) -> dict:
    """One training run in a fresh process; returns wall seconds and peak RSS."""
    config = dict(base=str(model), data=str(data), output_dir=str(out), split=None, max_steps=steps, batch_size=4,
                  checkpoint_every=10_000, validate_every=10_000, log_every=1, progress=False, trackers=[],
                  cache_dir=str(out.parent / "cache"), **overrides)
    code = (
        "import json, resource, time, torch\n"
        "from rdtf.train import TrainConfig, train\n"
        f"config = TrainConfig(**{config!r})\n"
        "train(config)\n"
        "print(json.dumps({'max_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n"
    )
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    result = json.loads(output.strip().splitlines()[-1])
    with open(out / "log.csv", newline="") as handle:
        seconds = [float(row["seconds"]) for row in csv.DictReader(handle)]
    result["step_seconds"] = (seconds[-1] - seconds[0]) / (len(seconds) - 1)  # steady state: first step excluded
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, data = _workspace(root, args.size)
        _run(model, data, root / "warm", 2)  # builds the cache once, so "cached" measures training only
        runs = {
            "cached": _run(model, data, root / "cached", args.steps),
            "on the fly": _run(model, data, root / "live", args.steps, cache=False),
            "cached + gradient checkpointing": _run(model, data, root / "ckpt", args.steps, gradient_checkpointing=True),
        }
    lines = [
        "# Training benchmark (CPU)",
        "",
        f"Command: `python benchmarks/bench_train.py --steps {args.steps} --size {args.size}`  ",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, Python {platform.python_version()}, "
        f"torch {torch.__version__}. Tiny I2VGen-XL (UNet 32/64/64, VAE 4x), 8 frames at {args.size} px, batch 4, "
        "LoRA rank 16 on all attention. Each run is a fresh process; s/step is the steady state from log.csv "
        "(the first step, with its start-up, is excluded); peak RSS is the whole process.",
        "",
        "| run | s/step | steps/s | peak RSS (MB) |",
        "| --- | --- | --- | --- |",
        *(f"| {name} | {r['step_seconds']:.2f} | {1 / r['step_seconds']:.2f} | {r['max_rss_mb']:.0f} |"
          for name, r in runs.items()),
        "",
        f"Cache speed-up: {runs['on the fly']['step_seconds'] / runs['cached']['step_seconds']:.2f}x. "
        f"Gradient checkpointing: peak RSS {runs['cached + gradient checkpointing']['max_rss_mb'] / runs['cached']['max_rss_mb']:.2f}x, "
        f"time per step {runs['cached + gradient checkpointing']['step_seconds'] / runs['cached']['step_seconds']:.2f}x.",
        "",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
