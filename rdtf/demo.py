"""The README's main job: the built-in sticker set, prepared for training, with a baseline report.

It grows with the kit: today it builds the data and scores the simple baselines on the
held-out test emoji, so the numbers every model must beat are on disk before any model
runs. Everything lands in ``<workdir>/data`` and ``<workdir>/reports``.
"""

from __future__ import annotations

from pathlib import Path

from rdtf.backbones import load_backbones
from rdtf.data import StickerDataset, prepare_dataset
from rdtf.evaluate import cases_from_items, evaluate_methods
from rdtf.report import write_report
from rdtf.synthetic import build_sticker_set

DEMO_TASKS = ("i2v", "interpolation", "predict_forward", "predict_backward")


def run_demo(workdir: Path, *, smoke: bool = False) -> Path:
    """Build + prepare the built-in set and write the baseline report; returns the report path."""
    count, eval_clips = (60, 6) if smoke else (600, 40)
    data = workdir / "data"
    stickers = build_sticker_set(data / "builtin", count=count, size=64, seed=0)
    prepared = prepare_dataset(stickers, data / "builtin-prepared", num_frames=8, size=64)
    print(prepared.summary())

    test = StickerDataset(prepared.out, split="test")
    items = [test[i] for i in range(min(eval_clips, len(test)))]
    backbones = load_backbones(lpips_net="alex")  # used when installed locally, else reported unavailable
    result = evaluate_methods(cases_from_items(items, DEMO_TASKS), {}, backbones=backbones, resamples=200)
    report = write_report(result, workdir / "reports" / "baselines", title="Baselines on the built-in test split")
    print(f"dataset: {prepared.out}\nreport:  {report}")
    return report
