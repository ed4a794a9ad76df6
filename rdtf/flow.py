"""Dense optical flow between two frames, backward warping and occlusion masks.

Shared by the temporal metrics (:mod:`rdtf.metrics`) and the optical-flow interpolation
baseline (:mod:`rdtf.baselines`), so both read motion the same way. Convention:
``flow = optical_flow(a, b)`` gives, per pixel ``(y, x)`` of ``a``, the displacement
``(dx, dy)`` with ``a[y, x] ≈ b[y + dy, x + dx]``; ``warp(b, flow)`` pulls ``b`` back onto
``a``'s pixel grid.
"""

from __future__ import annotations

import cv2
import numpy as np

#: OpenCV flow estimators: DIS (fast, robust on flat cartoon regions) and Farnebäck.
FLOW_METHODS: tuple[str, ...] = ("dis", "farneback")


def to_gray(image: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` RGB uint8 → contiguous ``(H, W)`` uint8, the input OpenCV flow wants."""
    if image.ndim == 2:
        return np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image of shape {image.shape}: expected (H, W) gray or (H, W, 3) RGB")
    return cv2.cvtColor(np.ascontiguousarray(image, dtype=np.uint8), cv2.COLOR_RGB2GRAY)


def optical_flow(src: np.ndarray, dst: np.ndarray, method: str = "dis") -> np.ndarray:
    """Dense flow ``src → dst`` as ``(H, W, 2)`` float32 pixels (x then y component).

    DIS needs frames at least 12 pixels wide or high; smaller ones get Farnebäck.
    """
    if method not in FLOW_METHODS:
        raise ValueError(f"flow method {method!r}: expected one of {', '.join(FLOW_METHODS)}")
    a, b = to_gray(src), to_gray(dst)
    if a.shape != b.shape:
        raise ValueError(f"optical_flow: frames differ in size, {a.shape} vs {b.shape}")
    if method == "dis" and max(a.shape) >= 12:
        return cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM).calc(a, b, None)
    return cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)


def warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Backward warp: ``out[y, x] = image[y + dy, x + dx]`` (bilinear, edges clamped), float32."""
    height, width = flow.shape[:2]
    grid_x, grid_y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    return cv2.remap(
        np.ascontiguousarray(image, dtype=np.float32),
        grid_x + flow[..., 0],
        grid_y + flow[..., 1],
        interpolation=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )


def consistent_mask(flow_fwd: np.ndarray, flow_bwd: np.ndarray) -> np.ndarray:
    """Pixels of the first frame whose forward flow is undone by the backward flow.

    The forward–backward check of Sundaram et al. (2010): where the round trip does not
    come back (within 1% of the motion plus half a pixel) the pixel is occluded or the
    flow is wrong, so metrics and blends should not trust it. Returns ``(H, W)`` bool.
    """
    back = warp(flow_bwd, flow_fwd)
    loop = flow_fwd + back
    round_trip = loop[..., 0] ** 2 + loop[..., 1] ** 2
    scale = flow_fwd[..., 0] ** 2 + flow_fwd[..., 1] ** 2 + back[..., 0] ** 2 + back[..., 1] ** 2
    return round_trip <= 0.01 * scale + 0.5


def flow_length(flow: np.ndarray) -> np.ndarray:
    """Per-pixel length of a ``(..., 2)`` flow field."""
    return np.hypot(flow[..., 0], flow[..., 1])
