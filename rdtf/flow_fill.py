"""The ``flow`` condition fill: frames between two given ones drawn by optical flow, then encoded.

A model saved with ``condition_fill="flow"`` starts every frame between two given frames
from the ``flow`` baseline of :mod:`rdtf.baselines` (bidirectional flow, occlusion-aware
blend) instead of a latent cross-fade. In residual space it then learns only what flow gets
wrong, and predicting nothing returns the flow interpolation itself. Training and sampling
both draw the fill here, from the given frames' pixels, so they see the same fill.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL

from rdtf.baselines import flow_interpolation
from rdtf.cases import EvalCase
from rdtf.conditioning import between_given
from rdtf.models import encode_frames, frames_to_pixels


def flow_filled_frames(frames: np.ndarray, condition_mask: np.ndarray) -> np.ndarray:
    """``(F, H, W, 3)`` uint8 clip → the same with every frame not given filled by the flow baseline.

    Only the given frames are read. Frames between two given ones are flow-interpolated,
    the others hold the nearest given frame; with nothing given, there is nothing to fill from.
    """
    if not np.any(np.asarray(condition_mask) > 0.5):
        raise ValueError("flow fill: the condition mask gives no frame to fill from")
    opaque = np.full((*frames.shape[:-1], 1), 255, np.uint8)
    case = EvalCase(key="flow-fill", task="interpolation", frames=np.concatenate([frames, opaque], axis=-1),
                    condition_mask=condition_mask)
    return flow_interpolation(case)[..., :3]


def encode_clips(vae: AutoencoderKL, clips: np.ndarray) -> torch.Tensor:
    """``(B, F, H, W, 3)`` uint8 clips → ``(B, C, F, h, w)`` float32 latents (on the VAE's device)."""
    batch, num_frames = clips.shape[:2]
    with torch.no_grad():
        latents = encode_frames(vae, frames_to_pixels(clips.reshape(-1, *clips.shape[2:]))).float()
    return latents.view(batch, num_frames, *latents.shape[1:]).permute(0, 2, 1, 3, 4)


def flow_fill_latents(vae: AutoencoderKL, frames: np.ndarray, condition_mask: torch.Tensor) -> torch.Tensor:
    """``(B, F, H, W, 3)`` uint8 clips + ``(B, F)`` masks → ``(B, C, F, h, w)`` latents of their flow fill.

    Only clips with a frame between two given ones are interpolated and encoded; the rest
    are zeros, which :func:`rdtf.conditioning.filled_latents` never reads.
    """
    batch, num_frames, height, width = frames.shape[:4]
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    out = torch.zeros(batch, vae.config.latent_channels, num_frames, height // scale, width // scale)
    clips = torch.nonzero(between_given(condition_mask.cpu()).any(dim=1)).flatten().tolist()
    if clips:
        masks = condition_mask.cpu().numpy()
        out[clips] = encode_clips(vae, np.stack([flow_filled_frames(frames[i], masks[i]) for i in clips])).cpu()
    return out


def video_frames(video: torch.Tensor) -> np.ndarray:
    """``(B, 3, F, H, W)`` clips in [-1, 1] (training batches) → ``(B, F, H, W, 3)`` uint8 frames."""
    pixels = ((video.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 4, 1).numpy()
