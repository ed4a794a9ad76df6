"""What the UNet sees of the given frames: one function shared by training and sampling.

``image_latents`` of I2VGen-XL carry, per frame, either a given frame's clean latent or the
stock position signal (a constant plane ``i / (F - 1)``). A model with the mask channel
also reads the condition mask as a fifth channel, so it can tell a given frame from a plane.
"""

from __future__ import annotations

import torch


def conditioning_latents(latents: torch.Tensor, condition_mask: torch.Tensor, mask_channel: bool) -> torch.Tensor:
    """``(B, 4, F, h, w)`` clean latents + ``(B, F)`` mask → ``(B, 4 [+1], F, h, w)`` image latents.

    Latents of frames that are not given never reach the result, so callers may pass
    anything (zeros) there.
    """
    batch, _, frames, height, width = latents.shape
    if condition_mask.shape != (batch, frames):
        raise ValueError(f"condition_mask shape {tuple(condition_mask.shape)} != (batch, frames) = {(batch, frames)}")
    positions = torch.arange(frames, device=latents.device, dtype=latents.dtype) / max(frames - 1, 1)
    mask = condition_mask.to(latents.device, latents.dtype).view(batch, 1, frames, 1, 1)
    image_latents = mask * latents + (1 - mask) * positions.view(1, 1, frames, 1, 1)
    if mask_channel:
        image_latents = torch.cat([image_latents, mask.expand(batch, 1, frames, height, width)], dim=1)
    return image_latents
