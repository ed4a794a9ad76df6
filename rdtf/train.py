"""One training loop for every RDTF model: LoRA fine-tuning of a base or training from scratch.

Read it top to bottom: :class:`TrainConfig` says what can be set, :func:`train` sets up
(accelerate, model, data, curriculum, optimizer, resume) and runs the loop, where each
step samples a task and condition mask per clip, noises the latents and regresses the
scheduler's target on the frames the model must generate.

Every source of randomness in a step is seeded from ``(seed, rank, micro_step)``, so a
run killed at any point and resumed from its last checkpoint ends with the same weights
as one that never stopped, on one process or many. Runs in a notebook as
``train(config)`` or on many GPUs with ``accelerate launch -m rdtf.cli train ...``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration
from diffusers.optimization import get_scheduler
from torch.utils.checkpoint import checkpoint as activation_checkpoint
from torch.utils.data import DataLoader, Sampler, default_collate
from tqdm.auto import tqdm

from rdtf import checkpoint as ckpt
from rdtf.cache import CachedClips, build_cache, encode_items, encoder_fingerprint
from rdtf.conditioning import conditioning_latents, diffusion_offset
from rdtf.curriculum import CURRICULA, TASK_GROUP, TaskCurriculum
from rdtf.data import StickerDataset, manifest_hash
from rdtf.flow_fill import flow_fill_latents, video_frames
from rdtf.io import write_atomic
from rdtf.lora import LORA_PRESETS, attach_lora, save_lora
from rdtf.masks import TASKS, condition_mask
from rdtf.models import Components, encode_text, has_mask_channel, load_components, resolve_model_path

MIXED_PRECISIONS: tuple[str, ...] = ("no", "fp16", "bf16")  # accelerate's autocast choices
CARD_NAME = "rdtf_card.json"
LOG_NAME = "log.csv"
CHECKPOINT_DIR = "checkpoints"
MODEL_DIR = "model"


class TrainingError(RuntimeError):
    """Training stopped and cannot go on by itself (bad loss, failed checkpoint, ...)."""


@dataclass
class TrainConfig:
    """Everything a run depends on; saved in every checkpoint and output card."""

    base: str = "assets/rdtf-tiny"  # model folder or hub id (e.g. ali-vilab/i2vgen-xl)
    data: str = "data/builtin-prepared"  # a dataset folder written by `rdtf prepare`
    output_dir: str = "runs/lora"
    mode: str = "lora"  # "lora": train an adapter; "full": train every UNet weight (from scratch)
    # mode "full" only, one process: the text tower learns with the UNet, for models trained from scratch
    # (in rdtf-tiny it did not raise val_text_influence yet; see the #6 notes)
    train_text_encoder: bool = False
    # data
    split: str | None = "train"  # None or "" = every split
    exclude_motions: list[str] = field(default_factory=list)  # e.g. the held-out motion
    only_motions: list[str] = field(default_factory=list)  # e.g. a LoRA for one new motion
    caption_language: str = "both"  # "en", "zh" or "both" (one of the two per clip, at random)
    # tasks
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    curriculum: str = "adaptive"
    text_dropout: float = 0.1
    image_dropout: float = 0.1
    # LoRA
    lora_rank: int = 16
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_targets: str = "attention"  # a preset of rdtf.lora.LORA_PRESETS or a peft target regex
    train_mask_channel: bool = True
    # optimisation
    max_steps: int = 1000
    batch_size: int = 4
    grad_accum: int = 1
    learning_rate: float = 1e-4
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 50
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    use_8bit_adam: bool = False
    mixed_precision: str = "no"  # "no", "fp16", "bf16"
    gradient_checkpointing: bool = False
    offset_noise: float = 0.0
    snr_gamma: float | None = None  # min-SNR weighting (e.g. 5.0); None = plain MSE
    snr_gamma_steps: int | None = None  # min-SNR only for the first N steps, plain MSE after (None: all)
    # > 1: the generation tasks (i2v, it2v, t2v) draw more high-noise timesteps, where their motion is
    # decided; tasks that refine given frames keep uniform ones (see sample_timesteps)
    timestep_shift: float = 1.0
    # < 1: the tasks that refine given frames (interpolation, prediction) draw their timesteps uniformly below
    # this fraction of the schedule, the strength the sampler starts them at (rdtf-tiny: 0.2); noisier
    # steps are practice for a start they are never given. rdtf-tiny v6 + 300 steps at 0.2: interpolation
    # unchanged on val (21.05 dB against 21.04; flow 21.19), so its recipe keeps 1
    given_frames_max_strength: float = 1.0
    ema_decay: float | None = None
    # precompute cache
    cache: bool = True
    cache_dir: str | None = None  # default: <data>/.cache
    num_workers: int = 0
    # bookkeeping
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    validate_every: int = 100
    num_validation: int = 2
    validation_inference_steps: int = 10
    log_every: int = 10
    seed: int = 0
    progress: bool = True
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])

    def check(self) -> None:
        """Cheap checks with clear messages, before any model or data is touched."""
        choices = {
            "mode": ("lora", "full"),
            "curriculum": CURRICULA,
            "caption_language": ("en", "zh", "both"),
            "mixed_precision": MIXED_PRECISIONS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected one of {', '.join(allowed)}")
        unknown = [task for task in self.tasks if task not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"tasks={self.tasks}: expected a non-empty list of {', '.join(TASKS)}")
        for name in ("max_steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints",
                     "validate_every", "log_every", "validation_inference_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be an integer >= 1")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 1:
            raise ValueError(f"lora_rank={self.lora_rank}: must be an integer >= 1")
        for name in ("text_dropout", "image_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)}: must be in [0, 1]")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate={self.learning_rate}: must be a finite number > 0")
        if not (math.isfinite(self.timestep_shift) and self.timestep_shift >= 1):
            raise ValueError(f"timestep_shift={self.timestep_shift}: must be a finite number >= 1 (1 = uniform)")
        if not 0.0 < self.given_frames_max_strength <= 1.0:
            raise ValueError(f"given_frames_max_strength={self.given_frames_max_strength}: must be in (0, 1] (1 = all)")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ValueError(f"snr_gamma={self.snr_gamma}: must be > 0 (or None)")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay}: must be in (0, 1) (or None)")
        if self.train_text_encoder and self.mode != "full":
            raise ValueError("train_text_encoder=True needs mode='full' (a LoRA adapts the UNet only)")
        if self.mode == "lora" and self.lora_targets not in LORA_PRESETS and not self.lora_targets.strip():
            raise ValueError(f"lora_targets={self.lora_targets!r}: a preset ({', '.join(LORA_PRESETS)}) or a regex")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
        return cls(**{**values, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- pieces of the loop


class ResumableBatches(Sampler[list[int]]):
    """This rank's batches, epoch after epoch, starting at any micro-step.

    Epoch ``e`` shuffles all clips with seed ``(seed, e)``, deals them round-robin to
    ranks (each rank sees a disjoint part) and cuts full batches, so the batch of any
    micro-step is known without replaying the ones before it.
    """

    def __init__(self, num_items: int, batch_size: int, rank: int, world_size: int, seed: int, start: int) -> None:
        self.num_items, self.batch_size = num_items, batch_size
        self.rank, self.world_size, self.seed, self.start = rank, world_size, seed, start
        self.per_epoch = (num_items // world_size) // batch_size
        if self.per_epoch < 1:
            raise ValueError(
                f"{num_items} training clips cannot fill one batch of {batch_size} on each of {world_size} processes; "
                "lower batch_size or add data"
            )

    def batch(self, micro_step: int) -> list[int]:
        epoch, index = divmod(micro_step, self.per_epoch)
        order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        mine = order[self.rank :: self.world_size]
        return mine[index * self.batch_size : (index + 1) * self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        micro_step = self.start
        while True:
            yield self.batch(micro_step)
            micro_step += 1

    def __len__(self) -> int:  # endless; DataLoader only needs it to exist
        return 2**31


def enable_block_checkpointing(unet: torch.nn.Module) -> None:
    """Recompute each down/mid/up block's activations in backward (diffusers refuses for I2VGenXLUNet).

    Non-reentrant checkpointing: gradients equal the plain run's.
    """
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    for block in blocks:
        plain_forward = block.forward

        def checkpointed(*args: Any, _plain=plain_forward, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return _plain(*args, **kwargs)
            return activation_checkpoint(_plain, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed


class EMA:
    """Exponential moving average of the trained parameters (the weights that get saved).

    The decay warms up as ``(1 + step) / (10 + step)`` up to ``decay``, so the random initial
    weights fade out early instead of lingering (0.999 ** 2000 would still keep 14% of them).
    """

    def __init__(self, parameters: dict[str, torch.nn.Parameter], decay: float) -> None:
        self.parameters, self.decay = parameters, decay
        self.shadow = {name: p.detach().float().clone() for name, p in parameters.items()}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Average in the weights after optimizer step number ``step`` (1 for the first)."""
        weight = 1.0 - self.decay_at(step)
        for name, parameter in self.parameters.items():
            self.shadow[name].lerp_(parameter.detach().float(), weight)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for name, parameter in self.parameters.items():
            parameter.copy_(self.shadow[name].to(parameter.dtype))


def min_snr_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023) for epsilon or v targets."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas / (1 - alphas).clamp(min=1e-8)
    clipped = snr.clamp(max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr.clamp(min=1e-8)


def sample_timesteps(
    count: int, num_train_timesteps: int, shift: float | torch.Tensor, generator: torch.Generator,
    ceiling: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Training timesteps: uniform, or where ``shift > 1`` (a number or one per example) pushed toward
    pure noise by ``s·u / (1 + (s−1)·u)``; below ``ceiling`` (a fraction of the schedule) where it is < 1.

    The shift of SD3 and of the large video models: with many latents per clip the content is
    still visible through moderate noise, so only the noisiest steps must invent the motion
    from the caption and the given frame, and uniform sampling spends few examples there.
    The ceiling is the other end: a task the sampler starts at strength 0.2 only ever sees the
    lowest fifth of the schedule. With neither anywhere the draw is the uniform stream of runs
    from before they existed.
    """
    shift = torch.as_tensor(shift, dtype=torch.float32).expand(count)
    ceiling = torch.as_tensor(ceiling, dtype=torch.float32).expand(count)
    if bool((shift == 1).all()) and bool((ceiling == 1).all()):
        return torch.randint(0, num_train_timesteps, (count,), generator=generator)
    uniform = torch.rand(count, generator=generator)
    shifted = ceiling * shift * uniform / (1 + (shift - 1) * uniform)
    return (shifted * num_train_timesteps).long().clamp(max=num_train_timesteps - 1)


def noised_and_target(
    scheduler: Any, latents: torch.Tensor, condition_mask: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
    space: str, flow_latents: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's noisy input and what it regresses, for clean ``latents`` in the model's diffusion space.

    The target is the noise (epsilon models) or the velocity (v-prediction). ``flow_latents``:
    a ``flow``-fill model's encoded flow frames (:func:`rdtf.flow_fill.flow_fill_latents`).
    """
    clean = latents - diffusion_offset(latents, condition_mask, space, flow_latents)
    noisy = scheduler.add_noise(clean, noise, timesteps)
    if scheduler.config.prediction_type == "epsilon":
        return noisy, noise
    return noisy, scheduler.get_velocity(clean, noise, timesteps)


def text_influence(prediction: torch.Tensor, other_caption_prediction: torch.Tensor) -> float:
    """How much the caption steers the UNet: relative change of its output under another clip's caption.

    Logged as ``val_text_influence``. Near 0 means the UNet ignores the text, and then no
    guidance scale can make the clip follow its caption (rdtf-tiny v2: 0.02-0.03).
    """
    change = (prediction - other_caption_prediction).flatten(1).norm(dim=1)
    return (change / prediction.flatten(1).norm(dim=1).clamp(min=1e-8)).mean().item()


def generated_frame_errors(
    prediction: torch.Tensor, target: torch.Tensor, loss_mask: torch.Tensor, condition_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame MSE ``(B, F)`` and its weights: 1 on real frames the model has to make, else 0."""
    per_frame = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 3, 4))
    return per_frame, loss_mask * (1 - condition_mask)


def _dataset(config: TrainConfig, split: str | None) -> StickerDataset:
    def keep(row: dict[str, Any]) -> bool:
        motion = row.get("motion")
        if config.only_motions and motion not in config.only_motions:
            return False
        return motion not in config.exclude_motions

    return StickerDataset(config.data, split=split or None, predicate=keep)  # "" (from the CLI) = all


def _check_fit(components: Components, dataset: StickerDataset) -> None:
    """The dataset's clip size must survive the VAE and every UNet downsampling."""
    size = dataset.settings["size"]
    factor = components.vae_scale_factor * 2 ** (len(components.unet.config.block_out_channels) - 1)
    if size % factor:
        raise ValueError(f"{dataset.root}: clips are {size}px, not a multiple of {factor} as this model needs")


TEXT_ENCODER_PREFIX = "text_encoder."


def _trainable(components: Components) -> dict[str, torch.nn.Parameter]:
    """What the optimizer updates, by name: UNet parameters as named, text-tower ones prefixed."""
    found = {name: p for name, p in components.unet.named_parameters() if p.requires_grad}
    found.update({TEXT_ENCODER_PREFIX + name: p for name, p in components.text_encoder.named_parameters()
                  if p.requires_grad})
    return found


def _optimizer(config: TrainConfig, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError("use_8bit_adam=True needs bitsandbytes (`pip install bitsandbytes`, CUDA only)") from None
        return bnb.optim.AdamW8bit(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)


def _batch_inputs(
    components: Components, batch: dict[str, Any], cached: bool
) -> dict[str, torch.Tensor]:
    """Encoder outputs of a batch: read from the cache, or computed now with the same code."""
    if cached:
        return {name: batch[name] for name in ("latents", "text_en", "text_zh", "frame_embeds")}
    items = [{name: batch[name][i] for name in ("video", "caption_en", "caption_zh")} for i in range(len(batch["key"]))]
    return encode_items(components, items)


class CsvLog:
    """``log.csv``: one row per logged step; rows past a resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if path.is_file():
            with open(path, newline="", encoding="utf-8") as handle:
                self.rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= resume_step]

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        columns = list(dict.fromkeys(key for row in self.rows for key in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.rows)
        write_atomic(self.path, buffer.getvalue().encode("utf-8"))


# --------------------------------------------------------------------------- the loop


def train(config: TrainConfig) -> Path:
    """Train as ``config`` says; returns the output folder (LoRA file or model + card).

    Resumes from the newest checkpoint in ``<output_dir>/checkpoints`` when there is one.
    """
    config.check()
    out = Path(config.output_dir)
    model_root = resolve_model_path(config.base)
    train_set = _dataset(config, config.split)
    components = load_components(model_root)
    _check_fit(components, train_set)

    # accelerate keeps one process-wide state and refuses a second run in the same process (a
    # notebook) with another precision; forget it, keeping the process group of distributed runs.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        log_with=[t for t in config.trackers if t] or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        cpu=not torch.cuda.is_available(),
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    out.mkdir(parents=True, exist_ok=True)

    # ---- model: frozen encoders, trainable UNet (adapter or all of it)
    unet = components.unet
    for module in components.modules().values():
        module.requires_grad_(False).to(device)
    if config.mode == "lora":
        torch.manual_seed(config.seed)  # the adapter's random init
        attach_lora(
            unet,
            preset=config.lora_targets if config.lora_targets in LORA_PRESETS else "attention",
            target_modules=None if config.lora_targets in LORA_PRESETS else config.lora_targets,
            rank=config.lora_rank,
            alpha=config.lora_alpha,
            dropout=config.lora_dropout,
            train_mask_channel=config.train_mask_channel,
        )
    else:
        unet.requires_grad_(True)
        if config.train_text_encoder:
            if world > 1:
                raise ValueError("train_text_encoder=True runs on one process; train the text tower on one GPU")
            components.text_encoder.requires_grad_(True).train()
    if not _trainable(components):
        raise ValueError(f"lora_targets={config.lora_targets!r} matched no UNet module; presets: {', '.join(LORA_PRESETS)}")
    if config.gradient_checkpointing:
        enable_block_checkpointing(unet)
    unet.train()
    trainable = _trainable(components)
    optimizer = _optimizer(config, list(trainable.values()))
    lr_schedule = get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=config.max_steps
    )
    ema = EMA(trainable, config.ema_decay) if config.ema_decay else None
    curriculum = TaskCurriculum(config.curriculum, tasks=tuple(config.tasks), total_steps=config.max_steps,
                                seed=config.seed, text_dropout=config.text_dropout)
    noise_scheduler = components.scheduler
    mask_channel, fill, space = has_mask_channel(unet), components.config.condition_fill, components.config.diffusion_space

    # ---- resume
    step = 0
    latest = ckpt.latest_checkpoint(out / CHECKPOINT_DIR)
    if latest is not None:
        tensors, state = ckpt.load_checkpoint(latest)
        if state["config"]["base"] != config.base or state["config"]["mode"] != config.mode:
            raise ValueError(f"{latest}: was written for base={state['config']['base']!r}, mode={state['config']['mode']!r}")
        with torch.no_grad():
            for name, value in ckpt.unprefixed("model", tensors).items():
                trainable[name].copy_(value)
        optimizer.load_state_dict(ckpt.optimizer_from_flat(ckpt.unprefixed("optim", tensors), state["optimizer"]))
        lr_schedule.load_state_dict(state["lr_schedule"])
        curriculum.load_state_dict(state["curriculum"])
        if ema is not None:
            ema.shadow = {k: v.to(device) for k, v in ckpt.unprefixed("ema", tensors).items()}
        step = state["step"]
        accelerator.print(f"resuming from {latest} at step {step}")

    # ---- data: cached encoder outputs or pixels encoded on the fly
    if config.cache:
        cache_root = Path(config.cache_dir) if config.cache_dir else train_set.root / ".cache"
        fingerprint = encoder_fingerprint(model_root)
        if accelerator.is_main_process:
            build_cache(components, train_set, cache_root, fingerprint, progress=config.progress)
        accelerator.wait_for_everyone()
        source = CachedClips(train_set, build_cache(components, train_set, cache_root, fingerprint, progress=False),
                             with_video=fill == "flow")  # the flow fill is drawn from the pixels
        empty_text = source.empty_text().to(device)
    else:
        source = train_set
        with torch.no_grad():
            empty_text = encode_text(components, [""])[0].float()
    batches = ResumableBatches(len(source), config.batch_size, rank, world, config.seed, step * config.grad_accum)
    loader = iter(DataLoader(source, batch_sampler=batches, num_workers=config.num_workers,
                             collate_fn=default_collate, persistent_workers=config.num_workers > 0))

    unet, optimizer = accelerator.prepare(unet, optimizer)
    if accelerator.is_main_process:
        accelerator.init_trackers("rdtf", config={k: str(v) for k, v in config.to_dict().items()})
    log = CsvLog(out / LOG_NAME, step)
    validation = _Validation(config, components, accelerator) if accelerator.is_main_process else None
    progress = tqdm(total=config.max_steps, initial=step, desc="training", disable=not config.progress
                    or not accelerator.is_main_process)
    task_counts: dict[str, int] = {task: 0 for task in config.tasks}
    task_losses: dict[str, list[float]] = {task: [] for task in config.tasks}
    started = time.perf_counter()

    while step < config.max_steps:
        step_loss = torch.zeros((), device=device)
        for accum_index in range(config.grad_accum):
            micro_step = step * config.grad_accum + accum_index
            generator = torch.Generator(device="cpu").manual_seed(ckpt.step_seed(config.seed, rank, micro_step))
            torch.manual_seed(ckpt.step_seed(config.seed + 1, rank, micro_step))  # dropout inside the UNet
            curriculum.generator.manual_seed(ckpt.step_seed(config.seed + 2, rank, micro_step))
            batch = next(loader)
            with torch.no_grad():
                inputs = {k: v.to(device) for k, v in _batch_inputs(components, batch, config.cache).items()}
            loss_mask = batch["loss_mask"].to(device)
            tasks, cond_mask, use_text = curriculum.sample_batch(step, batch["loss_mask"])
            cond_mask, use_text = cond_mask.to(device), use_text.to(device)
            size = loss_mask.shape[0]

            # captions: one language per clip; tasks without text (and text dropout) get the empty prompt
            chinese = torch.rand(size, generator=generator) < 0.5
            if config.caption_language != "both":
                chinese[:] = config.caption_language == "zh"
            if config.train_text_encoder:  # encoded now, through the tower being trained
                captions = [(zh if is_zh else en) if used else ""
                            for en, zh, is_zh, used in zip(batch["caption_en"], batch["caption_zh"], chinese.tolist(),
                                                           use_text.tolist())]
                with accelerator.autocast():
                    text = encode_text(components, captions)
            else:
                text = torch.where(chinese.to(device).view(-1, 1, 1), inputs["text_zh"], inputs["text_en"])
                text = torch.where(use_text.view(-1, 1, 1), text, empty_text.expand_as(text))
            # image embedding of the first given frame, dropped for t2v and for image dropout
            has_given = cond_mask.sum(dim=1) > 0
            first_given = cond_mask.argmax(dim=1)
            keep_image = has_given & (torch.rand(size, generator=generator) >= config.image_dropout).to(device)
            image_embeds = inputs["frame_embeds"][torch.arange(size, device=device), first_given]
            image_embeds = (image_embeds * keep_image.view(-1, 1)).unsqueeze(1)

            latents = inputs["latents"]
            noise = torch.randn(latents.shape, generator=generator).to(device)
            if config.offset_noise:
                noise += config.offset_noise * torch.randn((*latents.shape[:2], 1, 1, 1), generator=generator).to(device)
            generation = torch.tensor([TASK_GROUP[task] == "generation" for task in tasks])
            shift = torch.where(generation, config.timestep_shift, 1.0)
            ceiling = torch.where(generation, 1.0, config.given_frames_max_strength)
            timesteps = sample_timesteps(size, noise_scheduler.config.num_train_timesteps, shift, generator,
                                         ceiling).to(device)
            flow_latents = (flow_fill_latents(components.vae, video_frames(batch["video"]), cond_mask).to(device)
                            if fill == "flow" else None)
            noisy, target = noised_and_target(noise_scheduler, latents, cond_mask, noise, timesteps, space, flow_latents)
            fps = batch["fps"].to(device).float()

            sync = accum_index == config.grad_accum - 1
            with accelerator.autocast(), (accelerator.no_sync(unet) if not sync and world > 1 else nullcontext()):
                prediction = unet(
                    noisy,
                    timesteps,
                    fps=fps,
                    image_latents=conditioning_latents(latents, cond_mask, mask_channel, fill, flow_latents),
                    image_embeddings=image_embeds,
                    encoder_hidden_states=text,
                    return_dict=False,
                )[0]
                per_frame, weights = generated_frame_errors(prediction, target, loss_mask, cond_mask)
                per_clip = (per_frame * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
                if config.snr_gamma and (config.snr_gamma_steps is None or step < config.snr_gamma_steps):
                    per_clip = per_clip * min_snr_weights(noise_scheduler, timesteps, config.snr_gamma)
                loss = per_clip.mean()
                accelerator.backward(loss / config.grad_accum)
            step_loss += loss.detach() / config.grad_accum
            for task, value in zip(tasks, per_clip.detach().tolist()):
                task_counts[task] += 1
                task_losses[task].append(value)

        mean_loss = accelerator.gather(step_loss.reshape(1)).mean().item()
        if not math.isfinite(mean_loss):
            kept = ckpt.latest_checkpoint(out / CHECKPOINT_DIR)
            raise TrainingError(
                f"loss became {mean_loss} at step {step + 1}; stopped without saving. "
                f"Last good checkpoint: {kept or 'none'} (lower learning_rate, or try mixed_precision='no')"
            )
        accelerator.clip_grad_norm_(list(trainable.values()), config.max_grad_norm)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if ema is not None:
            ema.update(step)
        curriculum.update(step, mean_loss)
        progress.update(1)
        progress.set_postfix(loss=f"{mean_loss:.4f}", level=curriculum.level)

        if step % config.log_every == 0 or step == config.max_steps:
            weights_now = curriculum.weights(step)
            row: dict[str, Any] = {"step": step, "loss": round(mean_loss, 6), "lr": lr_schedule.get_last_lr()[0],
                                   "level": curriculum.level, "seconds": round(time.perf_counter() - started, 2)}
            row.update({f"weight_{t}": round(w, 4) for t, w in weights_now.items()})
            row.update({f"count_{t}": n for t, n in task_counts.items()})
            row.update({f"loss_{t}": round(sum(v) / len(v), 6) for t, v in task_losses.items() if v})
            task_losses = {task: [] for task in config.tasks}
            if validation is not None and (step % config.validate_every == 0 or step == config.max_steps):
                row.update(validation.losses(accelerator.unwrap_model(unet)))
                validation.render(accelerator.unwrap_model(unet), out / "validation" / f"step-{step:06d}.gif")
            if accelerator.is_main_process:
                log.append(row)
                accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step)
        if step % config.checkpoint_every == 0 or step == config.max_steps:
            _save_checkpoint(config, accelerator, out, step, trainable, optimizer, lr_schedule, curriculum, ema)

    progress.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to_model()
        _save_output(config, accelerator.unwrap_model(unet), components, out, step, log.rows, world)
    accelerator.end_training()
    return out


def _save_checkpoint(
    config: TrainConfig,
    accelerator: Accelerator,
    out: Path,
    step: int,
    trainable: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    lr_schedule: Any,
    curriculum: TaskCurriculum,
    ema: EMA | None,
) -> None:
    if accelerator.is_main_process:
        opt_tensors, opt_skeleton = ckpt.optimizer_to_flat(optimizer.state_dict())
        tensors = {**ckpt.prefixed("model", {k: p.detach() for k, p in trainable.items()}),
                   **ckpt.prefixed("optim", opt_tensors)}
        if ema is not None:
            tensors.update(ckpt.prefixed("ema", ema.shadow))
        state = {
            "step": step,
            "config": config.to_dict(),
            "optimizer": opt_skeleton,
            "lr_schedule": lr_schedule.state_dict(),
            "curriculum": curriculum.state_dict(),
        }
        try:
            ckpt.save_checkpoint(out / CHECKPOINT_DIR, step, tensors, state, keep_last=config.keep_checkpoints)
        except OSError as error:
            kept = ckpt.latest_checkpoint(out / CHECKPOINT_DIR)
            raise TrainingError(
                f"checkpoint at step {step} could not be written ({error}); the previous one is kept: {kept or 'none'}"
            ) from error
    accelerator.wait_for_everyone()


def _save_output(
    config: TrainConfig,
    unet: torch.nn.Module,
    components: Components,
    out: Path,
    step: int,
    log_rows: list[dict],
    processes: int,
) -> None:
    """The LoRA file (``mode='lora'``) or the whole model folder (``'full'``), plus ``rdtf_card.json``."""
    if config.mode == "lora":
        weights = save_lora(unet, out)
    else:
        weights = dataclasses.replace(components, unet=unet).save_pretrained(out / MODEL_DIR)
    last = log_rows[-1] if log_rows else {}
    card = {
        "kind": "rdtf-lora" if config.mode == "lora" else "rdtf-model",
        "weights": str(weights.relative_to(out)),
        "base": config.base,
        "data": config.data,
        "data_hash": manifest_hash(config.data),
        "steps": step,
        "processes": processes,
        "final_metrics": {k: v for k, v in last.items() if k.startswith(("loss", "val_"))},
        "config": config.to_dict(),
    }
    write_atomic(out / CARD_NAME, json.dumps(card, indent=2, ensure_ascii=False).encode("utf-8"))


class _Validation:
    """Fixed validation clips: per-task loss with fixed noise, and animated strips to look at."""

    def __init__(self, config: TrainConfig, components: Components, accelerator: Accelerator) -> None:
        self.config, self.components, self.accelerator = config, components, accelerator
        try:
            dataset = _dataset(config, "val")
        except ValueError:
            dataset = _dataset(config, config.split)
        count = min(config.num_validation, len(dataset))
        self.items = [dataset[i] for i in range(count)]
        with torch.no_grad():
            self.inputs = {k: v.to(accelerator.device) for k, v in encode_items(components, self.items).items()}
        # a flow-fill model draws each task's fill from these pixels
        self.frames = (video_frames(torch.stack([item["video"] for item in self.items]))
                       if components.config.condition_fill == "flow" else None)

    @torch.no_grad()
    def losses(self, unet: torch.nn.Module) -> dict[str, float]:
        """``val_<task>``: loss on the validation clips with each task's default mask, fixed noise and times."""
        was_training = unet.training
        unet.eval()
        scheduler = self.components.scheduler
        latents = self.inputs["latents"]
        size, frames = latents.shape[0], latents.shape[2]
        generator = torch.Generator().manual_seed(self.config.seed)
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        timesteps = torch.linspace(50, scheduler.config.num_train_timesteps - 50, size).long().to(latents.device)
        loss_mask = torch.stack([item["loss_mask"] for item in self.items]).to(latents.device)
        fps = torch.tensor([item["fps"] for item in self.items], device=latents.device)
        # encoded now: the text tower may be training too
        captions = encode_text(self.components, [item["caption_en"] for item in self.items]).float()
        empty = encode_text(self.components, [""]).float().expand_as(captions)
        results = {}
        fill = self.components.config.condition_fill
        for task in self.config.tasks:
            mask = condition_mask(task, frames).to(latents.device).expand(size, -1) * loss_mask
            image = self.inputs["frame_embeds"][:, 0:1] * (mask[:, :1] > 0).view(-1, 1, 1)
            flow_latents = None
            if fill == "flow":
                flow_latents = flow_fill_latents(self.components.vae, self.frames, mask).to(latents.device)
            noisy, target = noised_and_target(scheduler, latents, mask, noise, timesteps,
                                              self.components.config.diffusion_space, flow_latents)
            with self.accelerator.autocast():
                image_latents = conditioning_latents(latents, mask, has_mask_channel(unet), fill, flow_latents)
                given = {"fps": fps, "image_latents": image_latents, "image_embeddings": image, "return_dict": False}
                prediction = unet(noisy, timesteps, encoder_hidden_states=captions if task != "i2v" else empty, **given)[0]
                if task == "it2v" and size > 1:  # every clip under the next clip's caption
                    other = unet(noisy, timesteps, encoder_hidden_states=captions.roll(1, dims=0), **given)[0]
                    results["val_text_influence"] = round(text_influence(prediction.float(), other.float()), 6)
            per_frame, weights = generated_frame_errors(prediction, target, loss_mask, mask)
            results[f"val_{task}"] = round(((per_frame * weights).sum() / weights.sum().clamp(min=1)).item(), 6)
        unet.train(was_training)
        return results

    @torch.no_grad()
    def render(self, unet: torch.nn.Module, path: Path) -> Path:
        """it2v and 2x interpolation of the first validation clip: ground truth | generated, side by side."""
        from rdtf.evaluate import frames_from_item
        from rdtf.pipeline import RDTFPipeline
        from rdtf.strips import side_by_side_gif

        was_training = unet.training
        unet.eval()
        pipeline = RDTFPipeline(dataclasses.replace(self.components, unet=unet), device=self.accelerator.device)
        item = self.items[0]
        truth = frames_from_item(item)
        columns = {"ground truth": truth}
        for task in ("it2v", "interpolation"):
            if task in self.config.tasks:
                clip = pipeline(frames=truth, task=task, prompt=item["caption_en"], fps=item["fps"],
                                height=truth.shape[1], width=truth.shape[2],
                                num_inference_steps=self.config.validation_inference_steps, seed=self.config.seed,
                                progress=False)
                columns[task] = clip.frames
        unet.train(was_training)
        path.parent.mkdir(parents=True, exist_ok=True)
        return side_by_side_gif(columns, path, fps=item["fps"])
