"""The recipe of the embedded model ``rdtf-tiny``: every stage, from a seed, with the kit's own tools.

``rdtf build-tiny`` runs :func:`build_tiny_model`, which chains the public steps a user
would run by hand:

1. ``synth`` + ``prepare``: the built-in sticker set (one motion held out of base training);
2. ``train-vae``: the tiny VAE on the training frames;
3. a randomly initialised I2VGen-XL-architecture model around that VAE (byte-level CLIP text
   tower that reads Chinese and English, toy image encoder, tiny 3-D UNet with the mask channel),
   whose text tower is then pretrained to read the training captions (:mod:`rdtf.text_tower`);
4. ``train --mode full``: the UNet on every task, every motion but the held-out one, then each
   refine phase (``refine_steps``) again from the previous phase's weights, with its own rate and batch;
5. ``train --mode lora``: a short LoRA on the held-out motion only (the fine-tuning demo);
6. the recommended sampler settings: a small guidance grid scored on val clips, the best
   saved in the model's ``rdtf_config.json`` (what every caller gets by default), then i2v's
   own start strength, chosen by how its clips move rather than by PSNR.

Each stage leaves its output in ``work_dir`` and is skipped when that output exists; the
training stages resume from their checkpoints, so an interrupted build continues where it
stopped. The shipped folders (model, LoRA, with their logs, configs and metrics) are copied
into place atomically at the end of their stage. ``stop_after`` ends the build after a stage.
A refine phase appended to the recipe continues a finished build from its last weights, and
``from_model`` lets a new work folder (on a GPU machine, say) start from a shipped model's
training record instead of its stages (:func:`adopt_model`).

Every stage runs on the GPU when there is one (training with ``gpu_mixed_precision``
autocast). The shipped v6 trained its base UNet (1500 steps, 6.3 min) on one H200, then its
refine phase (1000 steps, 70 min) and both sampler sweeps (21 min) on 2 CPU cores with AVX-512,
the i2v sweep's redo (20 min) on 2 AVX2 cores and its LoRA (150 steps in fp32, rank 64, 28 min)
on one AVX-512 core beside other runs; its text tower (30 s) and VAE come from the same recipe's
earlier stages. On 2 CPU cores alone the base UNet takes about 105 min (4.2 s/step with bf16
autocast; 5 hours in fp32 without AVX-512).
The VAE is v2's, trained by this recipe's VAE stage in 2 minutes on one H200 (3000 steps; about
4 hours on 2 CPU cores).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from rdtf.autoencoder import METRICS_NAME, VAE_DIR, AutoencoderConfig, train_autoencoder
from rdtf.bars import LANGUAGES, i2v_motion, text_control_hits, text_control_plans
from rdtf.conditioning import CONDITION_FILLS, DIFFUSION_SPACES
from rdtf.curriculum import CURRICULA
from rdtf.data import StickerDataset, manifest_hash, prepare_dataset
from rdtf.evaluate import cases_from_items, evaluate_methods, pipeline_method
from rdtf.io import write_atomic
from rdtf.lora import LORA_PRESETS
from rdtf.models import RDTF_CONFIG_NAME, Components, build_tiny_components
from rdtf.pipeline import DECODES, SCHEDULERS, RDTFPipeline
from rdtf.synthetic import build_sticker_set
from rdtf.text_tower import METRICS_NAME as TEXT_TOWER_METRICS_NAME
from rdtf.text_tower import pretrain_text_tower
from rdtf.train import CARD_NAME, LOG_NAME, MIXED_PRECISIONS, MODEL_DIR, TrainConfig, train

RECIPE_NAME = "rdtf_recipe.json"
SWEEP_NAME = "sampler_sweep.json"
TRAINING_DIR = "training"  # inside the shipped model: what produced it
STAGES = ("data", "vae", "init", "base", "lora", "sweep")
I2V_PREFIX = "sampler_i2v_"
LORA_STAMP = "lora_stage.json"  # with a LoRA: the model (its last phase's card) and the settings it was trained with
LORA_PREFIX = "lora_"
REFINE_FIELDS = ("refine_steps", "refine_learning_rate", "refine_batch_size")  # one entry per refine phase
SWEPT_TASKS = ("it2v", "interpolation")  # scored by PSNR against the ground truth (i2v has its own sweep)


@dataclass
class TinyRecipe:
    """Every choice behind rdtf-tiny; saved next to the shipped weights."""

    seed: int = 0
    # data
    count: int = 1800
    size: int = 64
    num_frames: int = 8
    holdout_motion: str = "spin"
    # VAE (4x downsampling: 64 px frames, 16x16 latents)
    vae_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    latent_channels: int = 16  # 16x16x16 latents: 3x fewer numbers than pixels, detail kept
    vae_steps: int = 3000
    vae_batch_size: int = 64
    vae_gradient_weight: float = 0.5
    # model
    unet_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    # width of each UNet attention head (diffusers' I2VGen-XL config value): v2's 4 gives 8-16 heads of
    # 4 numbers each; 16 trains 1.35x faster on CPU (benchmarks/results/attention_heads.md)
    unet_attention_head_dim: int = 16
    text_width: int = 32
    # steps of text-tower pretraining (rdtf.text_tower) before the UNet trains; v2: 0, its tower stayed random
    text_tower_steps: int = 600
    # frames to generate start from the given frames filled in time (see rdtf.conditioning): "flow" fills
    # the frames between two given ones with the optical-flow baseline (v5; v4: "interpolate", a latent
    # cross-fade), so in residual space the model learns only what flow gets wrong
    condition_fill: str = "flow"
    # what the UNet denoises: the latents (v2) or their difference from that fill (see rdtf.conditioning);
    # residual: +1.5 dB from pure noise on val clips over the same recipe in latent space
    diffusion_space: str = "residual"
    # base training (every task, every motion but the held-out one)
    # v2: sized to one H200 lease (0.22 s/step at batch 32); v4: 1100, 92 min on 2 CPU cores; v5: 1500 steps
    # in 6.3 min on one H200 (0.25 s/step with the flow fill), about 105 min on 2 CPU cores (4.2 s/step)
    unet_steps: int = 1500
    batch_size: int = 32
    learning_rate: float = 8e-4
    # Plain MSE: min-SNR gives v-prediction's zero-SNR (pure noise) step zero weight, so a model
    # trained with it never learns to start sampling from its conditioning (v0 used it for 600 steps).
    snr_gamma: float | None = None
    snr_gamma_steps: int | None = None
    # > 1 draws more high-noise timesteps for i2v, it2v and t2v (rdtf.train.sample_timesteps). 200 CPU steps
    # from v2 with 5: on two motions it preferred its own caption at t = 999 in 30/32 and 25/32 cases
    # (en/zh; uniform: 25, 18); on every motion, after 150 steps, still at chance
    unet_timestep_shift: float = 5.0
    # the task loss weights (rdtf.curriculum); under v5's flow fill the adaptive one gave interpolation,
    # whose residual loss is lowest, 0.06 of the weight in the last 250 steps (the generation tasks 0.25)
    curriculum: str = "adaptive"
    # further full-training phases, one after another from the previous phase's weights (none: []), each with
    # its own steps, learning rate (a warm restart of the cosine schedule) and batch size, all under
    # refine_curriculum. Appending a phase continues a finished build (or, with --from-model, the shipped model)
    # from its last weights: how a later session, a GPU lease say, adds training without redoing the rest.
    # v6's one phase: 1000 steps in 70 min on 2 CPU cores (4.2 s/step) lowered every validation loss (it2v
    # 0.522 -> 0.489, interpolation 0.722 -> 0.685, i2v 0.540 -> 0.504), raised the text influence (0.285 -> 0.336)
    refine_steps: list[int] = field(default_factory=lambda: [1000])
    refine_learning_rate: list[float] = field(default_factory=lambda: [3e-4])
    refine_batch_size: list[int] = field(default_factory=lambda: [32])
    refine_curriculum: str = "uniform"
    ema_decay: float | None = 0.999
    gpu_mixed_precision: str = "bf16"  # autocast for both training stages when they run on a GPU
    # the same on a CPU: "bf16" trains the base UNet 1.38x faster in half the memory on a CPU with AVX-512 bf16
    # (benchmarks/results/train.md); v4 was trained in fp32 ("no"); v6's refine phase with it. A CPU without
    # AVX-512 emulates bf16 and trains in fp32 instead (see training_precision)
    cpu_mixed_precision: str = "bf16"
    # held-out-motion LoRA, at the base's timestep shift (it2v samples from pure noise): uniform timesteps
    # gave v6's test spin +0.46 dB and the other motions -0.05; shift 5, +0.66 and +0.05 (150 steps, fp32).
    # 300 steps gave +0.69 and -0.01: the gain is bounded by the base's it2v, not by the LoRA's steps.
    # Adapting the blocks' convolutions too ("attention+conv"), which move content in space and time: val
    # spin +1.28 dB (attention alone +0.92), test +0.75 and the other motions +0.02 (same 150 steps, rank 8);
    # training only the generation tasks (i2v, it2v, t2v) instead: val +0.87, no gain. Rank (test spin / others):
    # 8 +0.75 / +0.02, 16 +0.83 / -0.04, 32 +0.95 / -0.04 (4.8 MB); rank 32 on every linear and conv layer of
    # the blocks (feed-forwards and proj_in/out too, 6.7 MB) gained the same +0.95 with -0.07 on the others.
    # Chosen on val spin PSNR (base 12.38): rank 32 at lr 1e-3 14.32, 2e-3 14.54; rank 64 at 1e-3 14.72,
    # 2e-3 14.90 (9.8 MB) -> test +1.00 / -0.07 (rank 32 at 2e-3 +0.98, rank 64 at 1e-3 +0.99; 20 test clips)
    lora_steps: int = 150
    lora_rank: int = 64
    lora_learning_rate: float = 2e-3
    lora_targets: str = "attention+conv"  # a preset of rdtf.lora.LORA_PRESETS
    # the LoRA stage's autocast on every machine, GPU or CPU: a 150-step stage costs minutes in fp32, and so
    # every machine trains the shipped LoRA (under the base's CPU bf16, an AVX-512 CPU trained a slightly
    # different one than an AVX2 CPU, which falls back to fp32)
    lora_mixed_precision: str = "no"
    validate_every: int = 2000
    checkpoint_every: int = 500
    # recommended sampler settings, chosen on val clips (it2v + interpolation PSNR) one after another:
    # the guidance pair (from pure noise, most steps), then the start strength and decode together (see
    # RDTFPipeline.generate), then the fewest steps within sampler_step_tolerance_db of the best step count;
    # on both tasks' mean (every task's default), and again on each alone (its own settings where they differ).
    # Changing only these in a finished work folder reruns the sweep alone.
    sampler_scheduler: str = "dpm++"
    sampler_text_guidance: list[float] = field(default_factory=lambda: [1.0, 4.0, 7.5])
    sampler_image_guidance: list[float] = field(default_factory=lambda: [1.0, 2.0])
    sampler_strengths: list[float] = field(default_factory=lambda: [1.0, 0.8, 0.6, 0.4, 0.2])
    sampler_decodes: list[str] = field(default_factory=lambda: ["direct", "residual"])
    sampler_step_counts: list[int] = field(default_factory=lambda: [6, 8, 10, 15])
    sampler_step_tolerance_db: float = 0.1
    sampler_clips: int = 6
    # it2v's own guidance and start follow its caption: the best PSNR among the options whose text control on
    # the val clips (each image under this many motion captions, English and Chinese on alternate images) is
    # within sampler_text_control_tolerance of the best option's. By PSNR alone v5 chose a start so near the
    # static sticker that every caption gave the same clip (test text control 12/48: chance)
    sampler_text_control_motions: int = 4
    sampler_text_control_tolerance: float = 0.1
    # then i2v's own step count, start strength and decode, judged by motion and sharpness at a bounded
    # loss of fidelity to the ground truth (see recommend_i2v_sampler). A strength below 1 skips whole
    # steps, so the step count sets how close to pure noise i2v can start: skipping 1 of 6 steps left the
    # residual candidate r1 static on val clips, skipping 1 of 15 moved every clip and kept it sharp, and
    # skipping 1 of 25 moved them more (median flow 0.70 px/frame against 0.43; the ground truth's: 1.09).
    # 35 steps from 0.97 skips 1 of 35: v6 chose it under the 2 dB guard (val: every clip moving, flow
    # ratio 0.89, sharpness 0.85; v6's earlier 25 steps from 0.95 moved 88% at flow ratio 0.71)
    sampler_i2v_step_counts: list[int] = field(default_factory=lambda: [15, 25, 35])
    sampler_i2v_strengths: list[float] = field(default_factory=lambda: [1.0, 0.97, 0.95, 0.8, 0.6, 0.4, 0.2])
    sampler_i2v_decodes: list[str] = field(default_factory=lambda: ["direct", "residual"])
    # how far below standing still a real motion scores: on the val split (56 whole clips, 364 pairs of a
    # clip and another learnable motion's clip of the same sticker) 1.32 dB on average (median 0.98, 75th
    # percentile 1.84, 80th 2.06). Averaged over sampler_i2v_clips (16) random pairs, the drop passes 1.5 dB
    # in 32% of draws and 2.0 dB in 7.7% (95th percentile 2.12): a 1.5 dB guard (v5) turns down a third of
    # genuinely lifelike motion, 1 dB (v4) more
    sampler_i2v_max_psnr_drop_db: float = 2.0
    sampler_i2v_clips: int = 16

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, values: dict[str, Any]) -> TinyRecipe:
        """The recipe a saved record describes; a field the record lacks is newer than it and had its default.

        Records from before the refine phases were lists give one phase as numbers (0 steps: none),
        trained at the recipe's batch size.
        """
        values = {**cls().to_dict(), **values}
        if not isinstance(values["refine_steps"], list):
            phases = 1 if values["refine_steps"] else 0
            values["refine_steps"] = [values["refine_steps"]] * phases
            values["refine_learning_rate"] = [values["refine_learning_rate"]] * phases
            values["refine_batch_size"] = [values["batch_size"]] * phases
        return cls(**values)

    def refine_phases(self) -> list[tuple[int, float, int]]:
        """(steps, learning rate, batch size) of each refine phase, in order."""
        return list(zip(self.refine_steps, self.refine_learning_rate, self.refine_batch_size))

    def check(self) -> None:
        """Clear errors for a bad choice before any stage runs (the later stages come hours in on a CPU)."""
        choices = {
            "condition_fill": CONDITION_FILLS,
            "diffusion_space": DIFFUSION_SPACES,
            "curriculum": CURRICULA,
            "refine_curriculum": CURRICULA,
            "gpu_mixed_precision": MIXED_PRECISIONS,
            "cpu_mixed_precision": MIXED_PRECISIONS,
            "lora_mixed_precision": MIXED_PRECISIONS,
            "sampler_scheduler": SCHEDULERS,
            "lora_targets": LORA_PRESETS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected one of {', '.join(allowed)}")
        if len({len(getattr(self, name)) for name in REFINE_FIELDS}) > 1:
            raise ValueError(f"{', '.join(f'{name}={getattr(self, name)}' for name in REFINE_FIELDS)}: "
                             "expected one value per refine phase in each")
        if any(steps < 1 for steps in self.refine_steps) or any(size < 1 for size in self.refine_batch_size):
            raise ValueError(f"refine_steps={self.refine_steps}, refine_batch_size={self.refine_batch_size}: "
                             "expected positive numbers")
        if self.sampler_text_control_motions < 2:  # one caption per image cannot show text control
            raise ValueError(f"sampler_text_control_motions={self.sampler_text_control_motions}: expected at least 2")
        for name in ("sampler_decodes", "sampler_i2v_decodes"):
            if not getattr(self, name) or set(getattr(self, name)) - set(DECODES):
                raise ValueError(f"{name}={getattr(self, name)}: expected a non-empty list of {', '.join(DECODES)}")

    def untrained_components(self) -> Components:
        """The recipe's model with random weights (seeded): what the init stage starts from, before its VAE."""
        return build_tiny_components(
            self.seed, unet_channels=self.unet_channels, vae_channels=self.vae_channels, text_width=self.text_width,
            num_frames=self.num_frames, latent_channels=self.latent_channels, condition_fill=self.condition_fill,
            diffusion_space=self.diffusion_space, attention_head_dim=self.unet_attention_head_dim,
            sample_size=self.size // 2 ** (len(self.vae_channels) - 1),
        )

    def lora_settings(self) -> dict:
        """The fields of the LoRA stage alone: changing them retrains only the LoRA."""
        return {name: value for name, value in self.to_dict().items() if name.startswith(LORA_PREFIX)}

    def sweep_settings(self) -> dict:
        """The fields that only steer the sampler sweeps, not any trained weights."""
        return {name: value for name, value in self.to_dict().items() if name.startswith("sampler_")}

    def main_sweep_settings(self) -> dict:
        """The fields of the sweep that every task shares (:func:`recommend_sampler`)."""
        return {name: value for name, value in self.sweep_settings().items() if not name.startswith(I2V_PREFIX)}

    def i2v_sweep_settings(self) -> dict:
        """The fields of i2v's own sweep (:func:`recommend_i2v_sampler`)."""
        return {name: value for name, value in self.sweep_settings().items() if name.startswith(I2V_PREFIX)}


def _copy_into_place(source: Path, target: Path) -> Path:
    """Replace ``target`` by a copy of ``source`` without ever leaving a half-copied folder."""
    staging = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    if target.exists():
        old = target.parent / f".old-{target.name}-{os.getpid()}"
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, target)
    return target


def training_precision(recipe: TinyRecipe) -> str:
    """The recipe's autocast on this machine: its GPU one on a GPU, else its CPU one where the CPU computes it.

    A CPU without AVX-512 has no bf16 arithmetic and emulates it: on an AVX2-only 2-core CPU the
    recipe's base training ran 9x slower under bf16 autocast than in fp32 (112 s/step against 12,
    benchmarks/results/train_avx2.md), the LoRA stage over 4x (over 48 s/step against 10.5).
    """
    if torch.cuda.is_available():
        return recipe.gpu_mixed_precision
    if recipe.cpu_mixed_precision == "bf16" and torch.backends.cpu.get_cpu_capability() != "AVX512":
        return "no"
    return recipe.cpu_mixed_precision


def _train_config(recipe: TinyRecipe, **values) -> TrainConfig:
    """The recipe's training settings; ``values`` adds the stage's own and may override these."""
    shared = {
        "batch_size": recipe.batch_size,
        "mixed_precision": training_precision(recipe),
        # more high-noise timesteps for the generation tasks, in every stage: it2v samples from pure noise
        "timestep_shift": recipe.unet_timestep_shift,
        "validate_every": recipe.validate_every,
        "checkpoint_every": recipe.checkpoint_every,
        "seed": recipe.seed,
        "curriculum": recipe.curriculum,
        "trackers": [],
    }
    return TrainConfig(**{**shared, **values})


def phase_runs(work: Path, recipe: TinyRecipe) -> list[Path]:
    """The work folder's run of each full-training phase: the base, then each refine phase in order."""
    return [work / "base"] + [work / f"refine{number if number > 1 else ''}"
                              for number in range(1, len(recipe.refine_steps) + 1)]


def lora_run(work: Path, recipe: TinyRecipe) -> Path:
    """The work folder's run of the held-out-motion LoRA."""
    return work / f"lora-{recipe.holdout_motion}"


def lora_beside(model: Path, recipe: TinyRecipe) -> Path:
    """Where a build ships the LoRA of the model it ships to ``model``."""
    return model.parent / f"{model.name}-lora-{recipe.holdout_motion}"


def record_prefix(run: Path) -> str:
    """What a phase's card and log are prefixed with in the shipped training record ("" for the base)."""
    return "" if run.name == "base" else f"{run.name}_"


def training_changes(before: TinyRecipe, after: TinyRecipe) -> list[str]:
    """The training choices in which ``after`` differs from ``before``, whose finished stages it cannot reuse.

    Sampler settings steer only the sweeps and LoRA settings only the LoRA stage (both redone when
    they change), and refine phases appended after ``before``'s continue from its last weights, so
    none of these counts.
    """
    old, new = before.to_dict(), after.to_dict()
    appended = all(new[name][: len(old[name])] == old[name] for name in REFINE_FIELDS)
    redone = {**after.sweep_settings(), **after.lora_settings()}
    return sorted(name for name, value in new.items() if old[name] != value and name not in redone
                  and not (appended and name in REFINE_FIELDS))


def _lora_stamp(last_phase_card: Path, recipe: TinyRecipe) -> dict[str, Any]:
    """What the LoRA stage's result depends on: the model it adapts (its last phase's card) and its settings."""
    return {"base_card": json.loads(last_phase_card.read_text(encoding="utf-8")), "settings": recipe.lora_settings()}


def adopt_model(recipe: TinyRecipe, model: Path, work: Path) -> None:
    """Start the new work folder ``work`` from ``model``, shipped by this recipe, instead of redoing its stages.

    The model's training record stands in for the stages that made it: its VAE, the cards and logs
    of every training phase, its weights as the last phase's output (what an appended refine phase
    starts from) and the LoRA beside it (``<model>-lora-<motion>``) if its stamp says it was trained
    on this model. The data stage runs as usual (or finds its output already in ``work``), and the
    build checks that the data is what the record trained on. Refused unless ``recipe`` differs from
    the record's only in appended refine phases, LoRA settings and sampler settings.
    """
    record = model / TRAINING_DIR
    source = record / RECIPE_NAME
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such file; --from-model takes a model folder `rdtf build-tiny` shipped")
    shipped = TinyRecipe.from_record(json.loads(source.read_text(encoding="utf-8")))
    changed = training_changes(shipped, recipe)
    if changed:
        raise ValueError(f"{source}: {model} was built with other {changed}; appended refine phases can continue it, "
                         "other training choices need a new build")
    # the data stage's own outputs may be there already (carried to a GPU machine, say): the build checks them
    others = sorted({path.name for path in work.iterdir()} - {"data", "stickers"}) if work.exists() else []
    if others:
        raise ValueError(f"{work}: holds {others} but is not a work folder of `rdtf build-tiny` (it has no "
                         f"{RECIPE_NAME}); adopt into a new --work-dir or one holding only data and stickers")
    staging = work.parent / f".adopt-{work.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    runs = phase_runs(staging, shipped)
    for run in runs:
        run.mkdir(parents=True)
        for name in (CARD_NAME, LOG_NAME):
            shutil.copy2(record / f"{record_prefix(run)}{name}", run / name)
    shutil.copytree(model, runs[-1] / MODEL_DIR, ignore=shutil.ignore_patterns(TRAINING_DIR))
    shutil.copytree(model / VAE_DIR, staging / "vae" / VAE_DIR)
    shutil.copy2(record / METRICS_NAME, staging / "vae" / METRICS_NAME)
    if (record / TEXT_TOWER_METRICS_NAME).exists():
        shutil.copy2(record / TEXT_TOWER_METRICS_NAME, staging / TEXT_TOWER_METRICS_NAME)
    lora = lora_beside(model, shipped)
    stamp = lora / LORA_STAMP  # shipped with the LoRA: the model it was trained on, which may be an earlier one
    if stamp.exists() and json.loads(stamp.read_text(encoding="utf-8")) == _lora_stamp(runs[-1] / CARD_NAME, shipped):
        shutil.copytree(lora, lora_run(staging, shipped))
    work.mkdir(parents=True, exist_ok=True)
    for staged in staging.iterdir():
        os.replace(staged, work / staged.name)
    staging.rmdir()
    # last: a folder with its record is a finished adoption
    write_atomic(work / RECIPE_NAME, json.dumps(shipped.to_dict(), indent=2).encode("utf-8"))


def _same_file(first: Path, second: Path) -> bool:
    return first.is_file() and second.is_file() and first.read_bytes() == second.read_bytes()


def build_tiny_model(
    recipe: TinyRecipe,
    work_dir: str | os.PathLike = "runs/rdtf-tiny",
    model_out: str | os.PathLike = "assets/rdtf-tiny",
    lora_out: str | os.PathLike | None = None,
    progress: bool = True,
    stop_after: str | None = None,
    from_model: str | os.PathLike | None = None,
) -> tuple[Path, Path]:
    """Run (or continue) every stage up to ``stop_after`` (one of :data:`STAGES`; default all).

    ``from_model`` starts a new work folder from a model this recipe shipped (see :func:`adopt_model`):
    with a refine phase appended, the build trains only that phase and what depends on it.
    Returns the shipped model folder and the LoRA folder, which exist once their stages ran.
    """
    if stop_after is not None and stop_after not in STAGES:
        raise ValueError(f"stop_after={stop_after!r}: expected one of {', '.join(STAGES)}")
    recipe.check()
    work, model_out = Path(work_dir), Path(model_out)
    lora_out = Path(lora_out) if lora_out else lora_beside(model_out, recipe)
    recorded = work / RECIPE_NAME
    if from_model is not None and not recorded.exists():
        adopt_model(recipe, Path(from_model), work)
    work.mkdir(parents=True, exist_ok=True)
    if recorded.exists():
        changed = training_changes(TinyRecipe.from_record(json.loads(recorded.read_text(encoding="utf-8"))), recipe)
        if changed:
            raise ValueError(f"{recorded}: this work folder was started with other {changed}; use a new --work-dir")
    write_atomic(recorded, json.dumps(recipe.to_dict(), indent=2).encode("utf-8"))

    stickers, data = work / "stickers", work / "data"
    if not (data / "dataset.json").exists():
        if not (stickers / "captions.jsonl").exists():
            build_sticker_set(stickers, count=recipe.count, size=recipe.size, seed=recipe.seed,
                              holdout_motion=recipe.holdout_motion, progress=progress)
        prepare_dataset(stickers, data, num_frames=recipe.num_frames, size=recipe.size, seed=recipe.seed,
                        progress=progress)
    runs = phase_runs(work, recipe)
    trained_on = runs[0] / CARD_NAME
    if trained_on.exists() and json.loads(trained_on.read_text(encoding="utf-8"))["data_hash"] != manifest_hash(data):
        raise ValueError(f"{data}: not the dataset {trained_on} records training on (another manifest hash; the "
                         "built-in set renders differently under other OpenCV or Pillow versions than pyproject.toml "
                         "asks for); rebuild it with this recipe and those versions, or use a new --work-dir")
    if stop_after == "data":
        return model_out, lora_out

    vae_run = work / "vae"
    if not (vae_run / VAE_DIR).exists():
        train_autoencoder(AutoencoderConfig(
            data=str(data), output_dir=str(vae_run), channels=recipe.vae_channels,
            latent_channels=recipe.latent_channels, steps=recipe.vae_steps, batch_size=recipe.vae_batch_size,
            gradient_weight=recipe.vae_gradient_weight, seed=recipe.seed, progress=progress,
        ))
    if stop_after == "vae":
        return model_out, lora_out

    init = work / "init"  # the base phase's starting point
    if not init.exists() and not trained_on.exists():
        components = dataclasses.replace(
            recipe.untrained_components(), vae=AutoencoderKL.from_pretrained(vae_run / VAE_DIR, use_safetensors=True))
        if recipe.text_tower_steps:
            def seen(row: dict[str, Any]) -> bool:
                return row["motion"] != recipe.holdout_motion

            metrics = pretrain_text_tower(
                components, StickerDataset(data, split="train", predicate=seen),
                StickerDataset(data, split="val", predicate=seen), steps=recipe.text_tower_steps, seed=recipe.seed,
                progress=progress)
            write_atomic(work / TEXT_TOWER_METRICS_NAME, json.dumps(metrics, indent=2).encode("utf-8"))
        components.save_pretrained(init)
    if stop_after == "init":
        return model_out, lora_out

    # what every full-training phase shares: every task, every motion but the held-out one
    full = {"data": str(data), "mode": "full", "exclude_motions": [recipe.holdout_motion], "snr_gamma": recipe.snr_gamma,
            "ema_decay": recipe.ema_decay, "progress": progress}
    if not trained_on.exists():
        train(_train_config(
            recipe, **full, base=str(init), output_dir=str(runs[0]), max_steps=recipe.unet_steps,
            learning_rate=recipe.learning_rate, lr_warmup_steps=100, snr_gamma_steps=recipe.snr_gamma_steps,
        ))
    for number, (run, (steps, learning_rate, batch_size)) in enumerate(zip(runs[1:], recipe.refine_phases()), 1):
        if not (run / CARD_NAME).exists():
            train(_train_config(  # another seed each: other batches than the earlier phases' first steps
                recipe, **full, base=str(runs[number - 1] / MODEL_DIR), output_dir=str(run), max_steps=steps,
                seed=recipe.seed + number, learning_rate=learning_rate, batch_size=batch_size, lr_warmup_steps=50,
                curriculum=recipe.refine_curriculum,
            ))
    if not _same_file(model_out / TRAINING_DIR / f"{record_prefix(runs[-1])}{CARD_NAME}", runs[-1] / CARD_NAME):
        staged = work / "shipped-model"
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(runs[-1] / MODEL_DIR, staged)
        _copy_training_record(recipe, staged / TRAINING_DIR, runs, vae_run, work / TEXT_TOWER_METRICS_NAME)
        _copy_into_place(staged, model_out)
        shutil.rmtree(staged)
    if stop_after == "base":
        return model_out, lora_out

    lora_work = lora_run(work, recipe)
    stamp, stamp_file = _lora_stamp(runs[-1] / CARD_NAME, recipe), lora_work / LORA_STAMP
    if not stamp_file.exists() or json.loads(stamp_file.read_text(encoding="utf-8")) != stamp:
        shutil.rmtree(lora_work, ignore_errors=True)  # a LoRA (or a part-trained one) of another model or settings
        lora_work.mkdir(parents=True)
        write_atomic(stamp_file, json.dumps(stamp, indent=2).encode("utf-8"))
    if not (lora_work / CARD_NAME).exists():
        train(_train_config(
            recipe, base=str(model_out), data=str(data), output_dir=str(lora_work), mode="lora",
            only_motions=[recipe.holdout_motion], max_steps=recipe.lora_steps, lora_rank=recipe.lora_rank,
            lora_targets=recipe.lora_targets, learning_rate=recipe.lora_learning_rate, lr_warmup_steps=10,
            mixed_precision=recipe.lora_mixed_precision,
            progress=progress,
        ))
    if not _same_file(lora_out / CARD_NAME, lora_work / CARD_NAME):
        staged = work / "shipped-lora"
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir()
        for name in ("pytorch_lora_weights.safetensors", CARD_NAME, LOG_NAME, LORA_STAMP):
            shutil.copy2(lora_work / name, staged / name)
        _copy_into_place(staged, lora_out)
        shutil.rmtree(staged)
    if stop_after == "lora":
        return model_out, lora_out

    sweep_file = model_out / TRAINING_DIR / SWEEP_NAME

    def swept() -> dict[str, Any]:
        return json.loads(sweep_file.read_text(encoding="utf-8")) if sweep_file.exists() else {}

    main_sweep = swept()  # a sweep from before the per-task choices has no "by_task": redone too
    if main_sweep.get("recipe") != recipe.main_sweep_settings() or "by_task" not in main_sweep:
        recommend_sampler(model_out, data, recipe, progress)
    if swept().get("i2v", {}).get("recipe") != recipe.i2v_sweep_settings():
        recommend_i2v_sampler(model_out, data, recipe, progress)
    write_atomic(model_out / TRAINING_DIR / RECIPE_NAME, json.dumps(recipe.to_dict(), indent=2).encode("utf-8"))
    return model_out, lora_out


def recommend_sampler(model: Path, data: Path, recipe: TinyRecipe, progress: bool = True) -> dict[str, Any]:
    """Choose the model's sampler settings on val clips; save them in its config and the sweep beside it.

    One setting after another (see :class:`TinyRecipe`): guidance, start strength with
    decode, then the fewest steps that cost nothing in PSNR, since the default step count is
    what a user pays on every call. The choice is made on the mean PSNR of the swept tasks
    (the model's ``sampler``, which every other task uses too) and again on each swept task
    alone (its ``task_sampler`` entry, where that differs): interpolation, which must match
    most of its frames, can want another start than it2v. it2v's own guidance and start are
    chosen among the options that follow its caption (``sampler_text_control_tolerance``), so
    different captions of one image give different clips. t2v takes it2v's text guidance.
    Returns the shared choice.
    """
    dataset = StickerDataset(data, split="val", predicate=lambda row: row["motion"] != recipe.holdout_motion)
    items = [dataset[i] for i in range(min(recipe.sampler_clips, len(dataset)))]
    cases = {task: cases_from_items(items, [task]) for task in SWEPT_TASKS}
    pipe = RDTFPipeline.from_pretrained(model, device="cuda" if torch.cuda.is_available() else "cpu")
    scored: dict[tuple[str, str], float] = {}  # (options, task) -> mean PSNR: each pair is sampled once
    plans = text_control_plans(dataset, recipe.sampler_clips, recipe.sampler_text_control_motions,
                               recipe.holdout_motion, recipe.seed)
    controlled: dict[str, float] = {}  # options -> share of captions followed

    def text_control(candidates: dict[str, dict[str, Any]]) -> dict[str, float]:
        todo = {name: options for name, options in candidates.items() if _key(options) not in controlled}
        trials = sum(len(variants) for _, variants in plans)
        with tqdm(total=len(todo) * trials, desc="text control", disable=not progress) as bar:
            for options in todo.values():
                hits, total = text_control_hits(pipe, plans, {**options, "seed": recipe.seed, "progress": False},
                                                [column for _, column in LANGUAGES], bar)
                controlled[_key(options)] = hits / total
        return {name: controlled[_key(options)] for name, options in candidates.items()}

    def mean_psnr(candidates: dict[str, dict[str, Any]], tasks: list[str]) -> dict[str, float]:
        for task in tasks:
            todo = {name: options for name, options in candidates.items() if (_key(options), task) not in scored}
            if not todo:
                continue
            methods = {name: pipeline_method(pipe, seed=recipe.seed, progress=False, **options)
                       for name, options in todo.items()}
            result = evaluate_methods(cases[task], methods, baselines=False, keep_examples=0, progress=progress)
            for entry in result.aggregates:
                if entry["metric"] == "psnr":
                    scored[_key(todo[entry["method"]]), task] = float(entry["mean"])
        return {name: float(np.mean([scored[_key(options), task] for task in tasks]))
                for name, options in candidates.items()}

    def choose(tasks: list[str]) -> dict[str, Any]:
        follow_text = tasks == ["it2v"]
        following: dict[str, dict[str, float]] = {}  # the text control of each stage's options (it2v alone)

        def best(stage: str, psnr: dict[str, float], candidates: dict[str, dict[str, Any]]) -> dict[str, Any]:
            if not follow_text:
                return candidates[max(psnr, key=psnr.get)]
            following[stage] = text_control(candidates)
            return candidates[best_following(psnr, following[stage], recipe.sampler_text_control_tolerance)]

        most = max(recipe.sampler_step_counts)
        grid = {
            f"text {text:g} image {image:g}": dict(scheduler=recipe.sampler_scheduler, num_inference_steps=most,
                                                   text_guidance=text, image_guidance=image, strength=1.0)
            for text in recipe.sampler_text_guidance
            for image in recipe.sampler_image_guidance
        }
        by_guidance = mean_psnr(grid, tasks)
        chosen = best("text_control_by_guidance", by_guidance, grid)
        starts = {
            f"{strength} {decode}": {**chosen, "strength": float(strength), "decode": decode}
            for strength in recipe.sampler_strengths
            for decode in recipe.sampler_decodes
        }
        by_start = mean_psnr(starts, tasks)
        chosen = best("text_control_by_strength_and_decode", by_start, starts)
        steps = {str(n): {**chosen, "num_inference_steps": n} for n in recipe.sampler_step_counts}
        by_steps = {int(n): psnr for n, psnr in mean_psnr(steps, tasks).items()}
        chosen = {**chosen, "num_inference_steps": fewest_steps_within(by_steps, recipe.sampler_step_tolerance_db)}
        return {"tasks": tasks, "psnr_db_by_guidance": by_guidance, "psnr_db_by_strength_and_decode": by_start,
                "psnr_db_by_steps": {str(n): v for n, v in sorted(by_steps.items())}, **following, "chosen": chosen}

    shared = choose(list(SWEPT_TASKS))
    by_task = {task: choose([task]) for task in SWEPT_TASKS}
    task_sampler = {}
    for task, sweep in by_task.items():
        changes = {name: value for name, value in sweep["chosen"].items() if shared["chosen"][name] != value}
        if changes:
            task_sampler[task] = changes
    # t2v has no ground truth to be scored against; the caption drives it as it drives it2v
    text_guidance = by_task["it2v"]["chosen"]["text_guidance"]
    if text_guidance != shared["chosen"]["text_guidance"]:
        task_sampler["t2v"] = {"text_guidance": text_guidance}
    config_file = model / RDTF_CONFIG_NAME
    config = json.loads(config_file.read_text(encoding="utf-8"))
    # i2v's entry goes too: its sweep reruns on these settings (the new sweep file has none)
    write_atomic(config_file, json.dumps({**config, "sampler": shared["chosen"], "task_sampler": task_sampler},
                                         indent=2).encode("utf-8"))
    sweep = {"split": "val", "clips": len(items), "recipe": recipe.main_sweep_settings(), "shared": shared,
             "by_task": by_task}
    write_atomic(model / TRAINING_DIR / SWEEP_NAME, json.dumps(sweep, indent=2).encode("utf-8"))
    return shared["chosen"]


def _key(options: dict[str, Any]) -> str:
    return json.dumps(options, sort_keys=True)


def recommend_i2v_sampler(model: Path, data: Path, recipe: TinyRecipe, progress: bool = True) -> dict[str, Any]:
    """i2v's own step count, start strength and decode, saved as the model's ``task_sampler["i2v"]``.

    i2v has no single right motion, so the best PSNR (which rewards standing still) cannot
    choose its start. On val clips, with the model's other settings, among the options within
    ``sampler_i2v_max_psnr_drop_db`` of the best PSNR (a model that cannot yet animate must
    not trade the sticker's look for motion: from pure noise rdtf-tiny v2 moved in every clip
    but lost the sticker's colours and shape): the one whose clips stay sharp (median
    gradient energy within 20% of the ground truth's) and most often move like the ground
    truth (flow magnitude inside its clips' 10th-90th percentiles). Ties go to fewer steps.
    Options the model's last i2v sweep scored on the same clips are not sampled again (a new
    PSNR guard only chooses again; a new step count samples only its options). Returns the
    chosen options.
    """
    options = {f"{steps} steps {strength:g} {decode}":
               {"num_inference_steps": int(steps), "strength": float(strength), "decode": decode}
               for steps in sorted(recipe.sampler_i2v_step_counts)
               for strength in recipe.sampler_i2v_strengths for decode in recipe.sampler_i2v_decodes}
    sweep_file = model / TRAINING_DIR / SWEEP_NAME
    sweep = json.loads(sweep_file.read_text(encoding="utf-8"))
    dataset = StickerDataset(data, split="val", predicate=lambda row: row["motion"] != recipe.holdout_motion)
    clips = min(recipe.sampler_i2v_clips, len(dataset))
    # the model's sweep file is new whenever the model or its other settings are, so what it holds for
    # the same clips still holds: only options it lacks are sampled
    before = sweep.get("i2v", {})
    stored = before.get("by_steps_strength_and_decode", {}) if before.get("clips") == clips else {}
    todo = {name: option for name, option in options.items() if name not in stored}
    sampled = {}
    if todo:
        cases = cases_from_items([dataset[i] for i in range(clips)], ["i2v"])
        pipe = RDTFPipeline.from_pretrained(model, device="cuda" if torch.cuda.is_available() else "cpu")
        methods = {name: pipeline_method(pipe, seed=recipe.seed, progress=False, **option)
                   for name, option in todo.items()}
        result = evaluate_methods(cases, methods, baselines=False, keep_examples=0, progress=progress)
        for name in methods:
            rows = [row for row in result.rows if row["method"] == name]
            sampled[name] = {"psnr": float(np.mean([row["psnr"] for row in rows])), **i2v_motion(rows)}
    scores = {name: stored.get(name) or sampled[name] for name in options}
    chosen = options[most_lifelike(scores, recipe.sampler_i2v_max_psnr_drop_db)]
    config_file = model / RDTF_CONFIG_NAME
    config = json.loads(config_file.read_text(encoding="utf-8"))
    task_sampler = {task: changes for task, changes in config.get("task_sampler", {}).items() if task != "i2v"}
    changes = {name: value for name, value in chosen.items() if config.get("sampler", {}).get(name) != value}
    if changes:
        task_sampler["i2v"] = changes
    write_atomic(config_file, json.dumps({**config, "task_sampler": task_sampler}, indent=2).encode("utf-8"))
    sweep["i2v"] = {"clips": clips, "recipe": recipe.i2v_sweep_settings(),
                    "by_steps_strength_and_decode": scores, "chosen": chosen}
    write_atomic(sweep_file, json.dumps(sweep, indent=2).encode("utf-8"))
    return chosen


def most_lifelike(scores: dict[str, dict[str, float]], max_psnr_drop_db: float) -> str:
    """The i2v option (``psnr``, ``moving``, ``flow_ratio``, ``sharpness`` scores) that moves most like a sticker.

    Only options within ``max_psnr_drop_db`` of the best PSNR compete; among them sharp ones
    (sharpness within 20% of 1) first, then the most moving, then the median motion nearest the
    ground truth's (``flow_ratio``: on a few val clips ``moving`` saturates while the clips still move
    too little), then the sharpness nearest 1; on a tie, the first in ``scores``' order.
    """
    faithful = max(score["psnr"] for score in scores.values()) - max_psnr_drop_db

    def merit(name: str) -> tuple:
        score = scores[name]
        return (score["psnr"] >= faithful, abs(score["sharpness"] - 1) <= 0.2, score["moving"],
                -abs(np.log(max(score["flow_ratio"], 1e-6))), -abs(score["sharpness"] - 1))

    return max(scores, key=merit)


def best_following(psnr: dict[str, float], text_control: dict[str, float], tolerance: float) -> str:
    """The best-PSNR option among those whose text control is within ``tolerance`` of the best option's."""
    floor = max(text_control.values()) - tolerance - 1e-9  # shares are fractions: 0.8 - 0.1 > 0.7 in floats
    return max((name for name in psnr if text_control[name] >= floor), key=psnr.get)


def fewest_steps_within(psnr_by_steps: dict[int, float], tolerance_db: float) -> int:
    """The smallest step count whose PSNR is within ``tolerance_db`` of the best count's."""
    good_enough = max(psnr_by_steps.values()) - tolerance_db
    return min(steps for steps, psnr in psnr_by_steps.items() if psnr >= good_enough)


def _copy_training_record(recipe: TinyRecipe, record: Path, runs: list[Path], vae_run: Path, text_tower: Path) -> None:
    """The recipe, each training phase's card and log (prefixed by :func:`record_prefix`), the VAE's metrics and
    the text tower's (if pretrained), shipped next to the weights."""
    record.mkdir(parents=True)
    (record / RECIPE_NAME).write_text(json.dumps(recipe.to_dict(), indent=2), encoding="utf-8")
    for run in runs:
        for name in (CARD_NAME, LOG_NAME):
            shutil.copy2(run / name, record / f"{record_prefix(run)}{name}")
    shutil.copy2(vae_run / METRICS_NAME, record / METRICS_NAME)
    if text_tower.exists():
        shutil.copy2(text_tower, record / text_tower.name)
