"""The multitask sampler on tiny models (rdtf.pipeline): parity with diffusers, tasks, guidance, caches, errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import I2VGenXLPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image

from rdtf.io import Clip, composite_over, read_clip
from rdtf.masks import TASKS, condition_mask
from rdtf.models import add_mask_channel, build_tiny_components, encode_text
from rdtf.pipeline import RDTFPipeline, fit_frames, initial_noise, make_scheduler

F = 4
FAST = dict(num_inference_steps=2, progress=False)


def _frames(seed: int, count: int = F, size: int = 8, alpha: bool = False) -> np.ndarray:
    frames = np.random.default_rng(seed).integers(0, 256, (count, size, size, 4), dtype=np.uint8)
    if not alpha:
        frames[..., 3] = 255
    return frames


@pytest.fixture(scope="module")
def pipe() -> RDTFPipeline:
    return RDTFPipeline(build_tiny_components(sample_size=8, image_size=16, num_frames=F))


class ForwardCounter:
    """Counts forward calls of modules with real forward hooks (no mocking)."""

    def __init__(self, **modules: torch.nn.Module) -> None:
        self.counts = dict.fromkeys(modules, 0)
        self.batch_sizes: list[int] = []
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in modules.items()]

    def _hook(self, name):
        def hook(module, args, kwargs_or_output, *rest):
            self.counts[name] += 1
            if name == "unet":
                self.batch_sizes.append(int(args[0].shape[0]))

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _count(pipeline: RDTFPipeline) -> ForwardCounter:
    c = pipeline.components
    return ForwardCounter(
        text_encoder=c.text_encoder, image_encoder=c.image_encoder, vae_encoder=c.vae.encoder, unet=c.unet
    )


def test_first_frame_case_matches_diffusers_i2vgen_xl(monkeypatch):
    # the deprecated pipeline samples the VAE posterior from the global RNG: make both sides use its mean
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    components = build_tiny_components(seed=1, mask_channel=False)
    image = np.random.default_rng(5).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    ours = dict(
        image=image, prompt="a cat waves", negative_prompt="blurry", text_guidance=7.5, image_guidance=7.5,
        num_frames=F, fps=16, num_inference_steps=3, decode_chunk_size=1, seed=11, keep_given=False, progress=False,
    )
    video = RDTFPipeline(components).generate(**ours)
    stock = I2VGenXLPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        image_encoder=components.image_encoder, feature_extractor=components.feature_extractor,
        unet=components.unet, scheduler=make_scheduler("ddim", components.scheduler.config),
    )
    stock.set_progress_bar_config(disable=True)
    with torch.no_grad():
        prompt_embeds = encode_text(components, ["a cat waves"])
        negative_embeds = encode_text(components, ["blurry"])
    reference = stock(
        prompt=None, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, image=Image.fromarray(image),
        height=16, width=16, target_fps=16, num_frames=F, num_inference_steps=3, guidance_scale=7.5,
        latents=initial_noise((1, 4, F, 16, 16), 11), decode_chunk_size=1, output_type="np",
    ).frames[0]
    assert video.shape == reference.shape == (F, 16, 16, 3)
    np.testing.assert_allclose(video, reference, atol=1e-4, rtol=0)
    assert video.std() > 0.01  # not a degenerate constant clip

    # a zero-initialised mask channel changes nothing
    widened = copy.deepcopy(components)
    add_mask_channel(widened.unet)
    np.testing.assert_allclose(RDTFPipeline(widened).generate(**ours), video, atol=1e-6, rtol=0)


@pytest.mark.parametrize("task", TASKS)
def test_each_task_keeps_its_given_frames(pipe, task):
    frames = _frames(1)
    mask = condition_mask(task, F)
    clip = pipe(frames=frames, task=task, prompt="a dog jumps", seed=2, **FAST)
    assert isinstance(clip, Clip) and clip.frames.shape == (F, 8, 8, 4) and clip.frames.dtype == np.uint8
    assert (clip.frames[..., 3] == 255).all()
    for position in range(F):
        same = np.array_equal(clip.frames[position], frames[position])
        assert same == bool(mask[position]), (task, position)


def test_different_masks_give_different_clips(pipe):
    frames = _frames(3)
    outputs = {
        pattern: pipe.generate(frames=frames, condition_mask=pattern, keep_given=False, seed=0, **FAST)
        for pattern in ("1000", "0100", "1010", "0011")
    }
    patterns = list(outputs)
    for i, a in enumerate(patterns):
        for b in patterns[i + 1 :]:
            assert np.abs(outputs[a] - outputs[b]).max() > 1e-4, (a, b)


def test_transparent_given_frames_are_flattened_onto_the_background(pipe):
    frames = _frames(4, alpha=True)
    clip = pipe(frames=frames, condition_mask="1001", background=(0, 128, 255), **FAST)
    expected = composite_over(frames, (0, 128, 255))
    for position in (0, 3):
        np.testing.assert_array_equal(clip.frames[position, ..., :3], expected[position])


def test_text_steers_it2v_but_not_i2v(pipe):
    image = _frames(5)[0]
    it2v = [pipe.generate(image=image, task="it2v", prompt=p, seed=1, **FAST) for p in ("a cat waves", "a dog runs")]
    assert np.abs(it2v[0] - it2v[1]).max() > 1e-4
    i2v = [pipe.generate(image=image, task="i2v", prompt=p, seed=1, **FAST) for p in ("a cat waves", "a dog runs")]
    np.testing.assert_array_equal(i2v[0], i2v[1])


def test_chinese_and_english_prompts_both_run(pipe):
    image = _frames(6)[0]
    english = pipe.generate(image=image, prompt="a cat in sunglasses waves hello", seed=0, **FAST)
    chinese = pipe.generate(image=image, prompt="一只戴着墨镜的小猫在挥手", seed=0, **FAST)
    assert np.isfinite(chinese).all() and np.abs(english - chinese).max() > 1e-4


def test_seed_alone_reproduces_a_sample(pipe):
    image = _frames(7)[0]
    a = pipe.generate(image=image, prompt="x", seed=5, **FAST)
    b = RDTFPipeline(copy.deepcopy(pipe.components)).generate(image=image, prompt="x", seed=5, **FAST)
    c = pipe.generate(image=image, prompt="x", seed=6, **FAST)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4


def test_rerun_uses_cached_embeddings_and_latents(pipe):
    frames = _frames(8)
    pipe.generate(frames=frames, condition_mask="1010", prompt="cache me", seed=0, **FAST)
    counter = _count(pipe)
    try:
        for seed, guidance, steps in ((1, 3.0, 2), (2, 5.0, 3)):
            pipe.generate(
                frames=frames, condition_mask="1010", prompt="cache me", seed=seed, text_guidance=guidance,
                image_guidance=guidance, num_inference_steps=steps, progress=False,
            )
        assert counter.counts["text_encoder"] == counter.counts["image_encoder"] == counter.counts["vae_encoder"] == 0
        assert counter.counts["unet"] == 5
        # a new prompt re-encodes only the text; a new given frame only that frame
        pipe.generate(frames=frames, condition_mask="1010", prompt="new words", seed=0, **FAST)
        assert counter.counts["text_encoder"] == 1 and counter.counts["vae_encoder"] == 0
        pipe.generate(frames=frames, condition_mask="1011", prompt="new words", seed=0, **FAST)
        assert counter.counts["vae_encoder"] == 1 and counter.counts["image_encoder"] == 0
    finally:
        counter.remove()


def test_guidance_batches_two_passes_for_equal_scales_and_three_otherwise(pipe):
    image = _frames(9)[0]
    counter = _count(pipe)
    try:
        equal = pipe.generate(image=image, prompt="p", text_guidance=4.0, image_guidance=4.0, seed=0, **FAST)
        assert set(counter.batch_sizes) == {2}
        counter.batch_sizes.clear()
        nearly = pipe.generate(image=image, prompt="p", text_guidance=4.0, image_guidance=4.0 + 1e-9, seed=0, **FAST)
        assert set(counter.batch_sizes) == {3}
        counter.batch_sizes.clear()
        pipe.generate(image=image, prompt="p", text_guidance=1.0, image_guidance=1.0, seed=0, **FAST)
        assert set(counter.batch_sizes) == {1}
        counter.batch_sizes.clear()
        # no image: the image-conditioned pass equals the unconditional one and is skipped
        pipe.generate(task="t2v", prompt="p", text_guidance=4.0, image_guidance=2.0, seed=0, **FAST)
        assert set(counter.batch_sizes) == {2}
    finally:
        counter.remove()
    np.testing.assert_allclose(nearly, equal, atol=1e-5)
    separate = pipe.generate(image=image, prompt="p", text_guidance=4.0, image_guidance=1.0, seed=0, **FAST)
    assert np.abs(separate - equal).max() > 1e-4


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++", "euler"])
def test_a_lower_strength_starts_from_the_given_frames_and_skips_steps(pipe, scheduler):
    inputs: list[torch.Tensor] = []
    handle = pipe.unet.register_forward_hook(lambda module, args, output: inputs.append(args[0][0]))
    kwargs = dict(task="i2v", num_inference_steps=20, scheduler=scheduler, seed=0, progress=False)

    def first_inputs(strength: float) -> tuple[torch.Tensor, int]:
        """The UNet's first input for two different stickers (same seed, same noise), and the UNet calls made."""
        starts = []
        for image in (_frames(21)[0], _frames(22)[0]):
            inputs.clear()
            pipe.generate(image=image, strength=strength, **kwargs)
            starts.append(inputs[0])
        return starts[0] - starts[1], len(inputs)

    try:
        from_noise, calls = first_inputs(1.0)
        assert calls == 20 and torch.count_nonzero(from_noise) == 0  # pure noise: the sticker plays no part yet
        for strength, expected_calls in ((0.5, 10), (0.05, 1)):
            difference, calls = first_inputs(strength)
            assert calls == expected_calls
            # the noise cancels; what is left is the sticker's latent, the same in every frame (the i2v fill)
            assert difference.abs().mean() > 1e-3
            torch.testing.assert_close(difference[:, 1:], difference[:, :1].expand_as(difference[:, 1:]))
    finally:
        handle.remove()


@pytest.mark.parametrize("task", ["i2v", "interpolation"])
def test_residual_decode_adds_only_the_models_change_to_the_given_frames_pixel_fill(pipe, task):
    """residual - direct = pixel fill - D(latent fill): set by the given frames alone, whatever the seed sampled."""
    frames = _frames(23)
    source = dict(image=frames[0]) if task == "i2v" else dict(frames=frames)
    kwargs = dict(task=task, keep_given=False, **source, **FAST)
    differences, unclamped = [], []
    for seed in (0, 1):
        direct = pipe.generate(decode="direct", seed=seed, **kwargs)
        residual = pipe.generate(decode="residual", seed=seed, **kwargs)
        differences.append(residual - direct)
        unclamped.append((direct > 0) & (direct < 1) & (residual > 0) & (residual < 1))
    both = unclamped[0] & unclamped[1]
    assert both.mean() > 0.5 and np.abs(differences[0][both]).mean() > 1e-3
    np.testing.assert_allclose(differences[0][both], differences[1][both], atol=1e-4)


def test_residual_decode_is_direct_decode_without_given_frames(pipe):
    kwargs = dict(task="t2v", prompt="p", seed=0, **FAST)
    np.testing.assert_array_equal(pipe.generate(decode="residual", **kwargs), pipe.generate(decode="direct", **kwargs))


def test_text_to_video_always_starts_from_noise(pipe):
    kwargs = dict(task="t2v", prompt="p", seed=0, **FAST)
    np.testing.assert_array_equal(pipe.generate(strength=0.5, **kwargs), pipe.generate(**kwargs))


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_every_scheduler_samples_for_both_prediction_types(prediction_type):
    components = build_tiny_components(sample_size=8, image_size=16, prediction_type=prediction_type)
    pipeline = RDTFPipeline(components)
    image = _frames(10)[0]
    outputs = {}
    for name in ("ddim", "dpm++", "euler"):
        scheduler = make_scheduler(name, components.scheduler.config)
        assert scheduler.config.prediction_type == prediction_type
        zero_snr = prediction_type == "v_prediction"
        assert scheduler.config.rescale_betas_zero_snr == zero_snr
        assert (scheduler.config.timestep_spacing == "trailing") == zero_snr
        outputs[name] = pipeline.generate(image=image, num_frames=F, scheduler=name, seed=0, keep_given=False, **FAST)
        assert np.isfinite(outputs[name]).all()
    # (deterministic DDIM and Euler are the same first-order solver, so only the 2nd-order DPM++ must differ)
    assert np.abs(outputs["ddim"] - outputs["dpm++"]).max() > 1e-4


def test_interpolation_helper_keeps_frames_and_raises_the_frame_rate(pipe):
    low = Clip.from_fps(_frames(11, count=4), fps=4)
    dense = pipe.interpolate(low, 2, num_frames=F, prompt="bounce", **FAST)  # windows of 3 frames (1 interval)
    assert dense.num_frames == 7
    assert dense.fps == pytest.approx(8, rel=0.02)
    for i in range(4):
        np.testing.assert_array_equal(dense.frames[2 * i], low.frames[i])
    triple = pipe.interpolate(Clip.from_fps(_frames(12, count=2), fps=4), 3, **FAST)
    assert triple.num_frames == 4 and np.array_equal(triple.frames[3], _frames(12, count=2)[1])
    with pytest.raises(ValueError, match="factor=5"):
        pipe.interpolate(low, 5)
    with pytest.raises(ValueError, match="at least 3 frames"):
        pipe.interpolate(low, 2, num_frames=2)


def test_given_frames_of_another_size_are_scaled_to_cover_and_centre_cropped(pipe):
    wide = np.zeros((1, 10, 30, 3), dtype=np.uint8)
    wide[:, :, 5:25] = 200  # a centre band wider than the cropped square (and than the filter)
    np.testing.assert_array_equal(fit_frames(wide, 8, 8), np.full((1, 8, 8, 3), 200, np.uint8))
    assert fit_frames(np.zeros((2, 5, 7, 4), np.uint8), 16, 24).shape == (2, 16, 24, 3)
    clip = pipe(image=wide[0], prompt="band", **FAST)
    np.testing.assert_array_equal(clip.frames[0, ..., :3], np.full((8, 8, 3), 200, np.uint8))


def test_chunked_decode_and_half_precision(pipe, tmp_path):
    image = _frames(16)[0]
    whole = pipe.generate(image=image, decode_chunk_size=None, keep_given=False, **FAST)
    chunked = pipe.generate(image=image, decode_chunk_size=1, keep_given=False, **FAST)
    np.testing.assert_allclose(chunked, whole, atol=1e-5)
    pipe.save_pretrained(tmp_path / "model")
    half = RDTFPipeline.from_pretrained(tmp_path / "model", dtype=torch.bfloat16)
    assert {m.dtype for m in half.components.modules().values()} == {torch.bfloat16}
    low = half.generate(image=image, keep_given=False, **FAST)
    assert np.isfinite(low).all() and np.abs(low - whole).max() < 0.1


def test_clip_output_and_file(pipe, tmp_path):
    path = tmp_path / "out.gif"
    clip = pipe(image=_frames(13)[0], fps=10, output_path=path, **FAST)
    assert clip.durations_ms.tolist() == [100] * F
    assert read_clip(path).num_frames == F


def test_attention_runs_on_sdpa(pipe):
    for module in (pipe.components.unet, pipe.components.vae):
        assert {type(p) for p in module.attn_processors.values()} == {AttnProcessor2_0}


def test_pipeline_folder_round_trip(pipe, tmp_path):
    image = _frames(14)[0]
    pipe.save_pretrained(tmp_path / "model")
    again = RDTFPipeline.from_pretrained(tmp_path / "model")
    np.testing.assert_array_equal(
        again.generate(image=image, prompt="same", **FAST), pipe.generate(image=image, prompt="same", **FAST)
    )


BAD_CALLS = [
    (dict(image="IMAGE", height=12), "height=12: must be a positive multiple of 8"),
    (dict(image="IMAGE", num_frames=0), r"num_frames=0: must be an integer in \[1, 64\]"),
    (dict(image="IMAGE", num_frames=1000), r"num_frames=1000"),
    (dict(image="IMAGE", text_guidance=float("nan")), "text_guidance=nan"),
    (dict(image="IMAGE", image_guidance=-1.0), "image_guidance=-1.0"),
    (dict(frames="FRAMES", condition_mask="101"), "condition_mask has 3 entries but num_frames=4"),
    (dict(frames="FRAMES", condition_mask=[1, 0, 2, 0]), "values must be 0 or 1"),
    (dict(image="IMAGE", scheduler="pndm"), "scheduler='pndm'"),
    (dict(task="i2v"), "no image or frames"),
    (dict(condition_mask="0110"), "no image or frames"),
    (dict(task="warp"), "task='warp'"),
    (dict(image="IMAGE", task="interpolation"), "image gives one frame but the condition mask gives 2"),
    (dict(frames="FRAMES"), "without condition_mask or task"),
    (dict(image="IMAGE", frames="FRAMES"), "not both"),
    (dict(image="IMAGE", num_inference_steps=0), "num_inference_steps=0"),
    (dict(image="IMAGE", fps=0), "fps=0.0"),
    (dict(image="IMAGE", strength=0), "strength=0.0"),
    (dict(image="IMAGE", strength=1.5), "strength=1.5"),
    (dict(image="IMAGE", decode="pixels"), "decode='pixels'"),
    (dict(image="IMAGE", output_path="x.bmp"), "unknown extension"),
]


@pytest.mark.parametrize("kwargs,message", BAD_CALLS, ids=[m[:24] for _, m in BAD_CALLS])
def test_invalid_parameters_fail_before_any_model_work(pipe, kwargs, message):
    stand_ins = {"IMAGE": _frames(15)[0], "FRAMES": _frames(15)}
    kwargs = {key: stand_ins.get(value, value) if isinstance(value, str) else value for key, value in kwargs.items()}
    counter = _count(pipe)
    try:
        with pytest.raises(ValueError, match=message):
            pipe(**kwargs, progress=False)
    finally:
        counter.remove()
    assert sum(counter.counts.values()) == 0
