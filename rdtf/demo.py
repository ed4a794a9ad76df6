"""The README's main job: notebooks 01 → 04 on the embedded model and the built-in data.

``01_prepare_data`` builds and prepares the built-in sticker set, ``02_finetune_lora``
fine-tunes a LoRA of the embedded ``assets/rdtf-tiny`` on it, ``03_sample_interactive``
samples through the studio's direct path, and ``04_compare_ground_truth`` scores the base
and the LoRA against the baselines on the held-out test emoji. Executed notebooks and
their HTML pages land in ``<workdir>/reports/notebooks``, the comparison report in
``<workdir>/reports/compare``; nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rdtf.notebooks import kit_root, run_all

EMBEDDED_MODEL = "assets/rdtf-tiny"


@dataclass(frozen=True)
class DemoSizes:
    """How much work each notebook does: the full main job, or a smoke run for the tests."""

    stickers: int
    lora_steps: int
    compare_clips: int
    sweep_clips: int
    sweep_steps: tuple[int, ...]


FULL = DemoSizes(stickers=600, lora_steps=60, compare_clips=16, sweep_clips=4, sweep_steps=(5, 10, 15, 25))
SMOKE = DemoSizes(stickers=40, lora_steps=2, compare_clips=2, sweep_clips=1, sweep_steps=(1, 2))


def demo_parameters(workdir: Path, sizes: DemoSizes, model: Path) -> dict[str, dict]:
    """Each notebook's parameters: absolute paths, since the notebooks run from the kit's folder."""
    data, runs, reports = workdir / "data" / "builtin-prepared", workdir / "runs", workdir / "reports"
    return {
        "01_prepare_data": {"builtin_dir": str(workdir / "data" / "builtin"), "out_dir": str(data),
                            "count": sizes.stickers, "size": 64},
        "02_finetune_lora": {"base": str(model), "data": str(data), "output_dir": str(runs / "lora"),
                             "max_steps": sizes.lora_steps, "batch_size": 4, "learning_rate": 1e-3,
                             "lora_rank": 8, "validate_every": sizes.lora_steps, "checkpoint_every": sizes.lora_steps,
                             "log_every": max(1, sizes.lora_steps // 10)},
        "03_sample_interactive": {"base": str(model), "data": str(data), "lora_dir": str(runs),
                                  "export_dir": str(workdir / "stickers")},
        "04_compare_ground_truth": {"base": str(model), "lora_path": str(runs / "lora"), "data": str(data),
                                    "num_clips": sizes.compare_clips, "sweep_clips": sizes.sweep_clips,
                                    "sweep_steps": list(sizes.sweep_steps), "report_dir": str(reports / "compare")},
    }


def run_demo(workdir: Path, *, smoke: bool = False, model: Path | None = None) -> list[Path]:
    """Run the main job; returns the executed notebooks' HTML pages and the comparison report."""
    workdir = workdir.resolve()
    model = (model or kit_root() / EMBEDDED_MODEL).resolve()
    if not (model / "model_index.json").is_file():
        raise FileNotFoundError(f"{model}: the embedded model is missing (rebuild it with `rdtf build-tiny`)")
    parameters = demo_parameters(workdir, SMOKE if smoke else FULL, model)
    executed = run_all(workdir / "reports" / "notebooks", parameters, progress=True)
    pages = [path.with_suffix(".html") for path in executed]
    report = workdir / "reports" / "compare" / "report.html"
    print("notebook reports:\n" + "\n".join(f"  {page}" for page in pages) + f"\ncomparison report: {report}")
    return [*pages, report]
