"""Task → condition mask: how one model serves i2v, it2v, t2v, interpolation and prediction.

A condition mask has one entry per output frame: 1 where that frame's clean latent is
given to the model, 0 where the model must generate it. Together with a text on/off flag it
names the task (see DESIGN.md §1). Masks are float tensors of shape ``(F,)`` so they can be
multiplied straight into latents; a batch stacks them to ``(B, F)``.
"""

from __future__ import annotations

import torch

#: Every task the kit trains and samples, and whether it reads the caption.
TASK_USES_TEXT: dict[str, bool] = {
    "i2v": False,
    "it2v": True,
    "t2v": True,
    "interpolation": True,
    "predict_forward": True,
    "predict_backward": True,
}
TASKS: tuple[str, ...] = tuple(TASK_USES_TEXT)


def mask_from_string(pattern: str) -> torch.Tensor:
    """``"10101010"`` → ``tensor([1., 0., 1., ...])``; the CLI's ``--mask`` format."""
    if not pattern or set(pattern) - {"0", "1"}:
        raise ValueError(f"mask {pattern!r}: expected a non-empty string of 0s and 1s, e.g. '10101010'")
    return torch.tensor([float(c) for c in pattern])


def mask_to_string(mask: torch.Tensor) -> str:
    """Inverse of :func:`mask_from_string`, for logs and file names."""
    return "".join("1" if float(v) > 0.5 else "0" for v in mask.reshape(-1))


def interpolation_mask(num_frames: int, stride: int, offset: int = 0) -> torch.Tensor:
    """Every ``stride``-th frame given, starting at ``offset`` (``10101010``, ``01010101``, ``10010010``)."""
    _check_frames(num_frames)
    if stride < 2:
        raise ValueError(f"stride={stride}: interpolation needs stride >= 2 (1 would give every frame)")
    if not 0 <= offset < stride:
        raise ValueError(f"offset={offset}: must be in [0, stride={stride})")
    mask = torch.zeros(num_frames)
    mask[offset::stride] = 1.0
    return mask


def condition_mask(
    task: str,
    num_frames: int,
    *,
    position: int = 0,
    stride: int = 2,
    offset: int = 0,
    num_given: int | None = None,
) -> torch.Tensor:
    """The condition mask of ``task`` over ``num_frames`` frames.

    ``position`` is the given frame of i2v / it2v; ``stride`` / ``offset`` shape
    interpolation; ``num_given`` is the prefix (forward) or suffix (backward) length of
    prediction, half the clip by default.
    """
    _check_frames(num_frames)
    if task not in TASK_USES_TEXT:
        raise ValueError(f"task {task!r}: expected one of {', '.join(TASKS)}")
    mask = torch.zeros(num_frames)
    if task in ("i2v", "it2v"):
        if not 0 <= position < num_frames:
            raise ValueError(f"position={position}: must be in [0, num_frames={num_frames})")
        mask[position] = 1.0
    elif task == "interpolation":
        mask = interpolation_mask(num_frames, stride, offset)
    elif task in ("predict_forward", "predict_backward"):
        given = num_frames // 2 if num_given is None else num_given
        if not 1 <= given < num_frames:
            raise ValueError(f"num_given={given}: prediction needs 1 <= num_given < num_frames={num_frames}")
        if task == "predict_forward":
            mask[:given] = 1.0
        else:
            mask[num_frames - given :] = 1.0
    return mask


def restrict_to_real_frames(cond_mask: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Padding frames (``loss_mask == 0``) are never given as conditions."""
    return cond_mask * loss_mask


def _check_frames(num_frames: int) -> None:
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames}: must be >= 1")
