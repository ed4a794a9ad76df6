"""The training loop on a tiny model: it learns, saves what loads, resumes exactly, refuses bad input."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from built_in import built_in_dataset
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from safetensors.torch import load_file

from rdtf.cache import build_cache, encoder_fingerprint
from rdtf.data import StickerDataset, prepare_dataset
from rdtf.lora import load_lora
from rdtf.masks import condition_mask
from rdtf.models import RDTF_CONFIG_NAME, build_tiny_components, encode_text, load_components
from rdtf.pipeline import RDTFPipeline
from rdtf.train import (
    CARD_NAME,
    CHECKPOINT_DIR,
    EMA,
    LOG_NAME,
    ResumableBatches,
    TrainConfig,
    TrainingError,
    enable_block_checkpointing,
    noised_and_target,
    sample_timesteps,
    text_influence,
    train,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny model folder and a prepared 24-sticker set at 32 px, shared by the tests here."""
    root = tmp_path_factory.mktemp("train")
    built_in_dataset(root, count=24, size=32, seed=3)
    build_tiny_components(seed=0, sample_size=8, image_size=16).save_pretrained(root / "model")
    return root


def _config(workspace: Path, out: str, **overrides) -> TrainConfig:
    values = dict(
        base=str(workspace / "model"), data=str(workspace / "data"), output_dir=str(workspace / out), split=None,
        max_steps=4, batch_size=2, learning_rate=1e-3, lr_warmup_steps=0, checkpoint_every=2, validate_every=4,
        log_every=1, num_validation=1, validation_inference_steps=2, progress=False, trackers=[],
    )
    values.update(overrides)
    return TrainConfig(**values)


def _lora_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "pytorch_lora_weights.safetensors")


def test_lora_run_writes_a_diffusers_lora_that_changes_the_sampler(workspace):
    out = train(_config(workspace, "lora", ema_decay=0.9, snr_gamma=5.0, offset_noise=0.05, trackers=["tensorboard"]))
    assert list((out / "logs").rglob("events.out.tfevents.*"))  # TensorBoard through accelerate's tracker
    state, _ = StableDiffusionLoraLoaderMixin.lora_state_dict(str(out), local_files_only=True)
    assert state and all(key.startswith(("unet.", "rdtf.unet.")) for key in state)
    assert any(key.startswith("rdtf.unet.image_latents_proj_in") for key in state)  # the mask channel trains too
    card = __import__("json").loads((out / CARD_NAME).read_text())
    assert card["steps"] == 4 and card["config"]["lora_rank"] == 16 and len(card["data_hash"]) == 16
    assert (out / "validation" / "step-000004.gif").is_file()
    with open(out / LOG_NAME) as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4] and "val_it2v" in rows[-1]

    pipe = RDTFPipeline.from_pretrained(workspace / "model")
    frame = (torch.rand(32, 32, 3) * 255).to(torch.uint8).numpy()
    kwargs = dict(image=frame, prompt="a cat bouncing", num_frames=8, num_inference_steps=2, progress=False)
    before = pipe(**kwargs).frames
    load_lora(pipe, out)
    assert not (pipe(**kwargs).frames == before).all()


def _logged_losses(out: Path) -> list[float]:
    with open(out / LOG_NAME) as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def test_cache_and_on_the_fly_see_the_same_losses(workspace):
    # Only the first step is compared: Adam's first updates are ~lr*sign(grad), which turns the
    # float noise of different encoder batch sizes into sign flips of near-zero gradients later.
    cached = train(_config(workspace, "cached", max_steps=1, validate_every=99))
    live = train(_config(workspace, "live", max_steps=1, validate_every=99, cache=False))
    assert _logged_losses(cached) == pytest.approx(_logged_losses(live), rel=1e-5)
    assert len(list((workspace / "data" / ".cache").iterdir())) == 1  # second run reused the cache


def test_cache_is_rebuilt_when_the_encoders_change(workspace, tmp_path):
    other = tmp_path / "model"
    build_tiny_components(seed=1, sample_size=8, image_size=16).save_pretrained(other)
    train(_config(workspace, "other", base=str(other), max_steps=1, validate_every=99, cache_dir=str(tmp_path / "c")))
    train(_config(workspace, "same", max_steps=1, validate_every=99, cache_dir=str(tmp_path / "c")))
    assert len(list((tmp_path / "c").iterdir())) == 2


def test_cache_is_kept_when_only_the_recommended_sampler_changes(workspace, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(workspace / "model", model)
    config_file = model / RDTF_CONFIG_NAME
    config = json.loads(config_file.read_text(encoding="utf-8"))
    before = encoder_fingerprint(model)
    config_file.write_text(json.dumps({**config, "sampler": {"strength": 0.5}, "task_sampler": {"i2v": {"strength": 0.8}}}))
    assert encoder_fingerprint(model) == before
    config_file.write_text(json.dumps({**config, "max_text_length": config["max_text_length"] - 1}))
    assert encoder_fingerprint(model) != before


def test_a_cache_finished_by_another_run_meanwhile_is_used(workspace, tmp_path):
    """Two runs that start at once both encode; the slower one must take the finished cache, not fail."""
    components = load_components(workspace / "model")
    dataset = StickerDataset(workspace / "data")
    theirs = build_cache(components, dataset, tmp_path / "theirs", "same-encoders", progress=False)
    target = tmp_path / "ours" / theirs.name

    class FinishedMeanwhile(StickerDataset):
        def __getitem__(self, index):
            if not target.exists():
                shutil.copytree(theirs, target)
            return super().__getitem__(index)

    folder = build_cache(components, FinishedMeanwhile(workspace / "data"), tmp_path / "ours", "same-encoders",
                         progress=False)
    assert folder == target and (folder / "index.json").is_file()
    assert [p.name for p in (tmp_path / "ours").iterdir()] == [target.name]  # our staging folder is gone


def _run_in_subprocess(config: TrainConfig) -> subprocess.Popen:
    code = f"from rdtf.train import TrainConfig, train; train(TrainConfig(**{config.to_dict()!r}))"
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)


def test_resume_after_sigkill_ends_with_the_same_weights(workspace):
    settings = dict(max_steps=6, validate_every=99, lr_scheduler="cosine", curriculum="adaptive", lora_dropout=0.1)
    reference = train(_config(workspace, "whole", **settings))
    config = _config(workspace, "killed", **settings)
    process = _run_in_subprocess(config)
    first = Path(config.output_dir) / CHECKPOINT_DIR / "step-00000002"
    deadline = time.time() + 300
    while not first.is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (Path(config.output_dir) / CARD_NAME).exists(), "the run finished before it could be killed"
    resumed = train(config)
    a, b = _lora_tensors(reference), _lora_tensors(resumed)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


def test_full_training_saves_a_loadable_model(workspace):
    out = train(_config(workspace, "full", mode="full", max_steps=3, validate_every=99, curriculum="linear"))
    with open(out / LOG_NAME) as handle:
        first, *_, last = list(csv.DictReader(handle))
    assert float(last["weight_t2v"]) > float(first["weight_t2v"])  # the linear curriculum moves toward generation
    trained = load_components(out / "model")
    base = load_components(workspace / "model")
    changed = [
        name for name, p in trained.unet.named_parameters() if not torch.equal(p, dict(base.unet.named_parameters())[name])
    ]
    assert changed


def test_residual_space_trains_a_static_clip_like_an_empty_one_and_the_model_keeps_its_space(workspace, tmp_path):
    scheduler = build_tiny_components(seed=0, sample_size=8, image_size=16).scheduler
    static = torch.randn(1, 4, 1, 8, 8).expand(2, 4, 8, 8, 8)  # every frame the given sticker
    mask = condition_mask("i2v", 8).expand(2, -1)
    noise, timesteps = torch.randn(static.shape, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 999])
    nothing = noised_and_target(scheduler, torch.zeros_like(static), mask, noise, timesteps, "latent")
    for got, want in zip(noised_and_target(scheduler, static, mask, noise, timesteps, "residual"), nothing):
        torch.testing.assert_close(got, want)  # nothing to denoise but the noise: the fill is the answer
    assert not torch.allclose(noised_and_target(scheduler, static, mask, noise, timesteps, "latent")[1], nothing[1])



@pytest.mark.parametrize("fill", ["interpolate", "flow"])
def test_a_residual_space_model_trains_and_keeps_its_space_and_fill(workspace, tmp_path, fill):
    base = tmp_path / "residual-model"
    build_tiny_components(seed=0, sample_size=8, image_size=16, condition_fill=fill,
                          diffusion_space="residual").save_pretrained(base)
    out = train(_config(workspace, f"residual-{fill}", base=str(base), mode="full", max_steps=2, validate_every=2,
                        batch_size=4))
    config = load_components(out / "model").config
    assert (config.diffusion_space, config.condition_fill) == ("residual", fill)
    with open(out / LOG_NAME) as handle:
        rows = list(csv.DictReader(handle))
    assert all(math.isfinite(float(rows[-1][f"val_{task}"])) for task in ("i2v", "interpolation"))
    assert all(math.isfinite(float(row["loss"])) for row in rows)


def test_text_tower_trains_with_the_unet_and_resumes_exactly(workspace, tmp_path):
    data = built_in_dataset(tmp_path, count=60, size=32, seed=3)  # with 4 val clips for the text influence
    settings = {"mode": "full", "train_text_encoder": True, "max_steps": 4, "validate_every": 2, "ema_decay": 0.9,
                "text_dropout": 0.3, "num_validation": 3, "data": str(data)}
    whole = train(_config(workspace, "text-whole", **settings))
    with open(whole / LOG_NAME) as handle:
        assert float(list(csv.DictReader(handle))[-1]["val_text_influence"]) > 0
    base = load_components(workspace / "model").text_encoder.state_dict()
    trained = load_components(whole / "model").text_encoder.state_dict()
    assert any(not torch.equal(base[name], trained[name]) for name in base)

    # interrupted after step 2: the step-4 checkpoint and the output never got written
    killed = workspace / "text-killed"
    shutil.copytree(whole, killed)
    shutil.rmtree(killed / CHECKPOINT_DIR / "step-00000004")
    shutil.rmtree(killed / "model")
    (killed / CARD_NAME).unlink()
    resumed = load_components(train(_config(workspace, "text-killed", **settings)) / "model")
    for name, value in resumed.text_encoder.state_dict().items():
        torch.testing.assert_close(value, trained[name], atol=1e-6, rtol=0)
    unet = load_components(whole / "model").unet.state_dict()
    for name, value in resumed.unet.state_dict().items():
        torch.testing.assert_close(value, unet[name], atol=1e-6, rtol=0)


def test_text_influence_is_zero_only_for_a_unet_that_ignores_the_text():
    components = build_tiny_components(seed=0, sample_size=8, image_size=16)
    unet = components.unet.eval()
    torch.manual_seed(0)
    latents = torch.randn(2, unet.config.in_channels, 8, 8, 8)
    image_latents = torch.cat([latents, torch.ones_like(latents[:, :1])], dim=1)  # + the mask channel
    kwargs = {"fps": torch.full((2,), 8.0), "image_latents": image_latents,
              "image_embeddings": torch.randn(2, 1, unet.config.cross_attention_dim)}

    def influence() -> float:
        captions = ["a cat nods", "a dog spins"]
        with torch.no_grad():
            own, other = (unet(latents, torch.tensor([500, 500]), encoder_hidden_states=encode_text(components, texts),
                               **kwargs).sample for texts in (captions, captions[::-1]))
        return text_influence(own, other)

    assert influence() > 1e-4
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2.to_v"):  # cross-attention values: the only way text reaches the output
                module.weight.zero_()
    assert influence() < 1e-6


def test_batches_are_disjoint_across_ranks_and_resume_anywhere():
    ranks = [ResumableBatches(20, 3, rank, 2, seed=0, start=0) for rank in range(2)]
    for micro_step in range(ranks[0].per_epoch):
        a, b = ranks[0].batch(micro_step), ranks[1].batch(micro_step)
        assert len(a) == len(b) == 3 and not set(a) & set(b)
    epoch = [i for r in ranks for s in range(r.per_epoch) for i in r.batch(s)]
    assert len(epoch) == len(set(epoch)) == 18
    later = iter(ResumableBatches(20, 3, 1, 2, seed=0, start=5))
    assert next(later) == ranks[1].batch(5)


def test_gradient_checkpointing_gives_the_plain_gradients():
    components = build_tiny_components(seed=0, sample_size=8, image_size=16)
    unet = components.unet.train().requires_grad_(True)
    torch.manual_seed(0)
    inputs = dict(
        sample=torch.randn(2, 4, 4, 8, 8), timestep=torch.tensor([10, 500]), fps=torch.tensor([8.0, 8.0]),
        image_latents=torch.randn(2, 5, 4, 8, 8), image_embeddings=torch.randn(2, 1, 8),
        encoder_hidden_states=torch.randn(2, 6, 8),
    )

    def grads() -> list[torch.Tensor]:
        torch.manual_seed(1)  # the temporal convs' dropout
        unet.zero_grad()
        unet(**inputs).sample.pow(2).mean().backward()
        return [p.grad.clone() for p in unet.parameters() if p.grad is not None]

    plain = grads()
    enable_block_checkpointing(unet)
    checkpointed = grads()
    assert len(plain) == len(checkpointed)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lora_rank": 0}, "lora_rank=0"),
        ({"tasks": ["dance"]}, "tasks="),
        ({"only_motions": ["moonwalk"]}, "no stickers match"),
        ({"lora_targets": r"no_such_module$"}, "no_such_module"),
        ({"batch_size": 64}, "cannot fill one batch"),
        ({"mixed_precision": "fp8"}, "mixed_precision='fp8'"),
        ({"train_text_encoder": True}, "needs mode='full'"),
        ({"timestep_shift": 0.5}, "timestep_shift=0.5"),
        ({"given_frames_max_strength": 0.0}, "given_frames_max_strength=0.0"),
    ],
)
def test_bad_settings_are_named(workspace, overrides, message):
    with pytest.raises(ValueError, match=message):
        train(_config(workspace, "bad", **overrides))


def test_size_that_the_model_cannot_take_is_refused(workspace, tmp_path):
    deep = tmp_path / "deep"  # 2x VAE and three UNet downsamplings: clips must be multiples of 16 px
    build_tiny_components(seed=0, unet_channels=(4, 8, 8, 8), vae_channels=(8, 8), sample_size=8).save_pretrained(deep)
    prepare_dataset(workspace / "stickers", tmp_path / "odd", num_frames=8, size=24, progress=False)
    with pytest.raises(ValueError, match="24px, not a multiple of 16"):
        train(_config(workspace, "odd", base=str(deep), data=str(tmp_path / "odd")))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(workspace):
    config = _config(workspace, "nan", max_steps=8, learning_rate=1e30, lr_scheduler="constant", checkpoint_every=1)
    with pytest.raises(TrainingError, match="loss became nan") as error:
        train(config)
    assert "step-0000000" in str(error.value)
    shutil.rmtree(config.output_dir)


def test_two_processes_train_with_torchrun_and_the_adapter_loads(workspace):
    """The same accelerate code over gloo: `accelerate launch` on GPUs, torchrun here (no MPI)."""
    out = workspace / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "rdtf.cli", "train",
        "--base", str(workspace / "model"), "--data", str(workspace / "data"), "--output-dir", str(out),
        "--max-steps", "2", "--batch-size", "2", "--checkpoint-every", "2", "--validate-every", "99",
        "--no-progress", "--trackers", "--split", "",
    ]
    subprocess.run(command, cwd=ROOT, check=True, timeout=600)
    card = __import__("json").loads((out / CARD_NAME).read_text())
    assert card["processes"] == 2 and card["steps"] == 2
    pipe = RDTFPipeline.from_pretrained(workspace / "model")
    load_lora(pipe, out)


def test_bf16_mixed_precision_keeps_lora_weights_in_fp32(workspace):
    out = train(_config(workspace, "bf16", max_steps=1, validate_every=99, mixed_precision="bf16"))
    assert {t.dtype for t in _lora_tensors(out).values()} == {torch.float32}


def test_8bit_adam_without_bitsandbytes_says_what_to_install(workspace):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="bitsandbytes"):
            train(_config(workspace, "adam8", use_8bit_adam=True))
    else:
        pytest.skip("bitsandbytes is installed: the 8-bit optimizer itself is exercised on GPUs")


def test_min_snr_weighting_stops_after_snr_gamma_steps(workspace):
    plain = _logged_losses(train(_config(workspace, "snr-none", max_steps=3)))
    weighted = _logged_losses(train(_config(workspace, "snr-all", max_steps=3, snr_gamma=5.0)))
    switched = _logged_losses(train(_config(workspace, "snr-1", max_steps=3, snr_gamma=5.0, snr_gamma_steps=1)))
    assert switched[0] == pytest.approx(weighted[0]) and weighted[0] != pytest.approx(plain[0])
    never = _logged_losses(train(_config(workspace, "snr-0", max_steps=3, snr_gamma=5.0, snr_gamma_steps=0)))
    assert never == pytest.approx(plain)


def test_timestep_shift_draws_noisier_steps_and_1_is_the_uniform_stream():
    def draw(shift: float) -> torch.Tensor:
        return sample_timesteps(20_000, 1000, shift, torch.Generator().manual_seed(0))

    uniform = torch.randint(0, 1000, (20_000,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(draw(1.0), uniform)  # runs without a shift resume exactly as before it existed
    shifted = draw(5.0)
    assert shifted.dtype == torch.long and 0 <= int(shifted.min()) and int(shifted.max()) <= 999
    # s·u / (1 + (s−1)·u) >= 0.7  <=>  u >= 0.7 / (s − 0.7·(s−1)) = 0.318 for s = 5
    assert float((shifted >= 700).float().mean()) == pytest.approx(1 - 0.7 / 2.2, abs=0.01)
    assert float((uniform >= 700).float().mean()) == pytest.approx(0.3, abs=0.01)
    per_example = sample_timesteps(20_000, 1000, torch.tensor([5.0, 1.0]).repeat(10_000), torch.Generator())
    shifted_mean, uniform_mean = (float(half.float().mean()) for half in (per_example[0::2], per_example[1::2]))
    assert shifted_mean > 650 and uniform_mean < 550


def test_timestep_shift_reaches_the_generation_tasks_only(workspace):
    def losses(tasks: list[str], out: str, **shift) -> list[float]:
        return _logged_losses(train(_config(workspace, out, max_steps=2, tasks=tasks, **shift)))

    assert losses(["it2v"], "shift-it2v", timestep_shift=5.0)[0] != pytest.approx(losses(["it2v"], "plain-it2v")[0])
    refine = ["interpolation"]
    assert losses(refine, "shift-interp", timestep_shift=5.0) == pytest.approx(losses(refine, "plain-interp"))


def test_given_frames_max_strength_keeps_refining_tasks_below_their_sampling_start(workspace):
    ceiling = torch.tensor([0.2, 1.0]).repeat(10_000)
    drawn = sample_timesteps(20_000, 1000, torch.tensor([1.0, 5.0]).repeat(10_000), torch.Generator(), ceiling)
    low, shifted = drawn[0::2], drawn[1::2]
    assert int(low.max()) < 200 and float(low.float().mean()) == pytest.approx(100, abs=3)  # uniform below 0.2
    assert float(shifted.float().mean()) > 650  # the generation tasks keep their shift

    def losses(tasks: list[str], out: str, **ceiling) -> list[float]:
        return _logged_losses(train(_config(workspace, out, max_steps=2, tasks=tasks, **ceiling)))

    refine = ["interpolation"]
    assert losses(refine, "low-interp", given_frames_max_strength=0.2) != pytest.approx(losses(refine, "all-interp"))
    assert losses(["it2v"], "low-it2v", given_frames_max_strength=0.2) == pytest.approx(losses(["it2v"], "all-it2v"))


def test_ema_warms_up_so_the_random_start_fades_out():
    weight = torch.nn.Parameter(torch.zeros(3))
    ema = EMA({"w": weight}, decay=0.999)
    assert ema.decay_at(1) == pytest.approx(2 / 11) and ema.decay_at(100_000) == 0.999
    with torch.no_grad():
        weight.fill_(1.0)
    ema.update(1)
    assert torch.allclose(ema.shadow["w"], torch.full((3,), 9 / 11))
    for step in range(2, 2001):
        ema.update(step)
    assert ema.shadow["w"].min() > 0.999  # without the warm-up, 0.999 ** 2000 = 14% of the start would remain
