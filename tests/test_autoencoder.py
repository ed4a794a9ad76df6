"""The tiny-VAE trainer: it learns to reconstruct sticker frames and resumes exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from built_in import built_in_dataset
from diffusers import AutoencoderKL

from rdtf import checkpoint as ckpt
from rdtf.autoencoder import METRICS_NAME, VAE_DIR, AutoencoderConfig, _frames, reconstruction_psnr, train_autoencoder
from rdtf.data import StickerDataset
from rdtf.models import build_tiny_vae


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vae")
    built_in_dataset(root, count=24, size=32, seed=5)
    return root / "data"


def _config(data: Path, out: Path, **overrides) -> AutoencoderConfig:
    values = dict(data=str(data), output_dir=str(out), channels=[8, 16], steps=40, batch_size=8,
                  learning_rate=2e-3, checkpoint_every=10, progress=False)
    values.update(overrides)
    return AutoencoderConfig(**values)


def test_training_beats_the_untrained_autoencoder_and_sets_unit_variance(data, tmp_path):
    frames = _frames(StickerDataset(data, split="train"))
    before = reconstruction_psnr(build_tiny_vae([8, 16], 32), frames)
    folder = train_autoencoder(_config(data, tmp_path / "run"))
    vae = AutoencoderKL.from_pretrained(folder, use_safetensors=True)
    after = reconstruction_psnr(vae, frames)
    assert after > before + 3.0
    with torch.no_grad():
        latents = vae.encode(frames[:64].float() / 127.5 - 1).latent_dist.mean * vae.config.scaling_factor
    assert 0.7 < latents.std().item() < 1.3
    metrics = json.loads((tmp_path / "run" / METRICS_NAME).read_text())
    assert metrics["steps"] == 40 and metrics["val_psnr_db"] > 0


def test_a_resumed_run_ends_with_the_same_weights(data, tmp_path):
    straight = train_autoencoder(_config(data, tmp_path / "straight", steps=20))
    train_autoencoder(_config(data, tmp_path / "resumed", steps=20))
    # an interruption after step 10: everything written later is gone
    shutil.rmtree(ckpt.latest_checkpoint(tmp_path / "resumed" / "checkpoints"))
    shutil.rmtree(tmp_path / "resumed" / VAE_DIR)
    assert ckpt.latest_checkpoint(tmp_path / "resumed" / "checkpoints").name.endswith("10")
    resumed = train_autoencoder(_config(data, tmp_path / "resumed", steps=20))
    a = AutoencoderKL.from_pretrained(straight, use_safetensors=True).state_dict()
    b = AutoencoderKL.from_pretrained(resumed, use_safetensors=True).state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"steps": 0}, "steps=0"), ({"channels": []}, "channels="), ({"learning_rate": -1.0}, "learning_rate=-1.0"),
     ({"channels": [8] * 7}, "not a multiple"), ({"gradient_weight": -0.5}, "gradient_weight=-0.5")],
)
def test_bad_settings_are_named(data, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train_autoencoder(_config(data, tmp_path / "bad", **overrides))


def test_the_gradient_term_is_zero_only_for_equal_edges():
    from rdtf.autoencoder import image_gradient_l1

    image = torch.rand(2, 3, 8, 8)
    assert image_gradient_l1(image, image + 0.3).item() == pytest.approx(0.0, abs=1e-6)  # a shift keeps edges
    assert image_gradient_l1(image, torch.zeros_like(image)).item() > 0.1
