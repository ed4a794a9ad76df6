"""Baselines on constructed clips where the right in-between frames are known."""

from __future__ import annotations

import numpy as np
import pytest

from rdtf.baselines import (
    BASELINES,
    BASELINES_BY_TASK,
    crossfade,
    flow_interpolation,
    intermediate_flows,
    premultiply,
    repeat_given,
    unpremultiply,
)
from rdtf.cases import EvalCase, NotApplicable
from rdtf.masks import TASKS, mask_from_string
from rdtf.metrics import clip_metrics


def numbered_clip(num_frames: int = 8, size: int = 8) -> np.ndarray:
    """Frame t is a flat opaque grey of value 10 * t: which frame was copied is readable from any pixel."""
    frames = np.zeros((num_frames, size, size, 4), np.uint8)
    frames[..., :3] = (10 * np.arange(num_frames, dtype=np.uint8))[:, None, None, None]
    frames[..., 3] = 255
    return frames


def case(task: str, pattern: str, frames: np.ndarray | None = None) -> EvalCase:
    frames = numbered_clip(len(pattern)) if frames is None else frames
    return EvalCase("clip", task, frames, mask_from_string(pattern))


def source_frames(frames: np.ndarray) -> list[int]:
    return (frames[:, 0, 0, 0] // 10).tolist()


def sprite_clip(num_frames: int = 8, step: int = 3, size: int = 64) -> np.ndarray:
    """A textured disc with an eye and stripes on a transparent background, moving right ``step`` px per frame."""
    yy, xx = np.mgrid[0:size, 0:size]
    frames = np.zeros((num_frames, size, size, 4), np.uint8)
    for t in range(num_frames):
        cx, cy = 14 + step * t, 30
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= 144
        frames[t][inside] = (255, 140, 0, 255)
        frames[t][(xx - cx - 4) ** 2 + (yy - cy + 3) ** 2 <= 9] = (20, 20, 80, 255)
        frames[t][inside & (((xx - cx) // 3) % 2 == 0) & (yy > cy + 4)] = (200, 30, 30, 255)
    return frames


@pytest.mark.parametrize(
    ("task", "pattern", "expected"),
    [
        ("i2v", "10000000", [0] * 8),
        ("i2v", "00010000", [3] * 8),
        ("predict_forward", "11110000", [0, 1, 2, 3, 3, 3, 3, 3]),
        ("predict_backward", "00001111", [4, 4, 4, 4, 4, 5, 6, 7]),
        ("interpolation", "10101010", [0, 0, 2, 2, 4, 4, 6, 6]),  # ties go to the earlier frame
        ("interpolation", "10010010", [0, 0, 3, 3, 3, 6, 6, 6]),
    ],
)
def test_repeat_given_copies_the_nearest_given_frame(task, pattern, expected):
    assert source_frames(repeat_given(case(task, pattern))) == expected


def test_crossfade_is_exact_between_flat_frames():
    out = crossfade(case("interpolation", "10010010"))
    # Between frames 0 and 3 (greys 0 and 30): 10 and 20; between 3 and 6: 40 and 50; after 6: held.
    assert out[:, 0, 0, 0].tolist() == [0, 10, 20, 30, 40, 50, 60, 60]
    assert (out[..., 3] == 255).all()


def test_crossfade_blends_premultiplied_so_transparency_carries_no_colour():
    frames = np.zeros((3, 4, 4, 4), np.uint8)
    frames[0] = (0, 0, 0, 0)  # fully transparent (its colour is meaningless)
    frames[2] = (200, 40, 0, 255)
    out = crossfade(EvalCase("fade", "interpolation", frames, np.array([1, 0, 1])))
    # Half-way: half as opaque, but the colour stays the sticker's colour (no dark fringe).
    assert out[1, 0, 0].tolist() == [200, 40, 0, 128]
    np.testing.assert_array_equal(out[[0, 2]], frames[[0, 2]])


def test_premultiply_round_trip():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)
    frame[..., 3] = 255  # opaque: colours survive exactly
    np.testing.assert_array_equal(unpremultiply(premultiply(frame)), frame)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_every_baseline_copies_given_frames_exactly(name):
    frames = sprite_clip()
    c = EvalCase("sprite", "interpolation", frames, mask_from_string("10101010"))
    out = BASELINES[name](c)
    assert out.shape == frames.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[c.given], frames[c.given])


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baselines_need_a_given_frame(name):
    with pytest.raises(NotApplicable, match="no given frame"):
        BASELINES[name](case("t2v", "00000000"))


def test_baselines_by_task_covers_every_task():
    assert set(BASELINES_BY_TASK) == set(TASKS)
    assert all(set(names) <= set(BASELINES) for names in BASELINES_BY_TASK.values())
    assert BASELINES_BY_TASK["interpolation"] == ("repeat_given", "crossfade", "flow")


def test_intermediate_flows_of_a_uniform_translation():
    d = np.array([4.0, -2.0], np.float32)
    flow_ab = np.broadcast_to(d, (24, 24, 2)).copy()
    flow_ba = -flow_ab
    valid = np.ones((24, 24), np.float32)
    to_a, to_b = intermediate_flows(flow_ab, flow_ba, valid, valid, 0.25)
    interior = (slice(6, -6), slice(6, -6))
    np.testing.assert_allclose(to_a[interior], np.broadcast_to(-0.25 * d, to_a[interior].shape), atol=1e-6)
    np.testing.assert_allclose(to_b[interior], np.broadcast_to(0.75 * d, to_b[interior].shape), atol=1e-6)


@pytest.mark.parametrize(("step", "pattern"), [(2, "10101010"), (3, "10101010"), (2, "10010010")])
def test_flow_recovers_a_translated_sprite_better_than_crossfade(step, pattern):
    frames = sprite_clip(step=step)
    c = EvalCase("sprite", "interpolation", frames, mask_from_string(pattern))
    scores = {name: clip_metrics(BASELINES[name](c), frames, c.condition_mask).scalars for name in BASELINES}
    assert scores["flow"]["psnr"] > scores["crossfade"]["psnr"] + 2.0
    assert scores["flow"]["psnr"] > 20.0
    assert scores["flow"]["iou"] > scores["crossfade"]["iou"]
    assert scores["flow"]["motion_epe"] < scores["crossfade"]["motion_epe"]


def test_flow_on_a_still_clip_is_exact():
    frames = np.repeat(sprite_clip(1), 5, axis=0)
    c = EvalCase("still", "interpolation", frames, mask_from_string("10001"))
    np.testing.assert_array_equal(flow_interpolation(c), frames)
