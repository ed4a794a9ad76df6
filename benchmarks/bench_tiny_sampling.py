"""Sampling time of the embedded model: one 8-frame 64x64 sticker at its recommended settings.

Times the whole call (text and image encoding, denoising, decoding) for i2v, it2v and 2x
interpolation, first cold (empty embedding caches) and then warm (another seed: only the
UNet and the decoder run), with 1 and 2 torch threads, at the recommended settings and
from pure noise (strength 1: every step runs), and writes a Markdown table to
``benchmarks/results/tiny_sampling.md``.

    .venv/bin/python benchmarks/bench_tiny_sampling.py --repeats 5
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rdtf.data import StickerDataset
from rdtf.evaluate import frames_from_item
from rdtf.io import composite_over
from rdtf.pipeline import RDTFPipeline

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "tiny_sampling.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "assets" / "rdtf-tiny"))
    parser.add_argument("--data", default=str(ROOT / "runs" / "rdtf-tiny" / "data"),
                        help="a prepared built-in set (the one `rdtf build-tiny` prepares)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    pipe = RDTFPipeline.from_pretrained(args.model)
    item = StickerDataset(args.data, split="test")[0]
    clip = composite_over(frames_from_item(item), (255, 255, 255))
    tasks = {
        "i2v": dict(image=clip[0], task="i2v"),
        "it2v": dict(image=clip[0], task="it2v", prompt=item["caption_en"]),
        "interpolation 2x": dict(frames=clip, task="interpolation"),
    }
    requests = {
        **tasks,
        **{f"{name}, strength 1": dict(request, strength=1.0) for name, request in tasks.items()},
    }
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, request in requests.items():
            pipe.clear_cache()
            cold = time.perf_counter()
            pipe.generate(**request, num_frames=8, height=64, width=64, fps=8.0, seed=0, progress=False)
            cold = time.perf_counter() - cold
            warm = []
            for seed in range(1, args.repeats + 1):
                start = time.perf_counter()
                pipe.generate(**request, num_frames=8, height=64, width=64, fps=8.0, seed=seed, progress=False)
                warm.append(time.perf_counter() - start)
            rows.append((threads, name, cold, statistics.median(warm), min(warm)))
            print(rows[-1], flush=True)

    settings = ", ".join(f"{k}={v}" for k, v in pipe.sampler_settings.items()) + "".join(
        f"; for {task}: " + ", ".join(f"{k}={v}" for k, v in changes.items())
        for task, changes in pipe.components.config.task_sampler.items())
    lines = [
        "# Embedded model sampling time (one 8-frame 64x64 sticker)",
        "",
        f"Model `{Path(args.model).name}`, its recommended settings ({settings}); {platform.processor() or platform.machine()} "
        f"({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} cores, torch {torch.__version__}. Command: `{' '.join(['.venv/bin/python', *sys.argv])}`.",
        "",
        "| threads | task | cold call (s) | warm call, median (s) | warm, best (s) |",
        "| ---: | --- | ---: | ---: | ---: |",
        *[f"| {t} | {name} | {cold:.2f} | {median:.2f} | {best:.2f} |" for t, name, cold, median, best in rows],
        "",
        "Cold: embedding caches cleared first; warm: another seed, so only the UNet and the decoder run. "
        "'strength 1': the same settings from pure noise, so every step runs.",
    ]
    RESULTS.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
