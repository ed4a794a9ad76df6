"""Quality bars: the ground truths they compare with, the scoring, and a whole run on a toy model."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from built_in import built_in_dataset

from rdtf.bars import (
    BarSettings,
    i2v_motion,
    measure_quality_bars,
    motion_variants,
    text_control_bars,
    write_quality_bars,
)
from rdtf.data import StickerDataset
from rdtf.evaluate import frames_from_item
from rdtf.io import composite_over
from rdtf.lora import attach_lora, save_lora
from rdtf.models import build_tiny_components
from rdtf.synthetic import MOTION_KINDS, MOTIONS

TOY_SETTINGS = dict(split="", clips=3, num_inference_steps=2, text_control_images=2, text_control_motions=2, lora_clips=2,
                    step_counts=[1, 2], step_reference=2, step_clips=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bars")
    built_in_dataset(root, count=80, size=32, seed=3)
    return root / "data"


def test_a_clips_own_motion_variant_is_its_ground_truth_and_every_variant_starts_alike(data):
    dataset = StickerDataset(data, split="test")
    index = next(i for i, row in enumerate(dataset.rows) if row["source_frames"] == 8 and row["num_real"] == 8)
    row = dataset.rows[index]
    variants = motion_variants(row, [row["motion"], "bounce", "pulse"], size=32, num_frames=8)
    own = variants[row["motion"]]
    truth = composite_over(frames_from_item(dataset[index]), (255, 255, 255))
    assert own[0] == row["caption_en"] and own[1] == row["caption_zh"]
    assert np.abs(own[2].astype(int) - truth.astype(int)).max() <= 1
    firsts = [frames[0] for _, _, frames in variants.values()]
    assert all(np.array_equal(firsts[0], first) for first in firsts)
    assert not np.array_equal(variants["bounce"][2], variants["pulse"][2])


class _Oracle:
    """Plays back the ground truth of the caption it is given (``follow_text``) or of the first motion."""

    def __init__(self, dataset: StickerDataset, follow_text: bool) -> None:
        self.follow_text = follow_text
        self.by_caption = {}
        for row in dataset.rows:
            motions = [motion for motion in MOTIONS if motion != "spin"]
            for variant in motion_variants(row, motions, 32, 8).values():
                self.by_caption[variant[0]] = self.by_caption[variant[1]] = variant[2]

    def generate(self, *, prompt: str, **_: object) -> np.ndarray:
        frames = self.by_caption[prompt] if self.follow_text else next(iter(self.by_caption.values()))
        return frames.astype(np.float32) / 255.0


def test_text_control_scores_an_oracle_perfect_and_a_text_blind_model_at_most_chance(data):
    dataset = StickerDataset(data, split="test", predicate=lambda r: r["motion"] != "spin")
    settings = BarSettings(text_control_images=3, text_control_motions=3)
    assert all(bar["measured"] == 1.0 for bar in text_control_bars(_Oracle(dataset, True), dataset, settings, False))
    blind = text_control_bars(_Oracle(dataset, False), dataset, settings, False)
    assert all(bar["measured"] <= 0.5 and not bar["passed"] for bar in blind)


def test_text_control_uses_only_clips_that_can_take_every_other_motion(data):
    dataset = StickerDataset(data, split="test", predicate=lambda r: r["motion"] != "spin")
    too_many = BarSettings(text_control_images=3, text_control_motions=len(MOTION_KINDS) + 1)
    with pytest.raises(ValueError, match="lower text_control_motions"):
        text_control_bars(_Oracle(dataset, True), dataset, too_many, False)


def test_a_whole_run_on_a_toy_model_scores_every_bar_and_writes_its_table(data, tmp_path):
    components = build_tiny_components(seed=0)
    components.config = dataclasses.replace(components.config, task_sampler={"i2v": {"strength": 0.5}})
    model = components.save_pretrained(tmp_path / "model")
    torch.manual_seed(0)
    attach_lora(components.unet, rank=2)
    with torch.no_grad():
        for name, parameter in components.unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    lora = save_lora(components.unet, tmp_path / "lora")

    results = measure_quality_bars(model, data, lora=lora, settings=BarSettings(**TOY_SETTINGS), progress=False)
    names = [bar["bar"] for bar in results["bars"]]
    assert len(names) == results["total"] == 16
    assert any("text control, Chinese" in name for name in names) and any("held-out motion" in name for name in names)
    assert all(np.isfinite(bar["measured"]) for bar in results["bars"])
    assert set(results["step_curve"]) == {"ddim-2", "dpm++-1", "dpm++-2"}
    gain = next(bar for bar in results["bars"] if "held-out motion" in bar["bar"])
    low, high = map(float, re.search(r"interval of the change (\S+) to (\S+) dB over 2 clips", gain["detail"]).groups())
    assert low - 0.005 <= gain["measured"] <= high + 0.005  # the interval is of the per-clip change

    table = write_quality_bars(results, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "quality_bars.json").read_text())["total"] == 16
    assert table.read_text().count("\n| ") == 16 + 2  # header, separator, one row per bar
    assert "; for i2v: strength=0.5." in table.read_text()  # the model's own i2v setting was used and is said


def test_a_missing_lora_is_named_before_any_work(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        measure_quality_bars(tmp_path / "model", data, lora=tmp_path / "nope.safetensors")


def test_i2v_motion_says_whether_and_how_much_the_clips_move_against_the_ground_truth():
    truth = [0.5, 1.0, 1.0, 1.0, 1.5]
    rows = [{"flow_magnitude": 0.5 * gt, "flow_magnitude_gt": gt, "sharpness": s, "sharpness_gt": 1.0}
            for gt, s in zip(truth, [1.0, 0.9, 0.5, 1.1, 1.3])]
    motion = i2v_motion(rows)
    assert motion["flow_ratio"] == pytest.approx(0.5)  # every clip moves half as much as its truth
    assert motion["moving"] == pytest.approx(0.2)  # only 0.75 px/frame lies in the truth's 10-90th percentiles
    assert motion["sharpness"] == pytest.approx(1.0) and motion["sharp_share"] == pytest.approx(0.6)
