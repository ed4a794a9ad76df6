"""Tiny components, tokenizers, the mask channel, saving/loading and load errors (rdtf.models, rdtf.tokenizer)."""

from __future__ import annotations

import copy
import dataclasses
import shutil
import time
import warnings

import numpy as np
import pytest
import torch

from rdtf.models import (
    SAMPLER_DEFAULTS,
    ModelNotFoundError,
    RDTFConfig,
    add_mask_channel,
    build_tiny_components,
    encode_frames,
    encode_image_embeddings,
    encode_text,
    frames_to_pixels,
    has_mask_channel,
    load_components,
    replace_text_encoder,
)
from rdtf.pipeline import RDTFPipeline
from rdtf.tokenizer import CaptionTruncatedWarning, build_byte_tokenizer, build_char_tokenizer, tokenize

CHINESE = "一只戴着墨镜的小猫在挥手打招呼"
ENGLISH = "a small cat in sunglasses waves hello"


def _unet_inputs(unet, seed=0, frames=4, size=8, channels=4):
    g = torch.Generator().manual_seed(seed)
    dim = unet.config.cross_attention_dim
    return dict(
        sample=torch.randn(1, 4, frames, size, size, generator=g),
        timestep=torch.tensor(500),
        fps=torch.tensor([8.0]),
        image_latents=torch.randn(1, channels, frames, size, size, generator=g),
        image_embeddings=torch.randn(1, 1, dim, generator=g),
        encoder_hidden_states=torch.randn(1, 6, dim, generator=g),
    )


def _public(config):
    return {key: value for key, value in config.items() if not key.startswith("_")}


@torch.no_grad()
def _unet_out(unet, **inputs):
    return unet(**inputs, return_dict=False)[0]


def test_byte_tokenizer_reads_english_and_chinese():
    tokenizer = build_byte_tokenizer(model_max_length=128)
    assert len(tokenizer) == 514
    for text in (ENGLISH, CHINESE):
        ids = tokenizer(text).input_ids
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.unk_token_id not in ids[1:-1]
        assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == text.replace(" ", "")
    # three UTF-8 bytes per CJK character
    assert len(tokenizer(CHINESE).input_ids) == 3 * len(CHINESE) + 2


def test_char_tokenizer_gives_one_token_per_chinese_character():
    tokenizer = build_char_tokenizer(model_max_length=64)
    ids = tokenizer(CHINESE).input_ids
    assert len(ids) == len(CHINESE) + 2
    assert tokenizer.unk_token_id not in ids


def test_tokenize_pads_and_warns_only_when_a_caption_is_cut():
    tokenizer = build_byte_tokenizer(model_max_length=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids, mask = tokenize(tokenizer, ["hi"])
    assert ids.shape == mask.shape == (1, 16)
    assert mask.sum() == 4  # BOS, h, i, EOS
    with pytest.warns(CaptionTruncatedWarning, match="truncated from 47 to 16 tokens"):
        ids, _ = tokenize(tokenizer, [CHINESE])
    assert ids.shape == (1, 16) and ids[0, -1] == tokenizer.eos_token_id


def test_tiny_components_are_seeded():
    a, b, c = build_tiny_components(0), build_tiny_components(0), build_tiny_components(1)
    for (name, pa), pb, pc in zip(a.unet.named_parameters(), b.unet.parameters(), c.unet.parameters()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.unet.parameters(), c.unet.parameters()))
    assert a.config == RDTFConfig("byte_clip", True, 128, 8)
    assert a.default_size == 16 and has_mask_channel(a.unet)


def test_mask_channel_starts_at_zero_effect():
    components = build_tiny_components(mask_channel=False)
    stock = components.unet
    widened = copy.deepcopy(stock)
    add_mask_channel(widened)
    assert not has_mask_channel(stock) and has_mask_channel(widened)
    inputs = _unet_inputs(stock)
    reference = _unet_out(stock, **inputs)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0]).view(1, 1, 4, 1, 1).expand(1, 1, 4, 8, 8)
    inputs["image_latents"] = torch.cat([inputs["image_latents"], mask], dim=1)
    assert torch.equal(_unet_out(widened, **inputs), reference)
    with pytest.raises(ValueError, match="already has a mask channel"):
        add_mask_channel(widened)
    # once trained, the mask slice changes the output
    with torch.no_grad():
        widened.image_latents_proj_in[0].weight[:, 4].fill_(0.5)
    assert not torch.allclose(_unet_out(widened, **inputs), reference)


def test_clip_text_path_is_penultimate_layer_with_final_norm():
    components = build_tiny_components(text_layers=3)
    states = encode_text(components, [ENGLISH])
    # the same tower without its last layer ends in final_layer_norm(penultimate hidden state)
    shortened = copy.deepcopy(components.text_encoder)
    del shortened.encoder.layers[-1]
    ids, _ = tokenize(components.tokenizer, [ENGLISH])
    with torch.no_grad():
        expected = shortened(input_ids=ids).last_hidden_state
    torch.testing.assert_close(states, expected)
    assert states.shape == (1, 128, components.unet.config.cross_attention_dim)


def test_save_and_load_round_trip_gives_identical_outputs(tmp_path):
    components = build_tiny_components(seed=3)
    folder = components.save_pretrained(tmp_path / "model")
    names = {p.name for p in folder.iterdir()}
    assert {"model_index.json", "rdtf_config.json", "unet", "vae", "text_encoder", "tokenizer"} <= names
    assert not list(folder.rglob("*.bin")) and list(folder.rglob("*.safetensors"))
    loaded = load_components(folder)
    assert loaded.config == components.config and has_mask_channel(loaded.unet)
    inputs = _unet_inputs(components.unet, channels=5)
    assert torch.equal(_unet_out(loaded.unet, **inputs), _unet_out(components.unet, **inputs))
    with torch.no_grad():
        texts = [ENGLISH, CHINESE]
        assert torch.equal(encode_text(loaded, texts), encode_text(components, texts))
        images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
        assert torch.equal(encode_image_embeddings(loaded, images), encode_image_embeddings(components, images))
        pixels = frames_to_pixels(images)
        assert torch.equal(encode_frames(loaded.vae, pixels), encode_frames(components.vae, pixels))
    assert _public(loaded.scheduler.config) == _public(components.scheduler.config)
    # saving again over the folder replaces it in place
    components.save_pretrained(folder)
    assert load_components(folder).config == components.config


def test_chinese_clip_encoder_with_projection_round_trips(tmp_path):
    components = build_tiny_components(text_encoder_kind="chinese_clip", text_width=12, cross_attention_dim=8)
    assert components.text_projection is not None
    with torch.no_grad():
        states = encode_text(components, [CHINESE, ENGLISH])
    assert states.shape == (2, 128, 8)
    assert not torch.allclose(states[0], states[1])
    loaded = load_components(components.save_pretrained(tmp_path / "zh"))
    assert loaded.config.text_encoder_kind == "chinese_clip"
    with torch.no_grad():
        assert torch.equal(encode_text(loaded, [CHINESE, ENGLISH]), states)


def test_replace_text_encoder_adds_a_projection_when_widths_differ():
    base = build_tiny_components()
    chinese = build_tiny_components(text_encoder_kind="chinese_clip", text_width=16, cross_attention_dim=16)
    swapped = replace_text_encoder(base, chinese.text_encoder, chinese.tokenizer, "chinese_clip", max_text_length=32)
    assert swapped.text_projection.in_features == 16 and swapped.text_projection.out_features == 8
    assert swapped.config.max_text_length == 32 and swapped.unet is base.unet
    with torch.no_grad():
        assert encode_text(swapped, [CHINESE]).shape == (1, 32, 8)


def test_uncached_hub_id_offline_fails_fast_with_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError, match=r"rdtf-tests/not-cached.*huggingface-cli download"):
        load_components("rdtf-tests/not-cached")
    assert time.monotonic() - start < 10


def test_incomplete_folder_names_what_is_missing(tmp_path):
    folder = build_tiny_components().save_pretrained(tmp_path / "model")
    shutil.rmtree(folder / "unet")
    (folder / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(ModelNotFoundError, match=r"missing: unet/config\.json.*scheduler/scheduler_config\.json"):
        load_components(folder)
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        load_components(tmp_path / "nowhere" / "model")


def test_rdtf_config_rejects_unknown_kinds_and_keys(tmp_path):
    with pytest.raises(ValueError, match="text_encoder_kind='t5'"):
        RDTFConfig(text_encoder_kind="t5")
    with pytest.raises(ValueError, match="unknown keys"):
        RDTFConfig.from_dict({"mask_channel": True, "lora": 1})


def test_a_model_with_more_latent_channels_samples_and_round_trips(tmp_path):
    components = build_tiny_components(seed=0, latent_channels=6)
    assert components.vae.config.latent_channels == components.unet.config.in_channels == 6
    pipe = RDTFPipeline(components)
    image = np.full((16, 16, 3), 120, np.uint8)
    frames = pipe.generate(image=image, num_inference_steps=2, num_frames=4, progress=False)
    loaded = RDTFPipeline.from_pretrained(components.save_pretrained(tmp_path / "m"))
    again = loaded.generate(image=image, num_inference_steps=2, num_frames=4, progress=False)
    np.testing.assert_allclose(frames, again, atol=1e-5)
    with pytest.raises(ValueError, match="latent_channels=6"):
        build_tiny_components(seed=0, latent_channels=6, mask_channel=False)


def test_the_models_recommended_sampler_settings_apply_unless_a_call_names_its_own(tmp_path):
    components = build_tiny_components(seed=0)
    assert RDTFPipeline(components).sampler_settings == SAMPLER_DEFAULTS
    recommended = {"num_inference_steps": 3, "scheduler": "dpm++", "text_guidance": 2.0, "image_guidance": 1.0, "strength": 0.7,
                   "decode": "residual"}
    components.config = dataclasses.replace(components.config, sampler=recommended)
    pipe = RDTFPipeline.from_pretrained(components.save_pretrained(tmp_path / "m"))
    assert pipe.sampler_settings == recommended
    image = np.full((16, 16, 3), 120, np.uint8)
    by_default = pipe.generate(image=image, prompt="a cat", num_frames=4, progress=False)
    np.testing.assert_array_equal(by_default, pipe.generate(image=image, prompt="a cat", num_frames=4, progress=False,
                                                            **recommended))
    other = pipe.generate(image=image, prompt="a cat", num_frames=4, progress=False, num_inference_steps=2)
    assert not np.allclose(other, by_default)
    with pytest.raises(ValueError, match="unknown settings \\['steps'\\]"):
        RDTFConfig(sampler={"steps": 10})


def test_a_task_can_have_its_own_recommended_settings(tmp_path):
    components = build_tiny_components(seed=0)
    components.config = dataclasses.replace(components.config, sampler={"num_inference_steps": 2, "strength": 0.4},
                                            task_sampler={"i2v": {"strength": 1.0}})
    pipe = RDTFPipeline.from_pretrained(components.save_pretrained(tmp_path / "m"))
    assert pipe.sampler_settings_for("i2v")["strength"] == 1.0
    assert pipe.sampler_settings_for("it2v")["strength"] == pipe.sampler_settings["strength"] == 0.4
    image = np.full((16, 16, 3), 120, np.uint8)
    i2v = pipe.generate(image=image, num_frames=4, progress=False)  # task inferred: image, no prompt
    np.testing.assert_array_equal(i2v, pipe.generate(image=image, task="i2v", num_frames=4, progress=False, strength=1.0))
    assert not np.allclose(i2v, pipe.generate(image=image, task="i2v", num_frames=4, progress=False, strength=0.4))
    with pytest.raises(ValueError, match="task_sampler: unknown tasks \\['dance'\\]"):
        RDTFConfig(task_sampler={"dance": {"strength": 1.0}})
    with pytest.raises(ValueError, match="task_sampler.i2v: unknown settings \\['steps'\\]"):
        RDTFConfig(task_sampler={"i2v": {"steps": 10}})
