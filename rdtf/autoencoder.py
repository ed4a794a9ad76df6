"""The tiny VAE of a from-scratch model, trained on a prepared dataset's frames.

A model trained from scratch (the embedded ``rdtf-tiny``) needs its own latent space:
an ``AutoencoderKL`` of the I2VGen-XL family at toy width, trained here with an L1
reconstruction loss, an L1 on image gradients (sharp outlines) and a small KL term, then given the ``scaling_factor`` that makes its
latents unit-variance (what the diffusion schedule assumes). The loop is deliberately
small; it shares the checkpoint format and the per-step seeding of :mod:`rdtf.train`, so
it resumes exactly too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from rdtf import checkpoint as ckpt
from rdtf.data import StickerDataset
from rdtf.io import write_atomic
from rdtf.models import build_tiny_vae

VAE_DIR = "vae"
METRICS_NAME = "autoencoder_metrics.json"


@dataclass
class AutoencoderConfig:
    """Everything an autoencoder run depends on; saved in its checkpoints and metrics."""

    data: str = "data/builtin-prepared"
    output_dir: str = "runs/vae"
    channels: list[int] = field(default_factory=lambda: [32, 64, 64])  # one entry per 2x downsampling, minus one
    latent_channels: int = 4
    steps: int = 2000
    batch_size: int = 32
    learning_rate: float = 1e-3
    kl_weight: float = 1e-6
    gradient_weight: float = 1.0  # L1 on image gradients too: keeps sticker outlines sharp
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    seed: int = 0
    progress: bool = True

    def check(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints", "latent_channels"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be an integer >= 1")
        if not self.channels or any(not isinstance(c, int) or c < 2 for c in self.channels):
            raise ValueError(f"channels={self.channels}: expected a non-empty list of integers >= 2")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate={self.learning_rate}: must be a finite number > 0")
        for name in ("kl_weight", "gradient_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")


def _frames(dataset: StickerDataset) -> torch.Tensor:
    """Every real (not padding) frame of ``dataset`` as uint8 ``(N, 3, H, W)``."""
    frames = []
    for index in range(len(dataset)):
        item = dataset[index]
        real = item["loss_mask"] > 0
        video = ((item["video"].permute(1, 0, 2, 3)[real] + 1) * 127.5).round().to(torch.uint8)
        frames.append(video)
    return torch.cat(frames)


def image_gradient_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean L1 distance between the horizontal and vertical finite differences of two images."""
    dx = F.l1_loss(a[..., :, 1:] - a[..., :, :-1], b[..., :, 1:] - b[..., :, :-1])
    dy = F.l1_loss(a[..., 1:, :] - a[..., :-1, :], b[..., 1:, :] - b[..., :-1, :])
    return (dx + dy) / 2


def _pixels(frames: torch.Tensor) -> torch.Tensor:
    return frames.float() / 127.5 - 1.0


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, frames: torch.Tensor, batch_size: int = 64) -> float:
    """PSNR (dB, pixels in [0, 1]) of decoding the posterior mean of ``frames``."""
    vae.eval()
    squared, count = 0.0, 0
    for start in range(0, len(frames), batch_size):
        pixels = _pixels(frames[start : start + batch_size].to(vae.device))
        decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
        squared += (((decoded - pixels) / 2) ** 2).sum().item()
        count += pixels.numel()
    return 10 * math.log10(1.0 / max(squared / count, 1e-12))


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, frames: torch.Tensor, batch_size: int = 64) -> float:
    """``1 / std`` of the posterior-mean latents: scaled latents then have unit variance."""
    latents = torch.cat(
        [vae.encode(_pixels(frames[i : i + batch_size].to(vae.device))).latent_dist.mean
         for i in range(0, len(frames), batch_size)]
    )
    return float(1.0 / latents.std().clamp(min=1e-6))


def train_autoencoder(config: AutoencoderConfig) -> Path:
    """Train, resuming from ``<output_dir>/checkpoints`` when there is one; returns ``<output_dir>/vae``.

    Runs on the GPU when there is one. The random draws are made on the CPU either way, so a run
    picks the same frames and noise on every device.
    """
    config.check()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(config.output_dir)
    train_frames = _frames(StickerDataset(config.data, split="train"))
    try:
        val_frames = _frames(StickerDataset(config.data, split="val"))
    except ValueError:
        val_frames = train_frames[: config.batch_size]
    size = train_frames.shape[-1]
    factor = 2 ** (len(config.channels) - 1)
    if size % factor:
        raise ValueError(f"{config.data}: frames are {size}px, not a multiple of the VAE's downsampling {factor}")

    torch.manual_seed(config.seed)
    vae = build_tiny_vae(config.channels, sample_size=size, latent_channels=config.latent_channels).to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.learning_rate, weight_decay=0.0)
    step = 0
    latest = ckpt.latest_checkpoint(out / "checkpoints")
    if latest is not None:
        tensors, state = ckpt.load_checkpoint(latest)
        for name in ("channels", "latent_channels"):
            if state["config"].get(name, 4) != getattr(config, name):
                raise ValueError(f"{latest}: was written for {name}={state['config'].get(name, 4)}")
        vae.load_state_dict(ckpt.unprefixed("model", tensors))
        optimizer.load_state_dict(ckpt.optimizer_from_flat(ckpt.unprefixed("optim", tensors), state["optimizer"]))
        step = state["step"]

    progress = tqdm(total=config.steps, initial=step, desc="training the VAE", disable=not config.progress)
    while step < config.steps:
        generator = torch.Generator().manual_seed(ckpt.step_seed(config.seed, 0, step))
        picked = torch.randint(len(train_frames), (config.batch_size,), generator=generator)
        batch = _pixels(train_frames[picked].to(device))
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(device)
        reconstruction = vae.decode(latents).sample
        loss = (
            F.l1_loss(reconstruction, batch)
            + config.gradient_weight * image_gradient_l1(reconstruction, batch)
            + config.kl_weight * posterior.kl().mean()
        )
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"VAE loss became {loss.item()} at step {step + 1}; lower learning_rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:  # cosine decay: the last steps polish the details
            group["lr"] = config.learning_rate * 0.5 * (1 + math.cos(math.pi * step / config.steps))
        optimizer.step()
        step += 1
        progress.update(1)
        progress.set_postfix(loss=f"{loss.item():.4f}")
        if step % config.checkpoint_every == 0 or step == config.steps:
            opt_tensors, skeleton = ckpt.optimizer_to_flat(optimizer.state_dict())
            tensors = {**ckpt.prefixed("model", vae.state_dict()), **ckpt.prefixed("optim", opt_tensors)}
            state = {"step": step, "config": dataclasses.asdict(config), "optimizer": skeleton, "loss": loss.item()}
            ckpt.save_checkpoint(out / "checkpoints", step, tensors, state, keep_last=config.keep_checkpoints)
    progress.close()

    vae.eval()
    vae.register_to_config(scaling_factor=latent_scaling_factor(vae, train_frames))
    staging = out / f".tmp-{VAE_DIR}"
    shutil.rmtree(staging, ignore_errors=True)
    vae.save_pretrained(staging, safe_serialization=True)
    shutil.rmtree(out / VAE_DIR, ignore_errors=True)
    os.replace(staging, out / VAE_DIR)
    metrics = {
        "steps": step,
        "val_psnr_db": round(reconstruction_psnr(vae, val_frames), 3),
        "train_psnr_db": round(reconstruction_psnr(vae, train_frames[:512]), 3),
        "scaling_factor": vae.config.scaling_factor,
        "frames": {"train": len(train_frames), "val": len(val_frames)},
        "config": dataclasses.asdict(config),
    }
    write_atomic(out / METRICS_NAME, json.dumps(metrics, indent=2).encode("utf-8"))
    return out / VAE_DIR
