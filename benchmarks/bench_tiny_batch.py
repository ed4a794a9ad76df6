"""Training throughput of the rdtf-tiny recipe's base model against batch size, on the GPU if there is one.

The recipe's batch of 32 leaves one H200 mostly idle (its 0.22-0.33 s per step are
largely fixed costs: kernel launches, the CPU-side flow fill). This measures how many clips
per second larger batches train, to size a GPU build (``rdtf build-tiny --batch-size``); a
batch size that fails (out of memory, a kernel limit) is reported and the rest measured.

The model is the recipe's, untrained (speed does not depend on the weights); the data is a
prepared set such as the recipe's own (``runs/rdtf-tiny/data``). Each run is a fresh
process (see ``bench_train.run_training``). Writes benchmarks/results/tiny_batch_<device>.md.
Usage: python benchmarks/bench_tiny_batch.py --data runs/rdtf-tiny/data [--batch-sizes 32 128 512]
"""

from __future__ import annotations

import argparse
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import recipe_model, run_training

from rdtf.tiny import TinyRecipe

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="a prepared dataset (rdtf prepare), e.g. runs/rdtf-tiny/data")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if not (Path(args.data) / "dataset.json").exists():
        parser.error(f"--data {args.data}: not a prepared dataset (no dataset.json)")
    recipe = TinyRecipe()
    gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if gpu else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    precision = recipe.gpu_mixed_precision if gpu else recipe.cpu_mixed_precision
    full = {"mode": "full", "ema_decay": recipe.ema_decay, "mixed_precision": precision}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = recipe_model(root, recipe)
        run_training(model, Path(args.data), root / "warm", 2, batch_size=min(args.batch_sizes), **full)  # the cache
        runs, failed = {}, {}
        for size in args.batch_sizes:
            try:
                runs[size] = run_training(model, Path(args.data), root / f"batch-{size}", args.steps, batch_size=size,
                                          **full)
            except subprocess.CalledProcessError as error:  # e.g. out of memory: report it, measure the rest
                failed[size] = (error.stderr or "").strip().splitlines()[-1:] or ["(no error output)"]
    if not runs:
        sys.exit(f"every batch size failed: {failed}")
    base = min(runs)
    lines = [
        f"# rdtf-tiny base training against batch size: {device}",
        "",
        (f"Command: `python benchmarks/bench_tiny_batch.py --data {args.data} --batch-sizes "
         f"{' '.join(map(str, args.batch_sizes))} --steps {args.steps}`  "),
        (f"torch {torch.__version__}, Python {platform.python_version()}. `TinyRecipe()`'s model (condition fill "
         f"{recipe.condition_fill}, {recipe.diffusion_space} space), untrained; full training with EMA, "
         f"{precision} autocast; s/step is the steady state over {args.steps} steps (the first excluded)."),
        "",
        "| batch | s/step | clips/s | vs batch " + f"{base} | peak GPU memory (MB) | peak RSS (MB) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
        *(f"| {size} | {r['step_seconds']:.3f} | {size / r['step_seconds']:.0f} | "
          f"{(size / r['step_seconds']) / (base / runs[base]['step_seconds']):.1f}x | {r['max_gpu_mb']:.0f} | "
          f"{r['max_rss_mb']:.0f} |" for size, r in runs.items()),
        "",
        *(f"Batch {size} failed: `{message[0]}`" for size, message in failed.items()),
    ]
    out = RESULTS / f"tiny_batch_{re.sub(r'[^a-z0-9]+', '_', device.lower()).strip('_')}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
