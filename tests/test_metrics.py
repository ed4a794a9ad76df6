"""Metrics on constructed clips whose right answers are known, and the backbone metrics' offline paths."""

from __future__ import annotations

import json
import socket

import cv2
import numpy as np
import pytest
import torch

from rdtf.backbones import Backbones, feature_distance, frechet_distance, load_backbones, resample_frames
from rdtf.flow import optical_flow, warp
from rdtf.metrics import alpha_iou, analyse_clip, clip_metrics, gradient_energy, psnr_from_mse, ssim


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: nothing here may download."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def texture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth random grey texture, uint8: enough structure for optical flow everywhere."""
    noise = np.random.default_rng(seed).random((height, width)).astype(np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), 2.0)
    noise = (noise - noise.min()) / (noise.max() - noise.min())
    return (noise * 255).astype(np.uint8)


def translating_clip(num_frames: int, dx: int, dy: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """Opaque RGBA clip: a window moving over a large texture, so content shifts by (dx, dy) per frame."""
    big = texture(size + 4 * num_frames * (abs(dy) + 1) + 8, size + 4 * num_frames * (abs(dx) + 1) + 8, seed)
    cy, cx = big.shape[0] // 2 - size // 2, big.shape[1] // 2 - size // 2
    frames = []
    for t in range(num_frames):
        y0, x0 = cy - dy * t, cx - dx * t  # content moves +d as the window moves -d
        gray = big[y0 : y0 + size, x0 : x0 + size]
        frames.append(np.dstack([gray, gray, gray, np.full_like(gray, 255)]))
    return np.stack(frames)


def sprite_clip(num_frames: int = 8, size: int = 48, step: int = 2) -> np.ndarray:
    """A textured disc on a transparent background moving right by ``step`` px per frame."""
    yy, xx = np.mgrid[0:size, 0:size]
    tex = texture(size, size, seed=3)
    frames = np.zeros((num_frames, size, size, 4), np.uint8)
    for t in range(num_frames):
        inside = (xx - 14 - step * t) ** 2 + (yy - size // 2) ** 2 <= 64
        frames[t][inside] = np.stack([tex, 255 - tex, tex // 2, np.full_like(tex, 255)], axis=-1)[inside]
    return frames


# ----------------------------------------------------------------------------- pixel metrics


def test_identical_clips_score_perfectly():
    clip = sprite_clip()
    mask = np.array([1, 0, 0, 0, 0, 0, 0, 0])
    scores = clip_metrics(clip, clip.copy(), mask).scalars
    assert scores["psnr"] == float("inf") and scores["psnr_given"] == float("inf")
    assert scores["ssim"] == 1.0 and scores["ssim_given"] == 1.0
    assert scores["iou"] == 1.0
    assert scores["motion_epe"] == 0.0
    assert scores["motion_direction_cos"] == pytest.approx(1.0)
    assert scores["warp_error"] == scores["warp_error_gt"]
    assert scores["flow_magnitude"] == pytest.approx(scores["flow_magnitude_gt"])


def test_gaussian_noise_gives_the_expected_psnr():
    rng = np.random.default_rng(0)
    gt = np.full((8, 64, 64, 4), 128, np.uint8)
    gt[..., 3] = 255
    sigma = 10.0
    noisy = gt.astype(np.float64)
    noisy[..., :3] += rng.normal(0.0, sigma, noisy[..., :3].shape)
    pred = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
    expected = 10 * np.log10(255.0**2 / (sigma**2 + 1.0 / 12.0))  # rounding adds 1/12 to the variance
    scores = clip_metrics(pred, gt, np.zeros(8)).scalars
    assert scores["psnr"] == pytest.approx(expected, abs=0.1)
    assert np.isnan(scores["psnr_given"])  # nothing was given
    assert np.isnan(scores["iou"])  # opaque ground truth: IoU does not apply


def test_psnr_of_a_known_mse_and_ssim_of_flat_images():
    assert psnr_from_mse(255.0**2 / 100.0) == pytest.approx(20.0)
    assert psnr_from_mse(0.0) == float("inf")
    dark, light = np.full((32, 32, 3), 100, np.uint8), np.full((32, 32, 3), 120, np.uint8)
    c1 = (0.01 * 255) ** 2
    # Flat images: contrast-structure term is exactly 1, only luminance differs.
    assert ssim(dark, light) == pytest.approx((2 * 100 * 120 + c1) / (100**2 + 120**2 + c1), rel=1e-9)


def test_given_frames_are_scored_apart_and_padding_is_ignored():
    gt = sprite_clip()
    pred = gt.copy()
    pred[2] = 0  # a generated frame is wrong
    pred[7] = 77  # a padding frame is garbage
    cond = np.array([1, 1, 0, 0, 0, 0, 0, 0])
    loss = np.array([1, 1, 1, 1, 1, 1, 1, 0])
    result = clip_metrics(pred, gt, cond, loss)
    assert result.scalars["psnr_given"] == float("inf")
    assert np.isfinite(result.scalars["psnr"])
    assert np.isnan(result.per_frame["psnr"][7]) and np.isnan(result.per_frame["ssim"][7])
    assert result.per_frame["psnr"][3] == float("inf")
    assert result.given.tolist() == [True, True, False, False, False, False, False, False]
    # Five generated real frames, one of them wrong: the pooled MSE is a fifth of that frame's.
    white = np.full((48, 48, 3), 255.0)
    frame_mse = np.mean((white - np.where(gt[2][..., 3:] > 0, gt[2][..., :3], 255).astype(float)) ** 2)
    assert result.scalars["psnr"] == pytest.approx(10 * np.log10(255.0**2 / (frame_mse / 5)), abs=1e-6)


def test_alpha_iou_of_overlapping_squares():
    a, b = np.zeros((20, 20), np.uint8), np.zeros((20, 20), np.uint8)
    a[0:10, 0:10] = 255
    b[0:10, 5:15] = 200
    assert alpha_iou(a, b) == pytest.approx(50 / 150)
    assert alpha_iou(np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8)) == 1.0


def test_sharpness_drops_when_blurred():
    sharp = translating_clip(2, 0, 0)
    blurred = sharp.copy()
    blurred[..., :3] = np.stack([cv2.GaussianBlur(f[..., :3], (0, 0), 2.0) for f in sharp])
    assert np.all(gradient_energy(blurred[..., :3]) < 0.5 * gradient_energy(sharp[..., :3]))


# ----------------------------------------------------------------------------- motion


@pytest.mark.parametrize("method", ["dis", "farneback"])
@pytest.mark.parametrize("shift", [(3, -2), (0, 5), (-4, 1)])
def test_known_shift_gives_known_flow(method, shift):
    clip = translating_clip(2, *shift)
    flow = optical_flow(clip[0, ..., :3], clip[1, ..., :3], method)
    interior = flow[10:-10, 10:-10]
    assert np.median(interior[..., 0]) == pytest.approx(shift[0], abs=0.15)
    assert np.median(interior[..., 1]) == pytest.approx(shift[1], abs=0.15)
    # Warping the second frame back along the flow reproduces the first.
    pulled = warp(clip[1, ..., 0], flow)
    assert np.mean(np.abs(pulled[10:-10, 10:-10] - clip[0, 10:-10, 10:-10, 0])) < 2.0


def test_clip_motion_statistics():
    moving = analyse_clip(translating_clip(5, 2, 1))
    assert moving.flow_magnitude == pytest.approx(np.hypot(2, 1), abs=0.2)
    assert moving.warp_error < 0.01  # rigid motion: no flicker
    rng = np.random.default_rng(1)
    flicker = np.concatenate([rng.integers(0, 256, (5, 64, 64, 3), dtype=np.uint8), np.full((5, 64, 64, 1), 255, np.uint8)], axis=-1)
    assert analyse_clip(flicker).warp_error > 10 * moving.warp_error
    assert np.isnan(analyse_clip(translating_clip(1, 0, 0)).flow_magnitude)


def test_motion_agreement_sees_direction():
    gt = translating_clip(4, 3, 0)
    same = clip_metrics(gt.copy(), gt, np.zeros(4)).scalars
    reverse = clip_metrics(gt[::-1].copy(), gt, np.zeros(4)).scalars
    still = clip_metrics(np.repeat(gt[:1], 4, axis=0), gt, np.zeros(4)).scalars
    assert same["motion_epe"] == 0.0 and same["motion_direction_cos"] == pytest.approx(1.0)
    assert reverse["motion_direction_cos"] < -0.9
    assert reverse["motion_epe"] == pytest.approx(6.0, abs=0.5)  # (+3) vs (-3) per frame
    assert still["motion_epe"] == pytest.approx(3.0, abs=0.3)
    assert still["flow_magnitude"] == pytest.approx(0.0, abs=0.05)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("pred", "mask", "match"),
    [
        (np.zeros((8, 16, 16, 3), np.uint8), np.zeros(8), "pred: expected RGBA"),
        (np.zeros((8, 16, 16, 4), np.float32), np.zeros(8), "pred: expected uint8"),
        (np.zeros((7, 16, 16, 4), np.uint8), np.zeros(8), "pred: shape"),
        (np.zeros((8, 16, 16, 4), np.uint8), np.zeros(7), "condition_mask: expected 8"),
        (np.zeros((8, 16, 16, 4), np.uint8), np.full(8, 0.5), "condition_mask: entries must be 0 or 1"),
    ],
)
def test_bad_input_is_named(pred, mask, match):
    with pytest.raises(ValueError, match=match):
        clip_metrics(pred, np.zeros((8, 16, 16, 4), np.uint8), mask)


def test_unknown_flow_method_is_rejected():
    frame = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="flow method 'raft'"):
        optical_flow(frame, frame, "raft")


# ----------------------------------------------------------------------------- backbones


def test_frechet_distance_of_known_gaussians():
    mean, cov = np.zeros(3), np.eye(3)
    assert frechet_distance(mean, cov, mean, cov) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(mean, cov, mean + np.array([3.0, 4.0, 0.0]), cov) == pytest.approx(25.0)
    # Diagonal covariances: tr(A + B - 2 sqrt(AB)) = sum (sqrt(a) - sqrt(b))^2.
    a, b = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 4.0, 1.0])
    assert frechet_distance(mean, a, mean, b) == pytest.approx(1.0 + 0.0 + 4.0)
    samples = np.random.default_rng(0).normal(size=(400, 3))
    assert feature_distance(samples, samples) == pytest.approx(0.0, abs=1e-8)
    assert feature_distance(samples, samples + 2.0) == pytest.approx(12.0, rel=1e-6)
    assert np.isnan(feature_distance(samples[:1], samples))


def test_resample_frames_to_i3d_length():
    clip = np.arange(8)[:, None, None, None] * np.ones((8, 2, 2, 3), np.uint8)
    assert resample_frames(clip, 16)[:, 0, 0, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7]
    assert resample_frames(clip, 4)[:, 0, 0, 0].tolist() == [0, 2, 4, 6]


@pytest.fixture
def empty_torch_hub(tmp_path):
    """An empty torch hub cache, so LPIPS finds no trunk weights even where lpips is installed."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield
    torch.hub.set_dir(previous)


def test_without_weights_every_backbone_metric_is_unavailable_with_a_reason(empty_torch_hub):
    backbones = load_backbones()
    assert backbones.lpips is None and backbones.clip is None and backbones.i3d is None
    assert set(backbones.unavailable) == {"lpips", "clip_image", "clip_text", "clip_text_gt", "fvd"}
    assert "is not installed" in backbones.unavailable["lpips"] or "torch hub cache" in backbones.unavailable["lpips"]
    assert "clip_path" in backbones.unavailable["clip_text"]
    assert "i3d_path" in backbones.unavailable["fvd"]
    rgb = np.zeros((2, 16, 16, 3), np.uint8)
    assert backbones.clip_scores(rgb, rgb, "a cat") == {}
    with pytest.raises(RuntimeError, match="FVD is unavailable"):
        backbones.video_features(rgb)
    assert "not requested" in load_backbones(lpips_net=None).unavailable["lpips"]


def test_missing_weight_paths_fail_early(tmp_path):
    with pytest.raises(FileNotFoundError, match="clip_path"):
        load_backbones(clip_path=tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="i3d_path"):
        load_backbones(i3d_path=tmp_path / "i3d.pt")
    with pytest.raises(ValueError, match="lpips_net='resnet'"):
        load_backbones(lpips_net="resnet")


def _bytes_to_unicode() -> dict[int, str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


@pytest.fixture(scope="module")
def tiny_clip_folder(tmp_path_factory):
    """A randomly initialised CLIP saved in Hugging Face layout: the same loading path as a real one."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    symbols = list(_bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        ),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=8,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_clip_scores_from_a_local_model(tiny_clip_folder):
    backbones = load_backbones(clip_path=tiny_clip_folder, lpips_net=None)
    assert backbones.clip is not None
    assert "clip_text" not in backbones.unavailable and "fvd" in backbones.unavailable
    clip = sprite_clip()
    rgb = np.where(clip[..., 3:] > 0, clip[..., :3], 255).astype(np.uint8)
    same = backbones.clip_scores(rgb, rgb, "a ball rolls to the right")
    assert same["clip_image"] == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= same["clip_text"] <= 1.0 and same["clip_text"] == pytest.approx(same["clip_text_gt"])
    other = backbones.clip_scores(255 - rgb, rgb, "")
    assert other["clip_image"] < 1.0 and np.isnan(other["clip_text"])
    json.dumps(same)  # plain floats


class _TinyI3D(torch.nn.Module):
    """Same calling convention as StyleGAN-V's i3d_torchscript.pt; features are channel statistics over time."""

    def forward(self, videos: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False) -> torch.Tensor:
        if rescale:
            videos = videos / 127.5 - 1.0
        mean = videos.mean(dim=(3, 4))  # (B, 3, T)
        return torch.cat([mean.mean(dim=2), mean.std(dim=2), videos.std(dim=(1, 2, 3, 4)).unsqueeze(1)], dim=1)


def test_fvd_features_from_a_local_torchscript_file(tmp_path):
    path = tmp_path / "i3d.pt"
    torch.jit.script(_TinyI3D()).save(str(path))
    backbones = load_backbones(i3d_path=path, lpips_net=None)
    assert isinstance(backbones, Backbones) and "fvd" not in backbones.unavailable
    clip = sprite_clip()[..., :3]
    features = backbones.video_features(clip)
    assert features.shape == (7,) and np.all(np.isfinite(features))
    np.testing.assert_allclose(backbones.video_features(clip), features)
