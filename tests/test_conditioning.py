"""What the UNet sees of the given frames (rdtf.conditioning): stock position planes and the interpolated fill."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from rdtf.conditioning import conditioning_latents, diffusion_offset, interpolate_given
from rdtf.masks import condition_mask
from rdtf.models import (
    RDTFConfig,
    build_tiny_components,
    decode_latents,
    encode_frames,
    frames_to_pixels,
    load_components,
)
from rdtf.pipeline import RDTFPipeline

F = 8


def _ramp_latents(batch: int = 1, channels: int = 2) -> torch.Tensor:
    """Frame i's latent is the constant 10 * i + 100: easy to read back."""
    values = torch.arange(F, dtype=torch.float32) * 10 + 100
    return values.view(1, 1, F, 1, 1).expand(batch, channels, F, 3, 3).clone()


def _frame_values(image_latents: torch.Tensor) -> list[float]:
    return [round(v, 4) for v in image_latents[0, 0, :, 0, 0].tolist()]


def test_position_fill_is_the_stock_plane_and_keeps_given_frames():
    mask = condition_mask("interpolation", F).unsqueeze(0)  # 10101010
    out = conditioning_latents(_ramp_latents(), mask, mask_channel=False)
    expected = [100 + 10 * i if i % 2 == 0 else round(i / (F - 1), 4) for i in range(F)]
    assert _frame_values(out) == expected
    assert out.shape[1] == 2


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        ("i2v", [100.0] * F),  # the static sticker
        ("interpolation", [100, 110, 120, 130, 140, 150, 160, 160]),  # a latent cross-fade, last frame held
        ("predict_forward", [100, 110, 120, 130, 130, 130, 130, 130]),  # the nearest given frame repeated
        ("predict_backward", [140, 140, 140, 140, 140, 150, 160, 170]),
    ],
)
def test_interpolate_fill_starts_each_task_from_its_baseline(task, expected):
    mask = condition_mask(task, F).unsqueeze(0)
    out = conditioning_latents(_ramp_latents(), mask, mask_channel=True, fill="interpolate")
    assert _frame_values(out) == [float(v) for v in expected]
    assert out[0, -1, :, 0, 0].tolist() == mask[0].tolist()  # the mask channel still tells given from filled


def test_interpolate_fill_weights_uneven_gaps_linearly_and_per_clip():
    latents = _ramp_latents(batch=2)
    mask = torch.zeros(2, F)
    mask[0, [1, 5]] = 1  # gap of four frames
    mask[1, [0, 3]] = 1  # another clip of the batch, another pattern
    out = conditioning_latents(latents, mask, mask_channel=True, fill="interpolate")
    assert _frame_values(out) == [110.0, 110.0, 120.0, 130.0, 140.0, 150.0, 150.0, 150.0]
    assert [round(v, 4) for v in out[1, 0, :, 0, 0].tolist()] == [100.0, 110.0, 120.0, 130.0] + [130.0] * 4


def test_interpolate_fill_with_nothing_given_falls_back_to_the_position_plane():
    mask = condition_mask("t2v", F).unsqueeze(0)
    filled = conditioning_latents(_ramp_latents(), mask, mask_channel=True, fill="interpolate")
    stock = conditioning_latents(_ramp_latents(), mask, mask_channel=True)
    assert torch.equal(filled, stock)


def test_interpolate_given_fills_pixels_like_latents_and_nothing_given_with_zeros():
    pixels = _ramp_latents(batch=2, channels=3)
    mask = torch.stack([condition_mask("interpolation", F), condition_mask("t2v", F)])
    filled = interpolate_given(pixels, mask)
    latent_fill = conditioning_latents(pixels[:1], mask[:1], mask_channel=False, fill="interpolate")
    torch.testing.assert_close(filled[:1], latent_fill)
    assert torch.count_nonzero(filled[1]) == 0


def test_unknown_fill_and_fill_without_mask_channel_are_refused():
    mask = torch.ones(1, F)
    with pytest.raises(ValueError, match="fill='nearest'"):
        conditioning_latents(_ramp_latents(), mask, mask_channel=True, fill="nearest")
    with pytest.raises(ValueError, match="condition_fill='interpolate' needs mask_channel=True"):
        RDTFConfig(mask_channel=False, condition_fill="interpolate")
    with pytest.raises(ValueError, match="condition_fill='cubic'"):
        RDTFConfig(mask_channel=True, condition_fill="cubic")


def test_the_pipeline_feeds_the_models_fill_to_the_unet_and_the_fill_round_trips(tmp_path):
    components = build_tiny_components(seed=0, sample_size=8, image_size=16, condition_fill="interpolate")
    components.save_pretrained(tmp_path / "model")
    loaded = load_components(tmp_path / "model")
    assert loaded.config.condition_fill == "interpolate"

    seen: list[torch.Tensor] = []
    handle = loaded.unet.register_forward_hook(lambda m, a, kw, out: seen.append(kw["image_latents"]), with_kwargs=True)
    frames = np.random.default_rng(0).integers(0, 256, (F, 16, 16, 4), dtype=np.uint8)
    frames[..., 3] = 255
    request = dict(frames=frames, task="interpolation", num_inference_steps=2, seed=3, progress=False)
    filled = RDTFPipeline(loaded).generate(**request)
    handle.remove()
    image_latents = seen[0][0]  # first branch of the first step: (C + 1, F, h, w)
    middle = (image_latents[:-1, 0] + image_latents[:-1, 2]) / 2
    torch.testing.assert_close(image_latents[:-1, 1], middle)  # frame 1 sits halfway between 0 and 2

    stock = dataclasses.replace(loaded, config=dataclasses.replace(loaded.config, condition_fill="position"))
    assert not np.array_equal(RDTFPipeline(stock).generate(**request), filled)


def test_residual_space_subtracts_the_interpolate_fill_and_latent_space_nothing():
    latents = _ramp_latents(batch=2)
    mask = torch.stack([condition_mask("interpolation", F), condition_mask("t2v", F)])
    residual = diffusion_offset(latents, mask, "residual")
    torch.testing.assert_close(residual, interpolate_given(latents, mask))
    assert torch.count_nonzero(residual[1]) == 0  # t2v: nothing given, plain latents are denoised
    assert torch.count_nonzero(diffusion_offset(latents, mask, "latent")) == 0
    with pytest.raises(ValueError, match="diffusion_space='pixels'"):
        diffusion_offset(latents, mask, "pixels")
    with pytest.raises(ValueError, match="diffusion_space='pixels'"):
        RDTFConfig(mask_channel=True, diffusion_space="pixels")


def _predict_clean(components, clean_is_the_fill: bool) -> None:
    """Make the UNet predict the velocity of a fixed clean sample: the fill it is shown, or zeros."""
    alphas = components.scheduler.alphas_cumprod

    def hook(module, args, kwargs, output):
        noisy, timestep = args[0], int(args[1])
        clean = kwargs["image_latents"][:, : noisy.shape[1]] if clean_is_the_fill else torch.zeros_like(noisy)
        signal, noise_level = alphas[timestep].sqrt(), (1 - alphas[timestep]).sqrt()
        return ((signal * noisy - clean) / noise_level,)

    components.unet.register_forward_hook(hook, with_kwargs=True)


def test_a_residual_model_that_predicts_no_residual_returns_the_fill_from_pure_noise(tmp_path):
    """Residual space's point: the given frames' fill comes back exactly, whatever the UNet can draw.

    A latent-space model must draw that fill itself (here an oracle does); a residual-space
    model that predicts zeros gets the same clip.
    """
    frames = np.random.default_rng(0).integers(0, 256, (F, 8, 8, 3), dtype=np.uint8)  # the toy VAE's size
    request = {"frames": frames, "task": "interpolation", "num_inference_steps": 3, "scheduler": "ddim",
               "strength": 1.0, "decode": "direct", "keep_given": False, "seed": 5, "progress": False}
    outputs = {}
    for space in ("latent", "residual"):
        components = build_tiny_components(seed=0, sample_size=8, image_size=16, condition_fill="interpolate",
                                           diffusion_space=space)
        components.save_pretrained(tmp_path / space)
        loaded = load_components(tmp_path / space)
        assert loaded.config.diffusion_space == space
        _predict_clean(loaded, clean_is_the_fill=space == "latent")
        outputs[space] = RDTFPipeline(loaded).generate(**request)

    with torch.no_grad():
        latents = encode_frames(loaded.vae, frames_to_pixels(frames)).permute(1, 0, 2, 3).unsqueeze(0)
        fill = interpolate_given(latents, condition_mask("interpolation", F).unsqueeze(0))
        pixels = decode_latents(loaded.vae, fill[0].permute(1, 0, 2, 3))
    expected = (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(outputs["residual"], expected, atol=1e-5)
    np.testing.assert_allclose(outputs["latent"], expected, atol=1e-5)
