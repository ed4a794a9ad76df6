"""Metrics that need pretrained networks: LPIPS, CLIP image/text similarity, FVD (I3D).

Their weights are never downloaded here. Each metric is computed only when the user
supplies its backbone — an installed package that already carries the weights, or a
local path — and is otherwise listed in :attr:`Backbones.unavailable` with the reason,
so a report says "unavailable: why" instead of showing a made-up number.

- LPIPS: the ``lpips`` package (with ``torchvision``) and the torchvision trunk weights
  already in the torch hub cache (``lpips`` would otherwise fetch them on first use).
- CLIP: a local folder holding a Hugging Face CLIP or Chinese-CLIP model, tokenizer and
  image processor (``save_pretrained`` layout, safetensors weights), loaded with
  ``local_files_only``.
- FVD: a local TorchScript I3D file with the StyleGAN-V calling convention
  (``i3d_torchscript.pt``: ``detector(videos, rescale=True, resize=True,
  return_features=True)`` on ``(B, 3, T, H, W)`` float videos in [0, 255]).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: torchvision checkpoint file names the ``lpips`` trunks load from the torch hub cache.
LPIPS_TRUNK_FILES: dict[str, str] = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}
#: Frames per clip fed to I3D. Shorter clips are stretched by repeating frames (nearest
#: index), longer ones sampled evenly; FVD is comparable only under the same protocol.
FVD_FRAMES = 16
#: Names of the per-clip backbone metrics and of the split-level one.
CLIP_LEVEL_METRICS: tuple[str, ...] = ("lpips", "clip_image", "clip_text", "clip_text_gt")
SPLIT_LEVEL_METRICS: tuple[str, ...] = ("fvd",)


def frechet_distance(mean_a: np.ndarray, cov_a: np.ndarray, mean_b: np.ndarray, cov_b: np.ndarray) -> float:
    """‖μa − μb‖² + tr(Σa + Σb − 2 (Σa^½ Σb Σa^½)^½), via symmetric eigendecompositions.

    Equal to the usual ``sqrtm(Σa Σb)`` form but stable for singular covariances (few
    clips, many features) and free of complex round-off.
    """
    values_a, vectors_a = np.linalg.eigh(cov_a)
    sqrt_a = (vectors_a * np.sqrt(np.clip(values_a, 0.0, None))) @ vectors_a.T
    middle = sqrt_a @ cov_b @ sqrt_a
    trace_sqrt = float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None))))
    diff = mean_a - mean_b
    # Mathematically >= 0; round-off on (near-)singular covariances can dip just below.
    return max(0.0, float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt))


def feature_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussian fits of two ``(N, D)`` feature sets (NaN if N < 2)."""
    if len(features_a) < 2 or len(features_b) < 2:
        return float("nan")
    a, b = features_a.astype(np.float64), features_b.astype(np.float64)
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def resample_frames(rgb: np.ndarray, num_frames: int = FVD_FRAMES) -> np.ndarray:
    """``(F, H, W, 3)`` → ``(num_frames, H, W, 3)`` by nearest-index sampling over the clip."""
    index = np.floor(np.linspace(0, len(rgb), num_frames, endpoint=False)).astype(np.int64)
    return rgb[np.minimum(index, len(rgb) - 1)]


class ClipScorer:
    """Unit-length CLIP embeddings of frames and captions from a local model folder."""

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        self.path = Path(path)
        self.device = device
        self.model = AutoModel.from_pretrained(self.path, local_files_only=True, use_safetensors=True).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.processor = AutoImageProcessor.from_pretrained(self.path, local_files_only=True)

    @torch.no_grad()
    def image_embeddings(self, rgb: np.ndarray) -> torch.Tensor:
        """``(N, H, W, 3)`` uint8 → ``(N, D)`` unit vectors."""
        pixels = self.processor(images=list(rgb), return_tensors="pt")["pixel_values"].to(self.device)
        return _unit(_pooled(self.model.get_image_features(pixel_values=pixels)))

    @torch.no_grad()
    def text_embedding(self, text: str) -> torch.Tensor:
        """One caption → ``(D,)`` unit vector (truncated to the tokenizer's context)."""
        tokens = self.tokenizer([text], padding=True, truncation=True, return_tensors="pt").to(self.device)
        return _unit(_pooled(self.model.get_text_features(**tokens)))[0]


def _pooled(output: Any) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output holds the projection.
    return output.pooler_output if hasattr(output, "pooler_output") else output


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(vectors.float(), dim=-1)


@dataclass
class Backbones:
    """The pretrained scorers the user supplied; ``unavailable`` maps each missing metric to why."""

    lpips: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    clip: ClipScorer | None = None
    i3d: Callable[..., torch.Tensor] | None = None
    device: str = "cpu"
    unavailable: dict[str, str] = field(default_factory=dict)

    @torch.no_grad()
    def clip_scores(self, pred_rgb: np.ndarray, gt_rgb: np.ndarray, caption: str) -> dict[str, float]:
        """LPIPS and CLIP scores of predicted frames ``(N, H, W, 3)`` against ground truth and caption.

        ``lpips``: mean LPIPS distance to the ground truth (lower is closer);
        ``clip_image``: mean cosine between prediction and ground-truth CLIP embeddings;
        ``clip_text`` / ``clip_text_gt``: mean cosine of predicted / ground-truth frames to
        the caption (NaN without a caption). Only available metrics appear.
        """
        scores: dict[str, float] = {}
        if len(pred_rgb) == 0:
            return scores
        if self.lpips is not None:
            distances = self.lpips(_to_unit_range(pred_rgb, self.device), _to_unit_range(gt_rgb, self.device))
            scores["lpips"] = float(distances.mean())
        if self.clip is not None:
            pred_emb, gt_emb = self.clip.image_embeddings(pred_rgb), self.clip.image_embeddings(gt_rgb)
            scores["clip_image"] = float((pred_emb * gt_emb).sum(-1).mean())
            if caption.strip():
                text = self.clip.text_embedding(caption)
                scores["clip_text"] = float((pred_emb @ text).mean())
                scores["clip_text_gt"] = float((gt_emb @ text).mean())
            else:
                scores["clip_text"] = scores["clip_text_gt"] = float("nan")
        return scores

    @torch.no_grad()
    def video_features(self, rgb: np.ndarray) -> np.ndarray:
        """I3D features ``(D,)`` of one clip ``(F, H, W, 3)`` uint8, resampled to :data:`FVD_FRAMES`."""
        if self.i3d is None:
            raise RuntimeError(f"FVD is unavailable: {self.unavailable.get('fvd', 'no I3D model loaded')}")
        video = torch.from_numpy(resample_frames(rgb)).to(self.device, torch.float32)
        video = video.permute(3, 0, 1, 2).unsqueeze(0)  # (1, 3, T, H, W) in [0, 255]
        features = self.i3d(video, rescale=True, resize=True, return_features=True)
        return features.reshape(-1).cpu().numpy().astype(np.float64)


def _to_unit_range(rgb: np.ndarray, device: str) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 → ``(N, 3, H, W)`` float in [-1, 1], LPIPS's input."""
    return torch.from_numpy(rgb).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def load_backbones(
    *,
    lpips_net: str | None = "alex",
    clip_path: str | Path | None = None,
    i3d_path: str | Path | None = None,
    device: str = "cpu",
) -> Backbones:
    """Load whichever backbones are present locally; record why the others are unavailable.

    ``lpips_net`` picks the LPIPS trunk (None skips LPIPS). A path that is given but does
    not exist is an error (raised before any work), not a silent "unavailable".
    """
    for name, path in (("clip_path", clip_path), ("i3d_path", i3d_path)):
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{name}: {path} does not exist")
    backbones = Backbones(device=device)
    if lpips_net is None:
        backbones.unavailable["lpips"] = "not requested (lpips_net=None)"
    else:
        reason = _lpips_missing(lpips_net)
        if reason:
            backbones.unavailable["lpips"] = reason
        else:
            import lpips

            backbones.lpips = lpips.LPIPS(net=lpips_net, verbose=False).to(device).eval()
    if clip_path is None:
        backbones.unavailable["clip_image"] = backbones.unavailable["clip_text"] = backbones.unavailable["clip_text_gt"] = (
            "no CLIP model given (pass clip_path: a local Hugging Face CLIP or Chinese-CLIP folder)"
        )
    else:
        backbones.clip = ClipScorer(clip_path, device)
    if i3d_path is None:
        backbones.unavailable["fvd"] = "no I3D model given (pass i3d_path: a local TorchScript i3d_torchscript.pt)"
    else:
        backbones.i3d = torch.jit.load(str(i3d_path), map_location=device).eval()
    return backbones


def _lpips_missing(net: str) -> str | None:
    """Why LPIPS with trunk ``net`` cannot run offline, or None when it can."""
    if net not in LPIPS_TRUNK_FILES:
        raise ValueError(f"lpips_net={net!r}: expected one of {', '.join(LPIPS_TRUNK_FILES)} or None")
    for package in ("lpips", "torchvision"):
        if importlib.util.find_spec(package) is None:
            return f"package {package!r} is not installed (pip install lpips torchvision)"
    trunk = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_TRUNK_FILES[net]
    if not trunk.is_file():
        return f"LPIPS trunk weights not in the torch hub cache ({trunk}); they are never downloaded here"
    return None
