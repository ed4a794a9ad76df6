"""Simple baselines every comparison shows, so a model's numbers mean something.

Each baseline is a method ``(case) -> (F, H, W, 4) uint8`` that fills the frames a case
does not give from the ones it does, and copies given frames unchanged:

- ``repeat_given``: the nearest given frame (ties go to the earlier one). For i2v that is
  the static sticker, for prediction the held last (or first) known frame, for
  interpolation the nearest-frame baseline.
- ``crossfade``: between two given frames, a linear blend in premultiplied RGBA (so
  transparent pixels carry no colour into the blend); outside them, the nearest one.
- ``flow``: between two given frames, optical-flow interpolation: bidirectional OpenCV
  flow, projected to the in-between time, backward warping of both frames and blending
  that trusts each side only where its pixels are not occluded; outside, the nearest.

Blends run on premultiplied RGBA and are unpremultiplied once at the end.
"""

from __future__ import annotations

import numpy as np

from rdtf.cases import EvalCase, Method, NotApplicable
from rdtf.flow import consistent_mask, optical_flow, warp
from rdtf.io import composite_over
from rdtf.metrics import DEFAULT_BACKGROUND

#: Weight a sample keeps even where the occlusion check rejects it, so a pixel that both
#: sides reject is still the time-weighted blend rather than a division by zero.
_OCCLUDED_WEIGHT = 0.05


def premultiply(frame: np.ndarray) -> np.ndarray:
    """``(..., 4)`` uint8 RGBA → float32 premultiplied RGBA in [0, 1]."""
    rgba = frame.astype(np.float32) / 255.0
    rgba[..., :3] *= rgba[..., 3:]
    return rgba


def unpremultiply(rgba: np.ndarray) -> np.ndarray:
    """Inverse of :func:`premultiply`, rounded to uint8 (colour of a fully transparent pixel is 0)."""
    alpha = np.clip(rgba[..., 3:], 0.0, 1.0)
    color = np.divide(rgba[..., :3], alpha, out=np.zeros_like(rgba[..., :3]), where=alpha > 1e-6)
    out = np.concatenate([np.clip(color, 0.0, 1.0), alpha], axis=-1)
    return np.round(out * 255.0).astype(np.uint8)


def _given_or_raise(case: EvalCase) -> np.ndarray:
    given = case.given
    if len(given) == 0:
        raise NotApplicable(f"case {case.key!r} ({case.task}): no given frame to start from")
    return given


def _brackets(given: np.ndarray, index: int) -> tuple[int | None, int | None]:
    """The nearest given frame at or before ``index`` and at or after it (None if absent)."""
    before, after = given[given <= index], given[given >= index]
    return (int(before[-1]) if len(before) else None, int(after[0]) if len(after) else None)


def _nearest(given: np.ndarray, index: int) -> int:
    return int(given[np.argmin(np.abs(given - index))])


def repeat_given(case: EvalCase) -> np.ndarray:
    """Every frame is a copy of the nearest given frame (ties: the earlier one)."""
    given = _given_or_raise(case)
    return case.frames[[_nearest(given, index) for index in range(len(case.frames))]].copy()


def _fill_between(case: EvalCase, inbetween) -> np.ndarray:
    """Copy given frames, fill gaps between two given frames with ``inbetween``, hold the rest.

    ``inbetween(start, end, weights)`` returns the frames strictly between given frames
    ``start`` and ``end``, one per weight ``(t - start) / (end - start)``.
    """
    given = _given_or_raise(case)
    out = case.frames[[_nearest(given, index) for index in range(len(case.frames))]].copy()
    for start, end in zip(given[:-1], given[1:]):
        if end - start > 1:
            weights = (np.arange(start + 1, end) - start) / (end - start)
            out[start + 1 : end] = inbetween(int(start), int(end), weights)
    return out


def crossfade(case: EvalCase) -> np.ndarray:
    """Linear cross-fade (premultiplied RGBA) between consecutive given frames."""

    def blend(start: int, end: int, weights: np.ndarray) -> np.ndarray:
        first, last = premultiply(case.frames[start]), premultiply(case.frames[end])
        return np.stack([unpremultiply((1.0 - w) * first + w * last) for w in weights])

    return _fill_between(case, blend)


def flow_interpolation(case: EvalCase, background: tuple[int, int, int] = DEFAULT_BACKGROUND) -> np.ndarray:
    """Optical-flow interpolation between consecutive given frames (flow measured over ``background``)."""

    def inbetween(start: int, end: int, weights: np.ndarray) -> np.ndarray:
        frame_a, frame_b = case.frames[start], case.frames[end]
        rgb_a, rgb_b = composite_over(np.stack([frame_a, frame_b]), background)
        flow_ab, flow_ba = optical_flow(rgb_a, rgb_b), optical_flow(rgb_b, rgb_a)
        valid_a = consistent_mask(flow_ab, flow_ba).astype(np.float32)
        valid_b = consistent_mask(flow_ba, flow_ab).astype(np.float32)
        pre_a, pre_b = premultiply(frame_a), premultiply(frame_b)
        frames = []
        for w in weights:
            to_a, to_b = intermediate_flows(flow_ab, flow_ba, valid_a, valid_b, float(w))
            weight_a = (1.0 - w) * np.maximum(warp(valid_a, to_a), _OCCLUDED_WEIGHT)
            weight_b = w * np.maximum(warp(valid_b, to_b), _OCCLUDED_WEIGHT)
            blended = weight_a[..., None] * warp(pre_a, to_a) + weight_b[..., None] * warp(pre_b, to_b)
            frames.append(unpremultiply(blended / (weight_a + weight_b)[..., None]))
        return np.stack(frames)

    return _fill_between(case, inbetween)


def intermediate_flows(
    flow_ab: np.ndarray, flow_ba: np.ndarray, valid_a: np.ndarray, valid_b: np.ndarray, w: float
) -> tuple[np.ndarray, np.ndarray]:
    """Flows from the in-between frame at time ``w`` ∈ (0, 1) back to frames a and b.

    Each pixel whose flow passes the occlusion check is carried along its flow to time
    ``w`` (splatted to the nearest pixel, collisions averaged), assuming linear motion;
    occluded pixels are not carried, so a static background never averages into a moving
    subject. Pixels nobody lands on take the Super SloMo approximation
    ``t→a = −(1−w)w·f_ab + w²·f_ba``, ``t→b = (1−w)²·f_ab − w(1−w)·f_ba``.
    """
    height, width = flow_ab.shape[:2]
    pixels = height * width
    sum_to_a = np.zeros((pixels, 2), np.float64)
    sum_to_b = np.zeros((pixels, 2), np.float64)
    count = np.zeros(pixels, np.float64)
    grid_y, grid_x = np.mgrid[0:height, 0:width]
    for flow, valid, travel, to_a_scale, to_b_scale in (
        (flow_ab, valid_a, w, -w, 1.0 - w),
        (flow_ba, valid_b, 1.0 - w, w, -(1.0 - w)),
    ):
        # A pixel of a at p sits at p + w·f_ab at time w; one of b at p + (1−w)·f_ba.
        target_x = np.rint(grid_x + travel * flow[..., 0]).astype(np.int64)
        target_y = np.rint(grid_y + travel * flow[..., 1]).astype(np.int64)
        keep = (valid > 0.5) & (target_x >= 0) & (target_x < width) & (target_y >= 0) & (target_y < height)
        target = (target_y * width + target_x)[keep]
        motion = flow[keep].astype(np.float64)
        for axis in range(2):
            carried = np.bincount(target, weights=motion[:, axis], minlength=pixels)
            sum_to_a[:, axis] += to_a_scale * carried
            sum_to_b[:, axis] += to_b_scale * carried
        count += np.bincount(target, minlength=pixels)
    to_a = -(1.0 - w) * w * flow_ab + w * w * flow_ba
    to_b = (1.0 - w) ** 2 * flow_ab - w * (1.0 - w) * flow_ba
    landed = (count > 0).reshape(height, width)
    counts = count.reshape(height, width, 1)[landed]
    to_a[landed] = (sum_to_a.reshape(height, width, 2)[landed] / counts).astype(np.float32)
    to_b[landed] = (sum_to_b.reshape(height, width, 2)[landed] / counts).astype(np.float32)
    return to_a, to_b


#: Every baseline by name.
BASELINES: dict[str, Method] = {
    "repeat_given": repeat_given,
    "crossfade": crossfade,
    "flow": flow_interpolation,
}

#: The baselines that mean something for each task: blending needs given frames on both
#: sides, so for one-sided tasks crossfade and flow would just repeat ``repeat_given``.
BASELINES_BY_TASK: dict[str, tuple[str, ...]] = {
    "i2v": ("repeat_given",),
    "it2v": ("repeat_given",),
    "t2v": (),
    "interpolation": ("repeat_given", "crossfade", "flow"),
    "predict_forward": ("repeat_given",),
    "predict_backward": ("repeat_given",),
}
