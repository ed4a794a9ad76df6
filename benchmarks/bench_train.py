"""Training throughput and memory on CPU, measured side by side in one run.

1. Steps/s with the precompute cache vs encoding on the fly (same tiny model, same data).
2. Peak resident memory of a training run with and without gradient checkpointing
   (each configuration in a fresh process, read from ru_maxrss).
3. bf16 autocast (``mixed_precision="bf16"``) against fp32, for that LoRA run and for the
   rdtf-tiny recipe's base training (full UNet, batch 32, its UNet and VAE): on a CPU with
   AVX-512 bf16 the casts cost more than they save in small matrix products and less in
   large ones, so the answer depends on the batch.

Writes benchmarks/results/train.md (``--out``: another file, for another kind of CPU).
Usage: python benchmarks/bench_train.py [--steps N] [--out FILE]
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
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from rdtf.tiny import TinyRecipe

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


def recipe_model(root: Path, recipe: TinyRecipe) -> Path:
    """The rdtf-tiny recipe's untrained model (random weights: speed does not depend on them)."""
    recipe.untrained_components().save_pretrained(root / "recipe-model")
    return root / "recipe-model"


def run_training(model: Path, data: Path, out: Path, steps: int, **overrides) -> dict:
    """One training run in a fresh process; returns seconds per step, peak RSS (and GPU memory) and mean loss."""
    config = {"base": str(model), "data": str(data), "output_dir": str(out), "split": None, "max_steps": steps,
              "batch_size": 4, "checkpoint_every": 10_000, "validate_every": 10_000, "log_every": 1, "progress": False,
              "trackers": [], "cache_dir": str(out.parent / "cache"), **overrides}
    code = (
        "import json, resource, time, torch\n"
        "from rdtf.train import TrainConfig, train\n"
        f"config = TrainConfig(**{config!r})\n"
        "train(config)\n"
        "print(json.dumps({'max_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,\n"
        "                  'max_gpu_mb': torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0}))\n"
    )
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    result = json.loads(output.strip().splitlines()[-1])
    with open(out / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    seconds = [float(row["seconds"]) for row in rows]
    result["step_seconds"] = (seconds[-1] - seconds[0]) / (len(seconds) - 1)  # steady state: first step excluded
    result["mean_loss"] = sum(float(row["loss"]) for row in rows) / len(rows)  # same seed and batches in every run
    return result


def _has_cpu_flag(flag: str) -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.exists() and flag in cpuinfo.read_text(encoding="utf-8").split()


def main() -> None:
    from rdtf.tiny import TinyRecipe

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, data = _workspace(root, args.size)
        run_training(model, data, root / "warm", 2)  # builds the cache once, so "cached" measures training only
        runs = {
            "cached": run_training(model, data, root / "cached", args.steps),
            "on the fly": run_training(model, data, root / "live", args.steps, cache=False),
            "cached + gradient checkpointing": run_training(model, data, root / "ckpt", args.steps, gradient_checkpointing=True),
            "cached + bf16 autocast": run_training(model, data, root / "bf16", args.steps, mixed_precision="bf16"),
        }
        recipe = TinyRecipe()
        untrained = recipe_model(root, recipe)
        full = {"mode": "full", "batch_size": recipe.batch_size, "ema_decay": recipe.ema_decay}
        run_training(untrained, data, root / "recipe-warm", 2, **full)
        recipe_runs = {
            "fp32": run_training(untrained, data, root / "recipe-fp32", args.steps, **full),
            "bf16 autocast": run_training(untrained, data, root / "recipe-bf16", args.steps, mixed_precision="bf16", **full),
        }
    lines = [
        "# Training benchmark (CPU)",
        "",
        (f"Command: `python benchmarks/bench_train.py --steps {args.steps} --size {args.size}"
         f"{'' if args.out == RESULTS else f' --out {args.out}'}`  "),
        f"Machine: {platform.machine()} ({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} torch threads, Python {platform.python_version()}, "
        f"torch {torch.__version__}. Tiny I2VGen-XL (UNet 32/64/64, VAE 4x), 8 frames at {args.size} px, batch 4, "
        "LoRA rank 16 on all attention. Each run is a fresh process; s/step is the steady state from log.csv "
        "(the first step, with its start-up, is excluded); peak RSS is the whole process; mean loss over every "
        "step (the same seed and batches in every run, so it shows whether a setting changes what is learnt).",
        "",
        "| run | s/step | steps/s | peak RSS (MB) | mean loss |",
        "| --- | --- | --- | --- | --- |",
        *(f"| {name} | {r['step_seconds']:.2f} | {1 / r['step_seconds']:.2f} | {r['max_rss_mb']:.0f} | {r['mean_loss']:.4f} |"
          for name, r in runs.items()),
        "",
        (f"Cache speed-up: {runs['on the fly']['step_seconds'] / runs['cached']['step_seconds']:.2f}x. "
         f"Gradient checkpointing: peak RSS {runs['cached + gradient checkpointing']['max_rss_mb'] / runs['cached']['max_rss_mb']:.2f}x, "
         f"time per step {runs['cached + gradient checkpointing']['step_seconds'] / runs['cached']['step_seconds']:.2f}x. "
         f"bf16 autocast: time per step {runs['cached + bf16 autocast']['step_seconds'] / runs['cached']['step_seconds']:.2f}x."),
        "",
        "## The rdtf-tiny recipe's base training",
        "",
        "`TinyRecipe()`'s model (UNet 32/64/64 with 16-wide heads, 16 latent channels, random weights), full "
        f"training at batch {recipe.batch_size} with EMA {recipe.ema_decay} on the same data; CPU {'with' if _has_cpu_flag('avx512_bf16') else 'without'} "
        "AVX-512 bf16.",
        "",
        "| precision | s/step | peak RSS (MB) | mean loss |",
        "| --- | --- | --- | --- |",
        *(f"| {name} | {r['step_seconds']:.2f} | {r['max_rss_mb']:.0f} | {r['mean_loss']:.4f} |"
          for name, r in recipe_runs.items()),
        "",
        f"bf16 autocast speed-up: {recipe_runs['fp32']['step_seconds'] / recipe_runs['bf16 autocast']['step_seconds']:.2f}x.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
