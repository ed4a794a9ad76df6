"""The built-in sticker set: art, motions, captions, sampling, splits and byte-identical builds."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from collections import Counter
from itertools import product
from pathlib import Path

import numpy as np
import pytest

from rdtf.emoji_names import EMOJI
from rdtf.io import read_clip
from rdtf.synthetic import (
    AMPLITUDE_FACTORS,
    BACKGROUNDS,
    FPS_CHOICES,
    MOTION_KINDS,
    MOTIONS,
    SPEEDS,
    SPLITS,
    GlyphError,
    StickerSpec,
    build_sticker_set,
    emoji_splits,
    is_learnable,
    motion_pose,
    render_motion,
    render_sticker,
    render_still,
    sample_specs,
    spec_for,
)

CJK = re.compile(r"[\u4e00-\u9fff]")
SIZE = 32  # small canvas keeps the render-heavy tests fast; the geometry is size-independent


def emoji(char: str):
    return next(e for e in EMOJI if e.char == char)


SNAIL = emoji("🐌")  # left-right asymmetric, so a mirrored or half-turned frame differs from the rest pose
GIFT = emoji("🎁")  # fills its square box: the worst case for staying inside the canvas
BUS = emoji("🚌")  # wide and flat


def all_variants(motion: str):
    """Every (speed, amplitude, direction) the motion takes."""
    kind = MOTION_KINDS[motion]
    amplitudes = AMPLITUDE_FACTORS if kind.base_amplitude is not None else ["normal"]
    return product(SPEEDS, amplitudes, kind.directions)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def alpha_centroid(frame: np.ndarray) -> np.ndarray:
    alpha = frame[..., 3].astype(float)
    ys, xs = np.indices(alpha.shape)
    return np.array([(xs * alpha).sum(), (ys * alpha).sum()]) / alpha.sum()


# ----------------------------------------------------------------------------- art


def test_every_curated_emoji_renders_a_real_glyph_and_has_unique_names():
    assert len(EMOJI) >= 120
    for field in ("char", "en", "zh"):
        values = [getattr(e, field) for e in EMOJI]
        assert len(set(values)) == len(values), f"duplicate {field}"
    for e in EMOJI:
        still = render_still(e.char, size=SIZE)
        assert (still[..., 3] > 127).sum() >= 20, f"{e.char} {e.en}: renders (nearly) empty"
        assert CJK.search(e.zh) and CJK.search(e.measure_zh), e


def test_missing_glyph_is_a_clear_error():
    with pytest.raises(GlyphError, match="no glyph"):
        render_still("\u0378")
    with pytest.raises(ValueError, match="background"):
        render_still("😀", background="plaid")


# ----------------------------------------------------------------------------- motions


@pytest.mark.parametrize("motion", MOTIONS)
def test_first_frame_is_the_rest_pose_and_every_variant_moves(motion):
    still = render_still(SNAIL.char, SIZE)
    clips = []
    for speed, amplitude, direction in all_variants(motion):
        fields = dict(speed=speed, amplitude=amplitude, direction=direction, num_frames=10, fps=16.0, size=SIZE)
        spec = spec_for(SNAIL, motion, **fields)
        assert np.array_equal(motion_pose(spec, 0.0), np.eye(2, 3))
        frames = render_sticker(spec).frames
        assert np.array_equal(frames[0], still), f"{spec}: frame 0 is not the rest pose"
        assert max(max_abs_diff(f, still) for f in frames[1:]) > 100, f"{spec}: does not visibly move"
        clips.append(frames.tobytes())
    assert len(set(clips)) == len(clips), "two variants of one motion render the same clip"


def test_motions_differ_from_each_other():
    clips = {m: render_motion(spec_for(SNAIL, m, size=SIZE), 12, 12.0).frames.tobytes() for m in MOTIONS}
    assert len(set(clips.values())) == len(MOTIONS)


@pytest.mark.parametrize("motion", MOTIONS)
def test_sprite_stays_inside_the_canvas(motion):
    for art, (_, amplitude, direction) in product((GIFT, BUS), all_variants(motion)):
        spec = spec_for(art, motion, amplitude=amplitude, direction=direction, size=SIZE)
        cycle_s = 1 / spec.frequency_hz
        frames = render_motion(spec, 33, 32 / cycle_s).frames  # one full cycle, 32 steps
        alpha = frames[..., 3]
        border = np.concatenate([alpha[:, 0], alpha[:, -1], alpha[:, :, 0], alpha[:, :, -1]], axis=1)
        assert border.max() == 0, f"{spec}: sprite touches the canvas edge"


def first_return_to_rest(frames: np.ndarray) -> int:
    """Index of the first frame back at the rest pose (to float rounding) after the sticker has clearly moved."""
    moved = False
    for index, frame in enumerate(frames[1:], start=1):
        moved |= max_abs_diff(frame, frames[0]) > 50
        if moved and np.abs(frame.astype(int) - frames[0].astype(int)).mean() < 0.01:
            return index
    raise AssertionError("never returned to the rest pose")


@pytest.mark.parametrize("motion", MOTIONS)
def test_speed_levels_set_the_rate(motion):
    returns = {}
    for speed in SPEEDS:
        spec = spec_for(SNAIL, motion, speed=speed, size=SIZE)
        slowest_cycle_frames = round(24 / spec_for(SNAIL, motion, speed="slow").frequency_hz)
        returns[speed] = first_return_to_rest(render_motion(spec, slowest_cycle_frames + 2, 24.0).frames)
    assert returns["slow"] == 2 * returns["normal"] == 4 * returns["fast"], returns


@pytest.mark.parametrize(("motion", "axis"), [("bounce", 1), ("shake", 0), ("slide", 0), ("float", 1)])
def test_amplitude_levels_set_the_distance_moved(motion, axis):
    peak_cycles = MOTION_KINDS[motion].peak_cycles
    for amplitude in AMPLITUDE_FACTORS:
        spec = spec_for(SNAIL, motion, amplitude=amplitude, size=64)
        peak = render_motion(spec, 2, spec.frequency_hz / peak_cycles).frames  # frame 1 is the first extreme
        moved = alpha_centroid(peak[1]) - alpha_centroid(peak[0])
        assert abs(abs(moved[axis]) - spec.amplitude_value * 64) < 0.15, (amplitude, moved)
        assert abs(moved[1 - axis]) < 0.05


def test_amplitude_levels_set_the_size_of_rotations_and_scalings():
    for motion in ("pulse", "wobble", "squash", "swing"):
        change = []
        for amplitude in AMPLITUDE_FACTORS:
            spec = spec_for(SNAIL, motion, amplitude=amplitude, size=SIZE)
            frames = render_motion(spec, 9, 32 * spec.frequency_hz).frames  # a quarter cycle
            change.append(np.abs(frames[-1].astype(int) - frames[0].astype(int)).mean())
        assert change[0] < change[1] < change[2], (motion, change)
    pulse = spec_for(SNAIL, "pulse", amplitude="large", size=64)
    frames = render_motion(pulse, 2, 2 * pulse.frequency_hz).frames  # half a cycle: the largest size
    area_ratio = frames[1, ..., 3].sum() / frames[0, ..., 3].sum()
    assert area_ratio == pytest.approx((1 + pulse.amplitude_value) ** 2, rel=0.02)


def test_spin_direction_and_pivots():
    clockwise = spec_for(SNAIL, "spin")
    counter = spec_for(SNAIL, "spin", direction="counterclockwise")
    quarter = 0.25 / clockwise.frequency_hz
    # y is down: a clockwise quarter turn takes the point right of centre to below it.
    assert motion_pose(clockwise, quarter) @ [0.75, 0.5, 1] == pytest.approx([0.5, 0.75])
    assert motion_pose(counter, quarter) @ [0.75, 0.5, 1] == pytest.approx([0.5, 0.25])
    rows = np.flatnonzero(render_still(GIFT.char, 64)[..., 3].any(axis=1))
    top, bottom = rows[0] / 64, (rows[-1] + 1) / 64  # the art's edges at rest, canvas fractions
    squash = spec_for(GIFT, "squash")
    stretched = motion_pose(squash, 0.25 / squash.frequency_hz)  # the tallest moment
    assert (stretched @ [0.5, bottom, 1])[1] == pytest.approx(bottom, abs=1 / 64)  # stands on its bottom
    assert (stretched @ [0.5, top, 1])[1] == pytest.approx(bottom - (bottom - top) * 1.15, abs=1 / 64)
    swing = spec_for(GIFT, "swing")
    tilted = motion_pose(swing, 0.25 / swing.frequency_hz)
    assert tilted @ [0.5, top, 1] == pytest.approx([0.5, top], abs=1 / 64)  # hangs from its top
    assert abs((tilted @ [0.5, bottom, 1])[0] - 0.5) > 0.1


def test_other_frame_rates_sample_the_same_motion():
    spec = spec_for(SNAIL, "wobble", speed="fast", num_frames=8, fps=6.0, size=SIZE)
    sticker = render_sticker(spec)
    denser = render_motion(spec, 15, 12.0)
    assert np.array_equal(denser.frames[::2], sticker.frames)
    assert sticker.total_ms == round(1000 * 8 / 6) and denser.total_ms == round(1000 * 15 / 12)
    assert sticker.fps == pytest.approx(6.0, rel=0.01)


# ----------------------------------------------------------------------------- captions


def test_caption_examples():
    spec = spec_for(emoji("😀"), "bounce", speed="fast")
    assert spec.caption_en == "a grinning face bouncing up and down quickly"
    assert spec.caption_zh == "一个咧嘴笑的脸快速地上下弹跳"
    spec = spec_for(emoji("🐱"), "spin", speed="slow", direction="counterclockwise")
    assert spec.caption_en == "a kitten spinning counterclockwise slowly"
    assert spec.caption_zh == "一只小猫慢慢地逆时针旋转"
    spec = spec_for(emoji("🦉"), "shake", amplitude="small")
    assert (spec.caption_en, spec.caption_zh) == ("an owl shaking slightly", "一只猫头鹰轻微地抖动")
    assert spec_for(emoji("🦄"), "float").caption_en.startswith("a unicorn ")
    assert spec_for(emoji("🍦"), "float").caption_en.startswith("an ice cream cone ")


def test_modifier_words_appear_only_when_not_default():
    kitten = emoji("🐱")
    for speed, amplitude in product(SPEEDS, AMPLITUDE_FACTORS):
        spec = spec_for(kitten, "bounce", speed=speed, amplitude=amplitude)
        en, zh = spec.caption_en, spec.caption_zh
        assert ("quickly" in en) == ("快速" in zh) == (speed == "fast")
        assert ("slowly" in en) == ("慢慢" in zh) == (speed == "slow")
        assert ("slightly" in en) == ("轻微" in zh) == (amplitude == "small")
        assert ("strongly" in en) == ("大幅" in zh) == (amplitude == "large")
        assert "normal" not in en
    default_spin = spec_for(kitten, "spin")
    assert default_spin.direction == "clockwise" and "clockwise" not in default_spin.caption_en
    assert "时针" not in default_spin.caption_zh


def test_captions_name_every_variant_uniquely_and_identically_for_equal_fields():
    captions = {}
    for motion in MOTIONS:
        for speed, amplitude, direction in all_variants(motion):
            fields = dict(speed=speed, amplitude=amplitude, direction=direction)
            spec = spec_for(SNAIL, motion, **fields)
            again = spec_for(SNAIL, motion, **fields, num_frames=3, fps=11.0, background="mint")
            assert (spec.caption_en, spec.caption_zh) == (again.caption_en, again.caption_zh)
            captions[(motion, speed, amplitude, direction)] = (spec.caption_en, spec.caption_zh)
    for language in (0, 1):
        texts = [c[language] for c in captions.values()]
        assert len(set(texts)) == len(texts), "two different motions share a caption"


def test_spec_rejects_bad_fields_and_round_trips_records():
    with pytest.raises(ValueError, match="motion 'dance'"):
        spec_for(SNAIL, "dance")
    with pytest.raises(ValueError, match="speed"):
        spec_for(SNAIL, "bounce", speed="warp")
    with pytest.raises(ValueError, match="direction 'left'"):
        spec_for(SNAIL, "spin", direction="left")
    with pytest.raises(ValueError, match="no size to vary"):
        spec_for(SNAIL, "flip", amplitude="large")
    with pytest.raises(ValueError, match="background"):
        spec_for(SNAIL, "bounce", background="plaid")
    with pytest.raises(ValueError, match="fps"):
        spec_for(SNAIL, "bounce", fps=0)
    spec = spec_for(SNAIL, "slide", direction="up", speed="fast", num_frames=5, fps=9.0, background="sky", size=SIZE)
    assert StickerSpec.from_record(spec.to_record(), size=SIZE) == spec
    with pytest.raises(ValueError, match="missing"):
        StickerSpec.from_record({"emoji": "🐌"})


# ----------------------------------------------------------------------------- sampling


def test_splits_are_by_emoji_and_seeded():
    splits = emoji_splits()
    members = [e for name in SPLITS for e in splits[name]]
    assert sorted(members) == sorted(EMOJI)
    assert [len(splits[name]) / len(EMOJI) for name in SPLITS] == pytest.approx([0.8, 0.1, 0.1], abs=0.01)
    assert emoji_splits(0) == splits and emoji_splits(1) != splits
    samples = sample_specs(400)
    used = {name: {s.spec.emoji for s in samples if s.split == name} for name in SPLITS}
    assert all(used.values())
    assert not (used["train"] & used["val"] or used["train"] & used["test"] or used["val"] & used["test"])
    split_of = {e.char: name for name, group in splits.items() for e in group}
    assert all(s.split == split_of[s.spec.emoji] for s in samples)


def test_holdout_motion_is_flagged_and_keeps_its_split():
    samples = sample_specs(600)
    assert all(s.heldout == (s.spec.motion == "spin") for s in samples)
    assert {s.split for s in samples if s.heldout} == set(SPLITS)
    assert all(s.to_record()["heldout"] == s.heldout for s in samples)
    flip_held = sample_specs(50, holdout_motion="flip")
    assert {s.spec.motion for s in flip_held if s.heldout} == {"flip"}
    assert not any(s.heldout for s in sample_specs(50, holdout_motion=None))
    with pytest.raises(ValueError, match="holdout_motion"):
        sample_specs(5, holdout_motion="dance")


def test_sampled_clips_have_long_tailed_lengths_varied_fps_and_both_backgrounds():
    samples = sample_specs(3000, seed=3)
    counts = Counter(s.spec.num_frames for s in samples)
    assert min(counts) >= 2 and max(counts) <= 24
    assert counts.most_common(1)[0][0] == 8 and counts[8] / len(samples) > 0.3
    assert sum(n for f, n in counts.items() if f >= 16) / len(samples) > 0.03  # long tail
    assert any(f >= 20 for f in counts) and any(f <= 3 for f in counts)
    assert {s.spec.fps for s in samples} == set(map(float, FPS_CHOICES))
    assert all(is_learnable(s.spec.motion, s.spec.speed, s.spec.num_frames, s.spec.fps) for s in samples)
    assert Counter(s.spec.motion for s in samples).keys() == set(MOTIONS)
    backgrounds = Counter(s.spec.background for s in samples)
    assert backgrounds.keys() == set(BACKGROUNDS)
    assert 0.4 < backgrounds["transparent"] / len(samples) < 0.6
    emoji_uses = Counter(s.spec.emoji for s in samples)
    assert max(emoji_uses.values()) - min(emoji_uses.values()) <= 1  # every emoji used evenly


def test_learnability_rule():
    # shake at 2 Hz: 8 fps is exactly 4 frames a cycle; the peak comes after 1/8 s.
    assert is_learnable("shake", "normal", 2, 8.0)
    assert not is_learnable("shake", "normal", 8, 7.0)  # too few frames per cycle
    assert not is_learnable("spin", "slow", 4, 6.0)  # a quarter turn at 0.25 Hz needs 1 s


def test_flat_and_transparent_backgrounds_render_as_named():
    transparent = render_sticker(spec_for(SNAIL, "float", size=SIZE)).frames
    assert transparent[:, 0, 0, 3].max() == 0 and transparent[..., 3].max() == 255
    mint = render_sticker(spec_for(SNAIL, "float", background="mint", size=SIZE)).frames
    assert (mint[..., 3] == 255).all()
    assert tuple(mint[0, 0, 0, :3]) == BACKGROUNDS["mint"]


def test_sampling_is_deterministic_and_validated():
    assert sample_specs(60, seed=5) == sample_specs(60, seed=5)
    assert sample_specs(60, seed=5) != sample_specs(60, seed=6)
    with pytest.raises(ValueError, match="count"):
        sample_specs(0)


# ----------------------------------------------------------------------------- building


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_builds_byte_identical_sets_and_other_seeds_differ(tmp_path):
    first = build_sticker_set(tmp_path / "a", count=24, size=SIZE, seed=7, progress=False)
    second = build_sticker_set(tmp_path / "b", count=24, size=SIZE, seed=7, progress=False)
    other = build_sticker_set(tmp_path / "c", count=24, size=SIZE, seed=8, progress=False)
    fresh_process = tmp_path / "d"  # no caches shared with this process
    code = (
        "from rdtf.synthetic import build_sticker_set\n"
        f"build_sticker_set({str(fresh_process)!r}, count=24, size={SIZE}, seed=7, progress=False)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
    assert tree_bytes(first) == tree_bytes(second) == tree_bytes(fresh_process)
    assert tree_bytes(first)["captions.jsonl"] != tree_bytes(other)["captions.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c", "d"]  # no staging folders left


#: The pixels of ``build_sticker_set(count=24, size=64, seed=0)``, as rendered when rdtf-tiny's data was built
#: (its manifest hash 98bf62716b317bba). OpenCV 4.x renders f9f7fab0542a5ca3 and 5.1 a76634d672034fd2 instead:
#: warpAffine's rounding moved, and with it every moving frame of the set a model is trained and scored on.
BUILT_IN_PIXELS = "66cddee0f2166f7e"


def test_the_built_in_set_renders_the_pixels_rdtf_tiny_was_trained_on(tmp_path):
    import cv2
    import PIL

    root = build_sticker_set(tmp_path / "set", count=24, size=64, seed=0, progress=False)
    digest = hashlib.sha256()
    for line in (root / "captions.jsonl").read_text(encoding="utf-8").splitlines():
        digest.update(np.ascontiguousarray(read_clip(root / json.loads(line)["file"]).frames).tobytes())
    assert digest.hexdigest()[:16] == BUILT_IN_PIXELS, (
        f"the built-in set renders other pixels under OpenCV {cv2.__version__} and Pillow {PIL.__version__} than the "
        "data rdtf-tiny was trained on: install the versions pyproject.toml asks for")


def test_built_set_layout_records_and_files(tmp_path):
    out = build_sticker_set(tmp_path / "set", count=12, size=SIZE, seed=1, progress=False)
    lines = (out / "captions.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 12 and "\\u" not in lines[0]  # UTF-8, not escaped
    expected_fields = {
        "file", "caption_en", "caption_zh", "emoji", "subject_en", "subject_zh", "motion", "speed",
        "amplitude", "direction", "fps", "num_frames", "background", "split", "heldout",
    }  # fmt: skip
    assert all(set(r) == expected_fields for r in records)
    assert sorted(p.name for p in (out / "stickers").iterdir()) == sorted(Path(r["file"]).name for r in records)
    manifest = json.loads((out / "set.json").read_text(encoding="utf-8"))
    assert (manifest["seed"], manifest["count"], manifest["size"], manifest["holdout_motion"]) == (1, 12, SIZE, "spin")
    assert "OpenMoji" in manifest["attribution"] and sum(manifest["splits"].values()) == 12
    for record in records[:3]:
        clip = read_clip(out / record["file"])
        assert CJK.search(record["caption_zh"])
        assert clip.num_frames == record["num_frames"] and clip.fps == pytest.approx(record["fps"], rel=0.01)
        expected = render_sticker(StickerSpec.from_record(record, size=manifest["size"]))
        assert np.array_equal(clip.frames, expected.frames)  # lossless: the files are the ground truth


def test_build_reuses_replaces_and_refuses(tmp_path):
    out = build_sticker_set(tmp_path / "set", count=6, size=SIZE, progress=False)
    sticker = next((out / "stickers").iterdir())
    stamp = sticker.stat().st_mtime_ns
    build_sticker_set(out, count=6, size=SIZE, progress=False)
    assert sticker.stat().st_mtime_ns == stamp  # same arguments: reused, not rebuilt
    build_sticker_set(out, count=4, size=SIZE, progress=False)
    assert len(list((out / "stickers").iterdir())) == 4  # its own older set: replaced
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        build_sticker_set(foreign, count=2, size=SIZE, progress=False)
    assert (foreign / "holiday.jpg").read_bytes() == b"not ours"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (build_sticker_set(empty, count=2, size=SIZE, progress=False) / "set.json").is_file()


def test_small_sets_draw_from_every_split():
    """Regression: the split shuffle once shared its seed with the sampling order, so
    sample_specs(60) took all its emoji from the train split."""
    counts = {split: 0 for split in SPLITS}
    for sample in sample_specs(60):
        counts[sample.split] += 1
    assert counts["val"] > 0 and counts["test"] > 0
