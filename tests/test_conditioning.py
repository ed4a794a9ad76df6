"""What the UNet sees of the given frames (rdtf.conditioning): stock position planes and the interpolated fill."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from rdtf.baselines import crossfade, flow_interpolation
from rdtf.cases import EvalCase
from rdtf.conditioning import between_given, conditioning_latents, diffusion_offset, filled_latents, interpolate_given
from rdtf.flow_fill import flow_fill_latents, flow_filled_frames
from rdtf.masks import condition_mask
from rdtf.metrics import frame_mse, psnr_from_mse
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


def test_the_flow_fill_replaces_only_the_frames_between_two_given_ones():
    mask = torch.zeros(2, F)
    mask[0, [1, 5]] = 1
    mask[1, [0, 3]] = 1
    assert between_given(mask).int().tolist() == [[0, 0, 1, 1, 1, 0, 0, 0], [0, 1, 1, 0, 0, 0, 0, 0]]
    latents, flow = _ramp_latents(batch=2), torch.full((2, 2, F, 3, 3), -1.0)
    out = conditioning_latents(latents, mask, mask_channel=True, fill="flow", flow_latents=flow)
    assert _frame_values(out) == [110.0, 110.0, -1.0, -1.0, -1.0, 150.0, 150.0, 150.0]  # held outside, as interpolate
    assert [round(v, 4) for v in out[1, 0, :, 0, 0].tolist()] == [100.0, -1.0, -1.0, 130.0] + [130.0] * 4
    torch.testing.assert_close(diffusion_offset(latents, mask, "residual", flow), filled_latents(latents, mask, flow))
    torch.testing.assert_close(filled_latents(latents, mask, flow), out[:, :-1])
    with pytest.raises(ValueError, match="fill='flow' needs flow_latents"):
        conditioning_latents(latents, mask, mask_channel=True, fill="flow")
    i2v = condition_mask("i2v", F).expand(2, -1)  # no frame between two given ones: nothing to draw by flow
    torch.testing.assert_close(conditioning_latents(latents, i2v, mask_channel=True, fill="flow"),
                               conditioning_latents(latents, i2v, mask_channel=True, fill="interpolate"))


def _sliding_square(size: int = 32, step: int = 2) -> np.ndarray:
    """``(F, size, size, 3)`` uint8: a two-colour square sliding right ``step`` pixels a frame on white."""
    frames = np.full((F, size, size, 3), 255, np.uint8)
    for i in range(F):
        frames[i, 10:20, 2 + step * i : 8 + step * i] = (200, 40, 40)
        frames[i, 10:20, 8 + step * i : 12 + step * i] = (40, 40, 200)
    return frames


def test_the_flow_fill_is_the_flow_baseline_and_beats_the_crossfade_on_motion():
    frames, mask = _sliding_square(), condition_mask("interpolation", F).numpy()
    filled = flow_filled_frames(frames, mask)
    case = EvalCase(key="square", task="interpolation", frames=np.concatenate([frames, np.full((F, 32, 32, 1), 255, np.uint8)], -1),
                    condition_mask=mask)
    np.testing.assert_array_equal(filled, flow_interpolation(case)[..., :3])
    np.testing.assert_array_equal(filled[mask > 0], frames[mask > 0])
    middle = [1, 3, 5]
    flow_db = psnr_from_mse(float(frame_mse(filled[middle], frames[middle]).mean()))
    crossfade_db = psnr_from_mse(float(frame_mse(crossfade(case)[middle, ..., :3], frames[middle]).mean()))
    assert flow_db > crossfade_db + 10, (flow_db, crossfade_db)  # 45.6 against 19.2 dB
    with pytest.raises(ValueError, match="no frame to fill from"):
        flow_filled_frames(frames, np.zeros(F, np.float32))


def test_flow_fill_latents_encode_the_flow_frames_only_for_clips_with_a_gap():
    vae = build_tiny_components(seed=0, sample_size=16, image_size=16).vae
    clips = np.stack([_sliding_square(16, 1), _sliding_square(16, 1)])
    masks = torch.stack([condition_mask("interpolation", F), condition_mask("i2v", F)])
    latents = flow_fill_latents(vae, clips, masks)
    with torch.no_grad():
        expected = encode_frames(vae, frames_to_pixels(flow_filled_frames(clips[0], masks[0].numpy())))
    torch.testing.assert_close(latents[0], expected.permute(1, 0, 2, 3))
    assert torch.count_nonzero(latents[1]) == 0  # i2v has no gap: nothing drawn, nothing encoded


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


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_a_residual_flow_fill_model_that_predicts_no_residual_returns_the_flow_baseline(tmp_path, strength):
    """With the residual decode the flow interpolation comes back pixel for pixel, given frames included."""
    components = build_tiny_components(seed=0, sample_size=16, image_size=16, condition_fill="flow",
                                       diffusion_space="residual")
    components.save_pretrained(tmp_path / "flow")
    loaded = load_components(tmp_path / "flow")
    assert loaded.config.condition_fill == "flow"
    _predict_clean(loaded, clean_is_the_fill=False)
    frames = _sliding_square(16, 1)
    out = RDTFPipeline(loaded).generate(frames=frames, task="interpolation", num_inference_steps=3, scheduler="ddim",
                                        strength=strength, decode="residual", keep_given=False, seed=5, progress=False)
    expected = flow_filled_frames(frames, condition_mask("interpolation", F).numpy()).astype(np.float32) / 255
    np.testing.assert_allclose(out, expected, atol=1e-5)
    i2v = RDTFPipeline(loaded).generate(image=frames[0], task="i2v", num_inference_steps=2, strength=strength,
                                        decode="residual", seed=5, progress=False)
    np.testing.assert_allclose(i2v, np.broadcast_to(frames[0] / 255, i2v.shape), atol=1e-5)  # nothing between: held
    assert RDTFPipeline(loaded).generate(prompt="a ball", task="t2v", num_frames=F, height=16, width=16,
                                         num_inference_steps=2, seed=5, progress=False).shape == (F, 16, 16, 3)
