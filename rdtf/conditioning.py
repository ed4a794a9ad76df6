"""What the UNet sees of the given frames: one function shared by training and sampling.

``image_latents`` of I2VGen-XL carry, per frame, either a given frame's clean latent or a
fill for the frames to generate. A model with the mask channel also reads the condition
mask as one more channel, so it can tell a given frame from a fill. Three fills
(``RDTFConfig.condition_fill``):

* ``position`` (stock I2VGen-XL): a constant plane ``i / (F - 1)``;
* ``interpolate``: the given latents interpolated linearly in time, held beyond the first
  and last given frame (the static sticker for i2v, the repeated frame for prediction, a
  latent cross-fade for interpolation). The model then starts from what the baselines
  would give and learns only the motion on top, which a small model learns far sooner.
  With nothing given (t2v) it falls back to the position plane.
* ``flow``: as ``interpolate``, but the frames between two given frames are the optical-flow
  interpolation of the given pixels (the ``flow`` baseline, :mod:`rdtf.flow_fill`),
  encoded by the VAE: the fill then already moves where flow can see the motion, and the
  model learns what flow misses. The caller encodes them once and passes ``flow_latents``.

What the model denoises (``RDTFConfig.diffusion_space``):

* ``latent`` (stock): the clip's latents;
* ``residual``: the clip's latents minus the fill of its given frames (``interpolate``'s, or
  ``flow``'s with ``flow_latents``; :func:`diffusion_offset`). A model that predicts nothing
  then returns exactly the baselines' fill (the static sticker, the cross-fade or the flow
  interpolation), even from pure noise, so a small model spends none of its capacity
  re-drawing the given sticker and all of it on motion.
  t2v, with nothing given, denoises plain latents in both spaces.
"""

from __future__ import annotations

import torch

CONDITION_FILLS: tuple[str, ...] = ("position", "interpolate", "flow")
DIFFUSION_SPACES: tuple[str, ...] = ("latent", "residual")


def interpolate_given(values: torch.Tensor, condition_mask: torch.Tensor) -> torch.Tensor:
    """``(B, C, F, h, w)`` values at the given frames of a ``(B, F)`` mask → every frame filled as ``interpolate`` does.

    Latents or pixels alike; clips with nothing given come back as zeros.
    """
    given = condition_mask.to(values.device) > 0.5
    batch, _, frames = values.shape[:3]
    index = torch.arange(frames, device=values.device).expand(batch, frames)
    before = torch.where(given, index, -1).cummax(dim=1).values
    after = torch.where(given, index, frames).flip(1).cummin(dim=1).values.flip(1)
    before_or_after = torch.where(before < 0, after, before)
    after_or_before = torch.where(after >= frames, before, after)
    span = (after_or_before - before_or_after).clamp(min=1)
    weight = ((index - before_or_after).clamp(min=0) / span).clamp(max=1).to(values.dtype)

    def frames_at(position: torch.Tensor) -> torch.Tensor:
        gather = position.clamp(0, frames - 1).view(batch, 1, frames, 1, 1).expand_as(values)
        return values.gather(2, gather)

    weight = weight.view(batch, 1, frames, 1, 1)
    filled = (1 - weight) * frames_at(before_or_after) + weight * frames_at(after_or_before)
    nothing_given = ~given.any(dim=1)
    return torch.where(nothing_given.view(batch, 1, 1, 1, 1), torch.zeros_like(filled), filled)


def between_given(condition_mask: torch.Tensor) -> torch.Tensor:
    """``(B, F)`` bool: the frames strictly between two given frames of a ``(B, F)`` mask (the ``flow`` fill's)."""
    given = condition_mask > 0.5
    seen_before = given.int().cummax(dim=1).values.bool()
    seen_after = given.flip(1).int().cummax(dim=1).values.bool().flip(1)
    return seen_before & seen_after & ~given


def filled_latents(
    latents: torch.Tensor, condition_mask: torch.Tensor, flow_latents: torch.Tensor | None = None
) -> torch.Tensor:
    """The given latents interpolated in time, with the frames between two given ones from ``flow_latents`` if given.

    Clips with nothing given come back as zeros.
    """
    filled = interpolate_given(latents, condition_mask)
    if flow_latents is None:
        return filled
    between = between_given(condition_mask.to(latents.device)).view(*condition_mask.shape[:1], 1, -1, 1, 1)
    return torch.where(between, flow_latents.to(filled), filled)


def diffusion_offset(
    latents: torch.Tensor, condition_mask: torch.Tensor, space: str, flow_latents: torch.Tensor | None = None
) -> torch.Tensor:
    """What ``space`` subtracts from ``(B, C, F, h, w)`` clip latents before noising (added back after sampling).

    ``flow_latents``: a ``flow``-fill model's encoded flow frames, so residual space subtracts that fill.
    """
    if space not in DIFFUSION_SPACES:
        raise ValueError(f"diffusion_space={space!r}: expected one of {', '.join(DIFFUSION_SPACES)}")
    return filled_latents(latents, condition_mask, flow_latents) if space == "residual" else torch.zeros_like(latents)


def conditioning_latents(
    latents: torch.Tensor, condition_mask: torch.Tensor, mask_channel: bool, fill: str = "position",
    flow_latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(B, C, F, h, w)`` clean latents + ``(B, F)`` mask → ``(B, C [+1], F, h, w)`` image latents.

    Latents of frames that are not given never reach the result, so callers may pass
    anything (zeros) there. The ``flow`` fill needs ``flow_latents`` where a frame lies between
    two given ones (see :func:`filled_latents`).
    """
    batch, _, frames, height, width = latents.shape
    if condition_mask.shape != (batch, frames):
        raise ValueError(f"condition_mask shape {tuple(condition_mask.shape)} != (batch, frames) = {(batch, frames)}")
    if fill not in CONDITION_FILLS:
        raise ValueError(f"fill={fill!r}: expected one of {', '.join(CONDITION_FILLS)}")
    if fill == "flow" and flow_latents is None and between_given(condition_mask).any():
        raise ValueError("fill='flow' needs flow_latents, the encoded flow interpolation (rdtf.flow_fill)")
    positions = torch.arange(frames, device=latents.device, dtype=latents.dtype) / max(frames - 1, 1)
    mask = condition_mask.to(latents.device, latents.dtype).view(batch, 1, frames, 1, 1)
    filler = positions.view(1, 1, frames, 1, 1).expand_as(latents)
    if fill != "position":  # t2v, with nothing given, keeps the position plane
        nothing_given = (mask <= 0.5).all(dim=2, keepdim=True)
        filler = torch.where(nothing_given, filler, filled_latents(latents, condition_mask, flow_latents))
    image_latents = mask * latents + (1 - mask) * filler
    if mask_channel:
        image_latents = torch.cat([image_latents, mask.expand(batch, 1, frames, height, width)], dim=1)
    return image_latents
