"""LoRA attach / save / load / scale / merge on tiny I2VGen-XL UNets (rdtf.lora)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rdtf.lora import (
    LORA_WEIGHT_NAME,
    adapter_names,
    attach_lora,
    load_lora,
    lora_scales,
    lora_targets,
    merge_lora,
    save_lora,
    set_lora_scale,
)
from rdtf.models import MASK_CHANNEL_MODULES, add_mask_channel, build_tiny_components, has_mask_channel
from rdtf.pipeline import RDTFPipeline


def _inputs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    dim = unet.config.cross_attention_dim
    channels = unet.image_latents_proj_in[0].in_channels
    return dict(
        sample=torch.randn(1, 4, 4, 8, 8, generator=g),
        timestep=torch.tensor(400),
        fps=torch.tensor([8.0]),
        image_latents=torch.randn(1, channels, 4, 8, 8, generator=g),
        image_embeddings=torch.randn(1, 1, dim, generator=g),
        encoder_hidden_states=torch.randn(1, 6, dim, generator=g),
    )


@torch.no_grad()
def _out(unet, inputs):
    return unet(**inputs, return_dict=False)[0]


def _trained(unet, preset="attention", name="default", seed=0, rank=2):
    """Attach an adapter and give it (and the mask-channel convs it trains) non-zero changes, as training would."""
    params = attach_lora(unet, preset=preset, rank=rank, adapter_name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in unet.named_parameters():
            if f"lora_B.{name}" in pname:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif pname.startswith(MASK_CHANNEL_MODULES) and p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return params


def _mask_convs(unet):
    return {f"{m}.{w}": unet.get_submodule(m).get_parameter(w).detach().clone() for m in MASK_CHANNEL_MODULES for w in ("weight", "bias")}


def test_presets_split_attention_into_temporal_and_spatial():
    unet = build_tiny_components().unet
    attention, temporal, spatial = (set(lora_targets(unet, p)) for p in ("attention", "temporal", "spatial"))
    assert temporal and spatial and temporal | spatial == attention and not temporal & spatial
    assert all(("temp_attentions" in n or "transformer_in" in n or "temporal_encoder" in n) for n in temporal)
    assert all(".attentions." in n for n in spatial)
    assert {n.rsplit(".", 1)[-1] for n in attention} == {"to_q", "to_k", "to_v", "0"}


def test_attention_conv_preset_adds_the_block_convolutions_and_round_trips(tmp_path):
    trained = build_tiny_components(seed=4).unet
    attention, with_convs = (set(lora_targets(trained, p)) for p in ("attention", "attention+conv"))
    convs = with_convs - attention
    assert attention < with_convs
    assert {type(trained.get_submodule(n)).__name__ for n in convs} == {"Conv2d", "Conv3d"}
    assert any(".resnets." in n for n in convs) and any(".temp_convs." in n for n in convs)
    _trained(trained, preset="attention+conv")
    save_lora(trained, tmp_path)
    inputs = _inputs(trained)

    unet = build_tiny_components(seed=4).unet
    base = _out(unet, inputs)
    load_lora(unet, tmp_path)
    assert {n.rsplit(".lora_A", 1)[0] for n, _ in unet.named_modules() if n.endswith(".lora_A")} >= convs
    assert not torch.allclose(_out(unet, inputs), base)
    torch.testing.assert_close(_out(unet, inputs), _out(trained, inputs))


def test_attached_adapter_starts_at_zero_effect_and_trains_only_itself():
    unet = build_tiny_components().unet
    inputs = _inputs(unet)
    before = _out(unet, inputs)
    params = attach_lora(unet, preset="temporal", rank=4)
    assert torch.equal(_out(unet, inputs), before)
    names = {n for n, p in unet.named_parameters() if p.requires_grad}
    lora = {n for n in names if ".lora_" in n}
    assert len(params) == len(names) and lora
    assert names - lora == {f"{m}.{w}" for m in MASK_CHANNEL_MODULES for w in ("weight", "bias")}
    with pytest.raises(ValueError, match="already attached"):
        attach_lora(unet, preset="temporal")
    with pytest.raises(ValueError, match="preset='motion'"):
        attach_lora(unet, preset="motion", adapter_name="other")


def test_saved_file_is_diffusers_format_with_extras(tmp_path):
    unet = build_tiny_components().unet
    _trained(unet, preset="spatial")
    path = save_lora(unet, tmp_path)
    assert path == tmp_path / LORA_WEIGHT_NAME
    state, alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(
        str(tmp_path), weight_name=LORA_WEIGHT_NAME, return_lora_metadata=True
    )
    unet_keys = [k for k in state if k.startswith("unet.")]
    extra_keys = sorted(k for k in state if k.startswith("rdtf.unet."))
    assert unet_keys and all(".lora_A." in k or ".lora_B." in k for k in unet_keys)
    assert len(unet_keys) + len(extra_keys) == len(state)
    assert extra_keys == sorted(f"rdtf.unet.{m}.{w}" for m in MASK_CHANNEL_MODULES for w in ("weight", "bias"))
    assert metadata["unet.r"] == 2 and metadata["unet.lora_alpha"] == 2


def test_load_scales_combine_and_merge(tmp_path):
    trained = build_tiny_components(seed=4).unet
    _trained(trained, name="default")
    save_lora(trained, tmp_path / "a.safetensors")
    inputs = _inputs(trained)
    with_lora = _out(trained, inputs)

    unet = build_tiny_components(seed=4).unet
    base = _out(unet, inputs)
    name = load_lora(unet, tmp_path / "a.safetensors", scale=0.0)
    assert name == "lora_0" and lora_scales(unet) == {"lora_0": 0.0}
    assert torch.equal(_out(unet, inputs), base)
    set_lora_scale(unet, name, 1.0)
    torch.testing.assert_close(_out(unet, inputs), with_lora)
    set_lora_scale(unet, name, 0.5)
    half = _out(unet, inputs)
    assert not torch.allclose(half, base) and not torch.allclose(half, with_lora)

    # a second adapter joins the first, each at its own scale
    other = build_tiny_components(seed=4).unet
    _trained(other, preset="temporal", name="default", seed=9)
    save_lora(other, tmp_path / "b")
    load_lora(unet, tmp_path / "b", scale=1.0, adapter_name="motion")
    assert adapter_names(unet) == ["lora_0", "motion"]
    assert lora_scales(unet) == {"lora_0": 0.5, "motion": 1.0}
    combined = _out(unet, inputs)
    assert not torch.allclose(combined, half)
    merge_lora(unet)
    assert adapter_names(unet) == [] and not any(".lora_" in n for n, _ in unet.named_parameters())
    torch.testing.assert_close(_out(unet, inputs), combined, atol=1e-5, rtol=1e-5)


def test_extras_bring_the_mask_channel_to_a_base_without_one(tmp_path):
    trained = build_tiny_components(seed=2).unet
    _trained(trained)
    with torch.no_grad():
        trained.image_latents_proj_in[0].weight[:, 4].fill_(0.25)
    save_lora(trained, tmp_path)
    inputs = _inputs(trained)
    expected = _out(trained, inputs)
    base = build_tiny_components(seed=2, mask_channel=False).unet
    load_lora(base, tmp_path)
    assert has_mask_channel(base)
    torch.testing.assert_close(_out(base, inputs), expected)


def test_mask_channel_extras_are_saved_as_deltas_and_follow_the_lora_scale(tmp_path):
    trained = build_tiny_components(seed=4).unet
    base_convs = _mask_convs(trained)
    _trained(trained)
    trained_convs = _mask_convs(trained)
    path = save_lora(trained, tmp_path)
    with safe_open(path, "pt") as handle:
        assert handle.metadata()["rdtf_extras"] == "delta"
    stored = load_file(path)
    for key, value in trained_convs.items():
        assert torch.equal(stored[f"rdtf.unet.{key}"], value - base_convs[key])
    inputs = _inputs(trained)
    with_lora = _out(trained, inputs)

    unet = build_tiny_components(seed=4).unet
    base = _out(unet, inputs)
    name = load_lora(unet, path, scale=0.0)
    assert all(torch.equal(v, base_convs[k]) for k, v in _mask_convs(unet).items())
    assert torch.equal(_out(unet, inputs), base)
    set_lora_scale(unet, name, 1.0)
    torch.testing.assert_close(_mask_convs(unet), trained_convs)
    torch.testing.assert_close(_out(unet, inputs), with_lora)
    set_lora_scale(unet, name, 0.5)
    halfway = {k: (base_convs[k] + trained_convs[k]) / 2 for k in base_convs}
    torch.testing.assert_close(_mask_convs(unet), halfway)
    half = _out(unet, inputs)
    set_lora_scale(unet, name, 0.0)
    assert torch.equal(_out(unet, inputs), base)

    set_lora_scale(unet, name, 0.5)
    merge_lora(unet)
    torch.testing.assert_close(_mask_convs(unet), halfway)
    torch.testing.assert_close(_out(unet, inputs), half, atol=1e-5, rtol=1e-5)


def test_scale_zero_extras_on_a_base_without_mask_channel_only_add_the_zero_slice(tmp_path):
    trained = build_tiny_components(seed=2).unet
    _trained(trained)
    save_lora(trained, tmp_path)
    unet = build_tiny_components(seed=2, mask_channel=False).unet
    reference = build_tiny_components(seed=2, mask_channel=False).unet
    add_mask_channel(reference)
    inputs = _inputs(reference)
    name = load_lora(unet, tmp_path, scale=0.0)
    assert has_mask_channel(unet)
    assert torch.equal(_out(unet, inputs), _out(reference, inputs))
    set_lora_scale(unet, name, 1.0)
    torch.testing.assert_close(_mask_convs(unet), _mask_convs(trained))


def test_files_with_whole_extras_still_load_and_scale(tmp_path):
    trained = build_tiny_components(seed=5).unet
    _trained(trained)
    path = save_lora(trained, tmp_path / "new.safetensors")
    with safe_open(path, "pt") as handle:
        metadata = {k: v for k, v in handle.metadata().items() if k != "rdtf_extras"}
    whole = {k: v for k, v in load_file(path).items() if not k.startswith("rdtf.unet.")}
    whole.update({f"rdtf.unet.{k}": v for k, v in _mask_convs(trained).items()})
    save_file(whole, tmp_path / "old.safetensors", metadata=metadata)

    unet = build_tiny_components(seed=5).unet
    base_convs = _mask_convs(unet)
    name = load_lora(unet, tmp_path / "old.safetensors", scale=1.0)
    torch.testing.assert_close(_mask_convs(unet), _mask_convs(trained))
    set_lora_scale(unet, name, 0.0)
    assert all(torch.equal(v, base_convs[k]) for k, v in _mask_convs(unet).items())


def test_scale_zero_lora_leaves_the_pipeline_output_unchanged(tmp_path):
    components = build_tiny_components(sample_size=8, image_size=16, num_frames=4)
    trained = copy.deepcopy(components.unet)
    _trained(trained)
    save_lora(trained, tmp_path)
    pipe = RDTFPipeline(components)
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    kwargs = dict(image=image, prompt="wave", num_inference_steps=2, progress=False, seed=3)
    base = pipe.generate(**kwargs)
    name = load_lora(pipe, tmp_path, scale=0.0)
    np.testing.assert_array_equal(pipe.generate(**kwargs), base)
    set_lora_scale(pipe, name, 1.0)
    assert np.abs(pipe.generate(**kwargs) - base).max() > 1e-4
    with pytest.raises(ValueError, match="carries LoRA adapters"):
        pipe.save_pretrained(tmp_path / "model")
    merge_lora(pipe)
    pipe.save_pretrained(tmp_path / "model")


def test_bad_lora_files_are_rejected_before_touching_the_unet(tmp_path):
    unet = build_tiny_components().unet
    with pytest.raises(FileNotFoundError, match=LORA_WEIGHT_NAME):
        load_lora(unet, tmp_path / "missing")
    source = build_tiny_components().unet
    _trained(source)
    path = save_lora(source, tmp_path / "ok.safetensors")
    state = load_file(path)
    renamed = {k.replace("down_blocks.0", "down_blocks.7"): v for k, v in state.items()}
    save_file(renamed, tmp_path / "stranger.safetensors")
    with pytest.raises(ValueError, match="modules this UNet lacks"):
        load_lora(unet, tmp_path / "stranger.safetensors")
    save_file({"text_encoder.x.lora_A.weight": torch.zeros(2, 2)}, tmp_path / "te.safetensors")
    with pytest.raises(ValueError, match="only UNet LoRAs"):
        load_lora(unet, tmp_path / "te.safetensors")
    with pytest.raises(ValueError, match="scale=nan"):
        load_lora(unet, path, scale=float("nan"))
    assert adapter_names(unet) == [] and not any(".lora_" in n for n, _ in unet.named_parameters())
