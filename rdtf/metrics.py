"""How close a predicted sticker clip is to its ground truth, and how it moves.

Frames are compared after compositing over one fixed background, so a transparent pixel
and a white one on a white background count as equal — what a viewer sees. Frames the
model was given (condition mask 1) are scored apart from the frames it had to make
(``*_given`` keys): copying the input back is no achievement and must not inflate the
score. Padding frames (loss mask 0) are ignored everywhere.

Reference-free facts about one clip (sharpness, motion, flicker) live in
:class:`ClipAnalysis`, so data-quality bars can use them on any clip; :func:`clip_metrics`
adds the comparisons with the ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import cv2
import numpy as np

from rdtf.flow import consistent_mask, flow_length, optical_flow, to_gray, warp
from rdtf.io import composite_over

#: The fixed background frames are composited over before comparing (white, like a chat).
DEFAULT_BACKGROUND: tuple[int, int, int] = (255, 255, 255)
#: Alpha at or above this counts as inside the sticker for the mask IoU.
ALPHA_THRESHOLD = 128
#: A pixel moves when its flow is at least this long (pixels); used for direction agreement.
MOVING_PIXELS = 0.5

_SSIM_WINDOW, _SSIM_SIGMA = 11, 1.5
_SSIM_C1, _SSIM_C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2


def check_frames(frames: np.ndarray, name: str) -> np.ndarray:
    """Return ``frames`` if it is ``(F, H, W, 4)`` uint8 RGBA, else raise naming ``name``."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 4 or frames.shape[0] < 1:
        raise ValueError(f"{name}: expected RGBA frames of shape (F, H, W, 4), got {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"{name}: expected uint8 frames, got {frames.dtype}")
    return frames


def check_mask(mask: object, num_frames: int, name: str) -> np.ndarray:
    """A per-frame 0/1 mask (numpy, list or torch tensor) as a float32 ``(F,)`` array."""
    values = np.asarray(mask, dtype=np.float32).reshape(-1)
    if values.shape != (num_frames,):
        raise ValueError(f"{name}: expected {num_frames} entries (one per frame), got {values.shape[0]}")
    if not np.all((values == 0) | (values == 1)):
        raise ValueError(f"{name}: entries must be 0 or 1, got {sorted(set(values.tolist()))}")
    return values


def psnr_from_mse(mse: float, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` for identical images (MSE 0)."""
    if mse <= 0:
        return float("inf")
    return float(10.0 * np.log10(data_range**2 / mse))


def frame_mse(pred_rgb: np.ndarray, gt_rgb: np.ndarray) -> np.ndarray:
    """Mean squared error per frame of two ``(F, H, W, C)`` clips → ``(F,)`` float64."""
    diff = pred_rgb.astype(np.float64) - gt_rgb.astype(np.float64)
    return np.mean(diff**2, axis=tuple(range(1, diff.ndim)))


def ssim(pred_rgb: np.ndarray, gt_rgb: np.ndarray) -> float:
    """Structural similarity of two ``(H, W, C)`` uint8 images (Wang et al. 2004).

    Gaussian window 11 × 11, σ = 1.5, K1 = 0.01, K2 = 0.03, averaged over channels; the
    border half-window is dropped as in the reference implementation when the image is
    large enough. Identical images score exactly 1.
    """
    x, y = pred_rgb.astype(np.float64), gt_rgb.astype(np.float64)

    def blur(image: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(image, (_SSIM_WINDOW, _SSIM_WINDOW), _SSIM_SIGMA, borderType=cv2.BORDER_REFLECT)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + _SSIM_C1) * (2 * cov + _SSIM_C2)) / (
        (mu_x * mu_x + mu_y * mu_y + _SSIM_C1) * (var_x + var_y + _SSIM_C2)
    )
    pad = _SSIM_WINDOW // 2
    if min(ssim_map.shape[:2]) > 2 * pad:
        ssim_map = ssim_map[pad:-pad, pad:-pad]
    return float(ssim_map.mean())


def alpha_iou(pred_alpha: np.ndarray, gt_alpha: np.ndarray, threshold: int = ALPHA_THRESHOLD) -> float:
    """Intersection over union of the opaque regions of two alpha planes; 1 when both are empty."""
    pred_in, gt_in = pred_alpha >= threshold, gt_alpha >= threshold
    union = np.count_nonzero(pred_in | gt_in)
    if union == 0:
        return 1.0
    return float(np.count_nonzero(pred_in & gt_in) / union)


def gradient_energy(rgb: np.ndarray) -> np.ndarray:
    """Sharpness per frame: mean squared Sobel gradient of the gray image in [0, 1] → ``(F,)``."""
    energies = []
    for frame in rgb:
        gray = to_gray(frame).astype(np.float32) / 255.0
        grad_x = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3)
        grad_y = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3)
        energies.append(float(np.mean(grad_x**2 + grad_y**2)))
    return np.asarray(energies, dtype=np.float64)


@dataclass(frozen=True)
class ClipAnalysis:
    """Reference-free facts about one clip, computed once and shared by every comparison.

    ``real`` indexes the real (non-padding) frames; flows run between consecutive real
    frames, forward (``t → t+1``) and backward (``t+1 → t``). NaN marks "not measurable"
    (padding frames, or fewer than two real frames for motion).
    """

    rgb: np.ndarray
    alpha: np.ndarray
    real: np.ndarray
    flow_forward: np.ndarray
    flow_backward: np.ndarray
    sharpness: np.ndarray

    @cached_property
    def flow_magnitude(self) -> float:
        """Mean optical-flow length between consecutive real frames, pixels per frame."""
        if len(self.flow_forward) == 0:
            return float("nan")
        return float(np.mean(flow_length(self.flow_forward)))

    @cached_property
    def warp_error(self) -> float:
        """Temporal flicker: mean |frame t+1 − frame t warped along the flow| in [0, 1].

        The flow-warping error of Lai et al. (2018) on the clip's own motion, over pixels
        that pass the forward–backward check (occlusions do not count). 0 for a clip that
        only moves rigidly or holds still; large for flicker and popping.
        """
        if len(self.flow_forward) == 0:
            return float("nan")
        errors = []
        for pair, (prev, nxt) in enumerate(zip(self.real[:-1], self.real[1:])):
            back = self.flow_backward[pair]
            valid = consistent_mask(back, self.flow_forward[pair])
            if not valid.any():
                continue
            pulled = warp(self.rgb[prev], back)
            diff = np.abs(self.rgb[nxt].astype(np.float32) - pulled) / 255.0
            errors.append(float(diff[valid].mean()))
        return float(np.mean(errors)) if errors else float("nan")


def analyse_clip(
    frames: np.ndarray,
    loss_mask: object | None = None,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
    flow_method: str = "dis",
) -> ClipAnalysis:
    """Composite ``frames`` (F, H, W, 4) over ``background`` and measure sharpness and motion."""
    frames = check_frames(frames, "frames")
    num_frames = frames.shape[0]
    real_mask = np.ones(num_frames, np.float32) if loss_mask is None else check_mask(loss_mask, num_frames, "loss_mask")
    real = np.flatnonzero(real_mask > 0.5)
    rgb = composite_over(frames, background)
    pairs = list(zip(real[:-1], real[1:]))
    empty = np.zeros((0, *frames.shape[1:3], 2), np.float32)
    forward = np.stack([optical_flow(rgb[a], rgb[b], flow_method) for a, b in pairs]) if pairs else empty
    backward = np.stack([optical_flow(rgb[b], rgb[a], flow_method) for a, b in pairs]) if pairs else empty
    sharpness = np.full(num_frames, np.nan)
    if len(real):
        sharpness[real] = gradient_energy(rgb[real])
    return ClipAnalysis(rgb, frames[..., 3], real, forward, backward, sharpness)


def motion_agreement(pred: ClipAnalysis, gt: ClipAnalysis) -> dict[str, float]:
    """How alike two clips move: flow endpoint error and magnitude-weighted direction cosine.

    ``motion_epe``: mean length of the difference of the two flow fields (pixels; 0 = same
    motion). ``motion_direction_cos``: Σ f_p·f_g / Σ |f_p||f_g| over pixels where either
    moves — 1 same direction, −1 opposite, NaN when neither moves.
    """
    if len(pred.flow_forward) == 0 or not np.array_equal(pred.real, gt.real):
        return {"motion_epe": float("nan"), "motion_direction_cos": float("nan")}
    f_p, f_g = pred.flow_forward, gt.flow_forward
    epe = float(np.mean(flow_length(f_p - f_g)))
    len_p, len_g = flow_length(f_p), flow_length(f_g)
    moving = (len_p >= MOVING_PIXELS) | (len_g >= MOVING_PIXELS)
    weight = float(np.sum((len_p * len_g)[moving]))
    dot = f_p[..., 0] * f_g[..., 0] + f_p[..., 1] * f_g[..., 1]
    cosine = float(np.sum(dot[moving]) / weight) if weight > 0 else float("nan")
    return {"motion_epe": epe, "motion_direction_cos": cosine}


@dataclass(frozen=True)
class ClipMetrics:
    """Scores of one predicted clip: clip-level ``scalars`` and ``per_frame`` arrays of shape (F,).

    Per-frame arrays hold NaN on padding frames (and on every frame for IoU when the ground
    truth is opaque). ``given`` marks the frames the model was given.
    """

    scalars: dict[str, float]
    per_frame: dict[str, np.ndarray]
    given: np.ndarray


def clip_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    condition_mask: object,
    loss_mask: object | None = None,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
    *,
    flow_method: str = "dis",
    gt_analysis: ClipAnalysis | None = None,
) -> ClipMetrics:
    """Compare ``pred`` with ``gt`` (both ``(F, H, W, 4)`` uint8 RGBA).

    Scalars: ``psnr`` / ``ssim`` / ``iou`` over generated real frames and ``*_given`` over
    given ones (PSNR pools the MSE, so it is ``inf`` only when every scored frame is exact;
    IoU is NaN when the ground truth has no transparency); ``warp_error``,
    ``flow_magnitude`` and ``sharpness`` of the prediction and the same with ``_gt`` for the
    ground truth; ``motion_epe`` and ``motion_direction_cos`` between the two motions.
    Pass ``gt_analysis`` (from :func:`analyse_clip`) to reuse the ground truth's flows
    across methods.
    """
    gt = check_frames(gt, "gt")
    pred = check_frames(pred, "pred")
    if pred.shape != gt.shape:
        raise ValueError(f"pred: shape {pred.shape} differs from the ground truth's {gt.shape}")
    num_frames = gt.shape[0]
    given_mask = check_mask(condition_mask, num_frames, "condition_mask")
    real_mask = np.ones(num_frames, np.float32) if loss_mask is None else check_mask(loss_mask, num_frames, "loss_mask")
    if gt_analysis is None:
        gt_analysis = analyse_clip(gt, real_mask, background, flow_method)
    elif gt_analysis.rgb.shape[:3] != gt.shape[:3] or not np.array_equal(gt_analysis.real, np.flatnonzero(real_mask > 0.5)):
        raise ValueError("gt_analysis: was computed for a different clip or loss mask")
    pred_analysis = analyse_clip(pred, real_mask, background, flow_method)

    real = real_mask > 0.5
    given = real & (given_mask > 0.5)
    generated = real & ~given
    mse = frame_mse(pred_analysis.rgb, gt_analysis.rgb)
    per_frame = {
        "psnr": np.where(real, [psnr_from_mse(m) for m in mse], np.nan),
        "ssim": np.full(num_frames, np.nan),
        "iou": np.full(num_frames, np.nan),
        "sharpness": pred_analysis.sharpness,
        "sharpness_gt": gt_analysis.sharpness,
    }
    has_transparency = bool(real.any() and gt[real, ..., 3].min() < 255)
    for index in np.flatnonzero(real):
        per_frame["ssim"][index] = ssim(pred_analysis.rgb[index], gt_analysis.rgb[index])
        if has_transparency:
            per_frame["iou"][index] = alpha_iou(pred[index, ..., 3], gt[index, ..., 3])

    scalars: dict[str, float] = {}
    for suffix, selected in (("", generated), ("_given", given)):
        scalars["psnr" + suffix] = psnr_from_mse(float(mse[selected].mean())) if selected.any() else float("nan")
        scalars["ssim" + suffix] = _mean_or_nan(per_frame["ssim"][selected])
        scalars["iou" + suffix] = _mean_or_nan(per_frame["iou"][selected])
    scalars.update(
        warp_error=pred_analysis.warp_error,
        warp_error_gt=gt_analysis.warp_error,
        flow_magnitude=pred_analysis.flow_magnitude,
        flow_magnitude_gt=gt_analysis.flow_magnitude,
        sharpness=_mean_or_nan(pred_analysis.sharpness[real]),
        sharpness_gt=_mean_or_nan(gt_analysis.sharpness[real]),
        **motion_agreement(pred_analysis, gt_analysis),
    )
    return ClipMetrics(scalars, per_frame, given)


def _mean_or_nan(values: np.ndarray) -> float:
    return float(np.mean(values)) if len(values) and not np.all(np.isnan(values)) else float("nan")
