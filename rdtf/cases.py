"""Evaluation cases and the method contract every model, LoRA and baseline follows.

A method is any callable ``method(case) -> frames`` returning ``(F, H, W, 4)`` uint8 RGBA
of the case's shape, so a fine-tuned pipeline, another LoRA and a two-line baseline
are compared the same way. A method that cannot serve a case (a baseline with no given
frame, say) raises :class:`NotApplicable` and that pair is skipped, not scored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rdtf.masks import TASKS, condition_mask, mask_to_string
from rdtf.metrics import check_frames, check_mask


class NotApplicable(Exception):
    """Raised by a method for a case it cannot serve (e.g. nothing given to copy from)."""


@dataclass
class EvalCase:
    """One ground-truth clip posed as one task.

    ``frames`` is the ground truth ``(F, H, W, 4)`` uint8 RGBA, ``condition_mask`` marks the
    frames a method is given, ``loss_mask`` the real frames (0 = padding, never given and
    never scored). Masks may be passed as torch tensors or lists; they are stored as
    float32 numpy ``(F,)``. ``fps`` is the clip's playback rate.
    """

    key: str
    task: str
    frames: np.ndarray
    condition_mask: np.ndarray
    loss_mask: np.ndarray | None = None
    caption_en: str = ""
    caption_zh: str = ""
    fps: float = 8.0
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"case {self.key!r}"
        if self.task not in TASKS:
            raise ValueError(f"{where}: task {self.task!r} is not one of {', '.join(TASKS)}")
        self.frames = check_frames(self.frames, f"{where} frames")
        num_frames = self.frames.shape[0]
        self.condition_mask = check_mask(self.condition_mask, num_frames, f"{where} condition_mask")
        if self.loss_mask is None:
            self.loss_mask = np.ones(num_frames, np.float32)
        self.loss_mask = check_mask(self.loss_mask, num_frames, f"{where} loss_mask")
        if np.any(self.condition_mask > self.loss_mask):
            raise ValueError(f"{where}: condition_mask gives padding frames (loss_mask 0); use restrict_to_real_frames")
        if not self.fps > 0:
            raise ValueError(f"{where}: fps must be positive, got {self.fps}")

    @property
    def given(self) -> np.ndarray:
        """Indices of the frames a method is given."""
        return np.flatnonzero(self.condition_mask > 0.5)

    @property
    def mask_string(self) -> str:
        """The condition mask as ``"10101010"``, for tables and file names."""
        return mask_to_string(self.condition_mask)


Method = Callable[[EvalCase], np.ndarray]

_NEEDS_TWO_FRAMES = ("interpolation", "predict_forward", "predict_backward")


def cases_for_tasks(
    key: str,
    frames: np.ndarray,
    tasks: Iterable[str] = TASKS,
    *,
    loss_mask: object | None = None,
    caption_en: str = "",
    caption_zh: str = "",
    fps: float = 8.0,
    meta: dict[str, Any] | None = None,
) -> list[EvalCase]:
    """One :class:`EvalCase` per task for one clip, with each task's default condition mask.

    Masks come from :func:`rdtf.masks.condition_mask` defaults (i2v gives frame 0,
    interpolation every second frame, prediction half the clip) laid over the real frames
    only, so padding is never given.
    """
    frames = check_frames(frames, f"case {key!r} frames")
    num_frames = frames.shape[0]
    real = np.ones(num_frames, np.float32) if loss_mask is None else check_mask(loss_mask, num_frames, f"case {key!r} loss_mask")
    real_index = np.flatnonzero(real > 0.5)
    if len(real_index) == 0:
        raise ValueError(f"case {key!r}: loss_mask marks no real frame")
    cases = []
    for task in tasks:
        if task in _NEEDS_TWO_FRAMES and len(real_index) < 2:
            raise ValueError(f"case {key!r}: task {task!r} needs at least 2 real frames, the clip has 1")
        mask = np.zeros(num_frames, np.float32)
        mask[real_index] = condition_mask(task, len(real_index)).numpy()
        cases.append(
            EvalCase(
                key=key,
                task=task,
                frames=frames,
                condition_mask=mask,
                loss_mask=real,
                caption_en=caption_en,
                caption_zh=caption_zh,
                fps=fps,
                meta=dict(meta or {}),
            )
        )
    return cases
