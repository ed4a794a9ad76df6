"""The README's main job: the built-in sticker set, prepared by notebook 01, and a baseline report.

It grows with the kit: today it runs ``01_prepare_data`` headlessly (papermill) on the
built-in set and scores the simple baselines on the held-out test emoji, so the numbers
every model must beat are on disk before any model runs. The notebooks 02-04 join once
the embedded model ships. Everything lands in ``<workdir>/data`` and ``<workdir>/reports``.
"""

from __future__ import annotations

from pathlib import Path

from rdtf.backbones import load_backbones
from rdtf.data import StickerDataset
from rdtf.evaluate import cases_from_items, evaluate_methods
from rdtf.notebooks import run_notebook
from rdtf.report import write_report

DEMO_TASKS = ("i2v", "interpolation", "predict_forward", "predict_backward")


def run_demo(workdir: Path, *, smoke: bool = False) -> list[Path]:
    """Run the main job; returns the executed notebook(s) and the baseline report."""
    workdir = workdir.resolve()  # notebooks run from the kit's root: hand them absolute paths
    count, eval_clips = (60, 6) if smoke else (600, 40)
    data = workdir / "data" / "builtin-prepared"
    reports = workdir / "reports"
    notebook = run_notebook(
        "01_prepare_data",
        reports / "notebooks",
        {"builtin_dir": str(workdir / "data" / "builtin"), "out_dir": str(data), "count": count, "size": 64},
        progress=True,
    )
    test = StickerDataset(data, split="test")
    items = [test[i] for i in range(min(eval_clips, len(test)))]
    backbones = load_backbones(lpips_net="alex")  # used when installed locally, else reported unavailable
    result = evaluate_methods(cases_from_items(items, DEMO_TASKS), {}, backbones=backbones, resamples=200)
    report = write_report(result, reports / "baselines", title="Baselines on the built-in test split")
    html = notebook.with_suffix(".html")
    print(f"dataset:          {data}\nnotebook report:  {html}\nbaseline report:  {report}")
    return [html, report]
