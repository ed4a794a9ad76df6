"""The shipped rdtf-tiny still meets a reduced version of its quality bars on a few held-out clips.

The full bars (``assets/rdtf-tiny/evaluation/quality_bars.md``) run ``rdtf bars`` on the
test split of the build set; here a fresh small set is rendered (its test
split holds the same held-out emoji, whatever the count) and a handful of clips is
scored per task against the same baselines, with smaller margins, fast enough for CI.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from built_in import built_in_dataset

from rdtf.bars import BarSettings, task_bars, text_control_bars
from rdtf.data import StickerDataset
from rdtf.notebooks import kit_root
from rdtf.pipeline import RDTFPipeline
from rdtf.tiny import TinyRecipe, phase_runs, record_prefix

REDUCED_CLIPS = 3
#: (bar, smallest measured value accepted here). rdtf-tiny v6 meets the i2v motion, sharpness and
#: given-frame bars and the 2x-interpolation-vs-cross-fade bar (see its quality_bars.md: +1.53 dB on the
#: test split). Its flow fill puts interpolation within 0.1 dB of the optical-flow baseline; it2v (from
#: pure noise) and prediction (from strength 0.2) stay near their baselines, so those bars are regression
#: guards below what was measured here on 3 clips (interpolation 2x +1.92 and 4x +1.22 vs cross-fade, 2x
#: -0.11 vs flow; it2v +0.98, prediction forward -0.03 dB; i2v, from its own 35 steps at strength 0.97,
#: sharpness 0.94). Whether i2v moves like a sticker is a share of clips: 3 clips cannot guard it
#: (1 of these 3 moves inside the ground truth's range; 92.5% of the 40 test clips do).
REDUCED_BARS: list[tuple[str, float]] = [
    ("i2v sharpness (gradient energy / ground truth's, median clip)", 0.8),
    ("it2v PSNR vs the static sticker", -0.5),
    ("interpolation 2x vs cross-fade", 1.0),  # the full bar
    ("interpolation 4x vs cross-fade", 0.5),
    ("interpolation 2x vs optical flow", -0.5),
    ("predict forward vs repeating the nearest frame", -0.5),
]
MODEL = kit_root() / "assets" / "rdtf-tiny"
LORA = kit_root() / "assets" / "rdtf-tiny-lora-spin"


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> StickerDataset:
    root = tmp_path_factory.mktemp("embedded")
    built_in_dataset(root, count=150, size=64, seed=11)
    return StickerDataset(root / "data", split="test", predicate=lambda row: row["motion"] != "spin")


@pytest.fixture(scope="module")
def bars(held_out) -> dict[str, dict]:
    pipe = RDTFPipeline.from_pretrained(MODEL)
    settings = BarSettings(clips=REDUCED_CLIPS)  # the model's recommended settings, per task
    measured, _ = task_bars(pipe, held_out, settings, progress=False)
    return {bar["bar"]: bar for bar in measured}


def test_the_shipped_model_is_small_safetensors_with_its_training_record():
    weights = list(MODEL.rglob("*.safetensors")) + list(LORA.rglob("*.safetensors"))
    assert not list(MODEL.rglob("*.bin")) and not list(MODEL.rglob("*.pt"))
    assert sum(path.stat().st_size for path in MODEL.rglob("*") if path.is_file()) <= 25 * 2**20
    assert len(weights) >= 5
    recipe = json.loads((MODEL / "training" / "rdtf_recipe.json").read_text())
    # plain `rdtf build-tiny` rebuilds what ships; fields newer than the record keep what it was built with
    assert {**TinyRecipe().to_dict(), **recipe} == TinyRecipe().to_dict()
    assert json.loads((MODEL / "training" / "rdtf_card.json").read_text())["steps"] == recipe["unet_steps"]
    assert (MODEL / "evaluation" / "quality_bars.json").is_file()


def _margin(bars: dict[str, dict], name: str) -> float:
    return bars[name]["measured"]


@pytest.mark.parametrize(("bar", "at_least"), REDUCED_BARS)
def test_a_reduced_bar_holds_on_a_few_held_out_clips(bars, bar, at_least):
    assert _margin(bars, bar) >= at_least, bars[bar]


def test_the_given_frame_is_kept_exactly(bars):
    assert bars["i2v keeps the given frame (worst clip PSNR)"]["passed"]


def test_the_default_it2v_follows_its_caption_in_both_languages(held_out):
    """v6's defaults picked the caption of 11 of 12 clips here in each language (chance: 3 of 12)."""
    bars = text_control_bars(RDTFPipeline.from_pretrained(MODEL), held_out, BarSettings(text_control_images=3),
                             progress=False)
    assert [bar["measured"] >= 0.5 for bar in bars] == [True, True], bars


def test_the_shipped_lora_loads_onto_the_shipped_model():
    from rdtf.lora import load_lora

    pipe = RDTFPipeline.from_pretrained(MODEL)
    assert load_lora(pipe, Path(LORA)) in pipe.components.unet.peft_config


def test_the_shipped_lora_is_what_the_recipe_trains():
    from rdtf.lora import LORA_PRESETS

    recipe = TinyRecipe()
    config = json.loads((LORA / "rdtf_card.json").read_text())["config"]
    assert config["only_motions"] == [recipe.holdout_motion]
    assert (config["max_steps"], config["lora_rank"], config["learning_rate"]) == (
        recipe.lora_steps, recipe.lora_rank, recipe.lora_learning_rate)
    assert config["lora_targets"] == LORA_PRESETS[recipe.lora_targets]
    assert config["mixed_precision"] == recipe.lora_mixed_precision  # on any machine, not the base's CPU choice
    # its stamp names the shipped model's last training phase, so `build-tiny --from-model` adopts it
    stamp = json.loads((LORA / "lora_stage.json").read_text())
    last_phase = record_prefix(phase_runs(Path(), recipe)[-1])
    assert stamp["base_card"] == json.loads((MODEL / "training" / f"{last_phase}rdtf_card.json").read_text())
    assert stamp["settings"] == recipe.lora_settings()
