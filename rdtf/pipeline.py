"""The multitask sampler: one call generates F frames for any task named by a condition mask.

Built on diffusers components (``I2VGenXLUNet``, ``AutoencoderKL``, schedulers) rather
than the deprecated ``I2VGenXLPipeline``, whose first-frame encoding draws from the global
RNG and whose default text path crashes on transformers 5. The conditioning follows the
stock model exactly for its own case (one given frame at position 0) and generalises it:

* given frames' VAE latents (posterior mean x scaling factor) sit at their positions in
  ``image_latents``; every other position carries the stock position signal, a constant
  plane ``i / (F - 1)``, or for models saved with ``condition_fill="interpolate"`` the
  given latents interpolated in time (:mod:`rdtf.conditioning`), with ``"flow"`` the
  frames between two given ones drawn by optical flow and encoded (:mod:`rdtf.flow_fill`);
  a UNet with a mask channel also reads the condition mask;
* a model saved with ``diffusion_space="residual"`` denoises the clip minus that fill and
  adds the fill back at the end, so it returns the baselines' fill even from pure noise
  when it predicts no motion;
* the CLIP image embedding comes from the first given frame (zero when none is given);
* classifier-free guidance on text and image separately:
  ``eps = u + s_img (i - u) + s_txt (f - i)`` with u = negative text + zero image,
  i = negative text + image, f = text + image, batched in one UNet call; equal scales
  need only u and f and reduce to the stock single-scale formula.

Prompts, image embeddings and given-frame latents are kept in small LRU caches, so
re-sampling with another seed, guidance or step count runs only the UNet and the decoder.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, SchedulerMixin
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from rdtf.conditioning import conditioning_latents, diffusion_offset, filled_latents, interpolate_given
from rdtf.flow_fill import encode_clips, flow_filled_frames
from rdtf.io import SUFFIX_FORMATS, Clip, composite_over, write_clip
from rdtf.masks import TASK_USES_TEXT, TASKS, mask_from_string
from rdtf.masks import condition_mask as task_condition_mask
from rdtf.models import (
    Components,
    decode_latents,
    encode_frames,
    encode_image_embeddings,
    encode_text,
    frames_to_pixels,
    has_mask_channel,
    load_components,
)

SCHEDULERS: tuple[str, ...] = ("ddim", "dpm++", "euler")
DECODES: tuple[str, ...] = ("direct", "residual")
MAX_FRAMES = 64
INTERPOLATION_FACTORS = (2, 3, 4)
DEFAULT_BACKGROUND = (255, 255, 255)
DEFAULT_FPS = 8.0


def make_scheduler(name: str, base_config: Any) -> SchedulerMixin:
    """A fresh sampler named ``name`` with the base model's noise schedule and prediction type.

    Beta schedule, training steps, ``prediction_type`` and ``rescale_betas_zero_snr`` come
    from ``base_config``; zero-terminal-SNR models get ``timestep_spacing="trailing"`` so the
    first step starts from pure noise, as that schedule requires.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler={name!r}: expected one of {', '.join(SCHEDULERS)}")
    config = dict(base_config)
    if config.get("rescale_betas_zero_snr"):
        config["timestep_spacing"] = "trailing"
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    return EulerDiscreteScheduler.from_config(config)


def initial_noise(shape: Sequence[int], seed: int) -> torch.Tensor:
    """The starting latents for ``seed``: float32 on the CPU, so every device starts from the same noise."""
    return torch.randn(tuple(shape), generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def fit_frames(
    frames: np.ndarray, height: int, width: int, background: Sequence[int] = DEFAULT_BACKGROUND
) -> np.ndarray:
    """uint8 RGB(A) ``(N, h, w, 3|4)`` -> RGB ``(N, height, width, 3)``: flatten alpha, scale to cover, centre-crop.

    Frames already at the target size come back untouched (RGB) or only flattened (RGBA).
    """
    rgb = composite_over(frames, background) if frames.shape[-1] == 4 else frames
    if rgb.shape[1:3] == (height, width):
        return np.ascontiguousarray(rgb)
    src_h, src_w = rgb.shape[1:3]
    scale = max(height / src_h, width / src_w)
    size = (max(width, math.ceil(src_w * scale)), max(height, math.ceil(src_h * scale)))
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    out = [
        np.asarray(Image.fromarray(frame).resize(size, Image.LANCZOS).crop((left, top, left + width, top + height)))
        for frame in rgb
    ]
    return np.stack(out)


def _to_clip(video: np.ndarray, fps: float) -> Clip:
    """Float RGB ``(F, H, W, 3)`` in [0, 1] -> opaque uint8 RGBA clip at ``fps``."""
    rgb = np.round(video * 255.0).astype(np.uint8)
    alpha = np.full(rgb.shape[:-1] + (1,), 255, dtype=np.uint8)
    return Clip.from_fps(np.concatenate([rgb, alpha], axis=-1), fps)


class _LRU:
    """A tiny least-recently-used map; encoder results keyed by content, not by object identity."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[Any, torch.Tensor] = OrderedDict()

    def get(self, key: Any) -> torch.Tensor | None:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        return None

    def put(self, key: Any, value: torch.Tensor) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()


def _content_key(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array).tobytes() + str(array.shape).encode()).hexdigest()


@dataclass(frozen=True)
class _Request:
    """A validated sampling request; building one does no model work."""

    mask: torch.Tensor  # (F,) float 0/1
    given: dict[int, np.ndarray]  # position -> uint8 RGB (H, W, 3)
    prompt: str
    negative_prompt: str
    height: int
    width: int
    fps: float
    steps: int
    text_guidance: float
    image_guidance: float
    scheduler: str
    strength: float
    decode: str
    seed: int
    decode_chunk_size: int | None

    @property
    def num_frames(self) -> int:
        return int(self.mask.numel())


def _as_uint8_image(value: Any, name: str) -> np.ndarray:
    if isinstance(value, Image.Image):
        value = np.asarray(value.convert("RGBA"))
    if not isinstance(value, np.ndarray) or value.dtype != np.uint8:
        raise ValueError(f"{name}: expected a uint8 numpy array or PIL image, got {type(value).__name__}")
    return value


def check_sampler_settings(
    *,
    scheduler: str | None = None,
    text_guidance: float | None = None,
    image_guidance: float | None = None,
    strength: float | None = None,
    decode: str | None = None,
) -> None:
    """Raise ValueError naming any bad sampler setting; None stands for the model's own (checked when it loads).

    Needs no model, so callers (gallery, studio) fail before loading one.
    """
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler={scheduler!r}: expected one of {', '.join(SCHEDULERS)}")
    for name, value in (("text_guidance", text_guidance), ("image_guidance", image_guidance)):
        if value is not None:
            _check_scale(value, name)
    if strength is not None and not 0 < float(strength) <= 1:
        raise ValueError(f"strength={float(strength)}: must be in (0, 1] (1 = start from pure noise)")
    if decode is not None and decode not in DECODES:
        raise ValueError(f"decode={decode!r}: expected one of {', '.join(DECODES)}")


def _check_scale(value: float, name: str) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value}: must be a finite number >= 0")
    return value


def _to_mask(value: Any, num_frames: int) -> torch.Tensor:
    mask = mask_from_string(value) if isinstance(value, str) else torch.as_tensor(value).detach().float().cpu()
    if mask.ndim != 1:
        raise ValueError(f"condition_mask: expected one value per frame, got shape {tuple(mask.shape)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"condition_mask: values must be 0 or 1, got {mask.tolist()}")
    if mask.numel() != num_frames:
        raise ValueError(f"condition_mask has {mask.numel()} entries but num_frames={num_frames}")
    return mask


class RDTFPipeline:
    """Samples animated stickers from an I2VGen-XL-family model for every RDTF task.

    ``device`` is where the models run; ``offload=True`` keeps every component on the CPU
    and moves each one to ``device`` only while it runs (for GPUs too small for all of
    them). The components' dtype is the compute dtype (see :meth:`from_pretrained`).
    """

    def __init__(
        self, components: Components, *, device: str | torch.device = "cpu", offload: bool = False, cache_size: int = 16
    ) -> None:
        self.components = components
        self.device = torch.device(device)
        self.offload = offload and self.device.type != "cpu"
        for module in components.modules().values():
            module.to("cpu" if self.offload else self.device)
        # SDPA everywhere: diffusers' default, set explicitly so a component saved with another processor can't slow us.
        components.unet.set_attn_processor(AttnProcessor2_0())
        components.vae.set_attn_processor(AttnProcessor2_0())
        self._text_cache = _LRU(cache_size)
        self._image_cache = _LRU(cache_size)
        self._latent_cache = _LRU(4 * cache_size)

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        offload: bool = False,
        local_files_only: bool = False,
    ) -> RDTFPipeline:
        """Load a stock base (``ali-vilab/i2vgen-xl`` or a folder) or a kit folder; see :func:`load_components`."""
        components = load_components(path_or_hub_id, dtype=dtype, local_files_only=local_files_only)
        return cls(components, device=device, offload=offload)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        return self.components.save_pretrained(path)

    @property
    def unet(self) -> nn.Module:
        return self.components.unet

    def clear_cache(self) -> None:
        """Forget cached prompt/image embeddings and latents (needed only after swapping encoder weights)."""
        for cache in (self._text_cache, self._image_cache, self._latent_cache):
            cache.clear()

    # ------------------------------------------------------------------ public sampling API

    @property
    def sampler_settings(self) -> dict[str, Any]:
        """Steps, scheduler and guidance scales used when a call names none (saved with the model)."""
        return self.components.config.sampler_settings

    def sampler_settings_for(self, task: str | None) -> dict[str, Any]:
        """:attr:`sampler_settings` with the model's changes for ``task`` (e.g. i2v's start strength)."""
        return self.components.config.sampler_settings_for(task)

    def __call__(self, *, output_path: str | os.PathLike | None = None, **kwargs: Any) -> Clip:
        """Generate a clip; every keyword of :meth:`generate` applies. Optionally write it to ``output_path``.

        Returns uint8 RGBA frames (alpha 255) with durations from ``fps``. ``output_path``'s
        suffix picks the format (GIF, WebP, APNG, MP4, WebM via :func:`rdtf.io.write_clip`).
        """
        if output_path is not None and Path(output_path).suffix.lower() not in SUFFIX_FORMATS:
            raise ValueError(
                f"output_path={str(output_path)!r}: unknown extension (expected one of {', '.join(SUFFIX_FORMATS)})"
            )
        clip = _to_clip(self.generate(**kwargs), kwargs.get("fps", DEFAULT_FPS))
        if output_path is not None:
            write_clip(clip, output_path)
        return clip

    @torch.no_grad()
    def generate(
        self,
        *,
        image: Any = None,
        frames: Any = None,
        condition_mask: Any = None,
        task: str | None = None,
        prompt: str = "",
        negative_prompt: str = "",
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        fps: float = DEFAULT_FPS,
        num_inference_steps: int | None = None,
        text_guidance: float | None = None,
        image_guidance: float | None = None,
        scheduler: str | None = None,
        strength: float | None = None,
        decode: str | None = None,
        seed: int = 0,
        decode_chunk_size: int | None = 8,
        background: Sequence[int] = DEFAULT_BACKGROUND,
        progress: bool = True,
        keep_given: bool = True,
    ) -> np.ndarray:
        """Float RGB frames ``(F, H, W, 3)`` in [0, 1] for one task; all checks run before any model work.

        Given frames come from ``image`` (one frame, placed where the mask has its 1) or
        ``frames`` (a Clip or ``(F, H, W, 3|4)`` uint8 array; the frames at the mask's 1s are
        used). The mask is ``condition_mask`` (tensor, list or ``"10101010"``) or else the
        default of ``task`` (:func:`rdtf.masks.condition_mask`); with neither, the task is
        inferred: image + prompt -> it2v, image -> i2v, nothing -> t2v. Tasks that do not
        read text (i2v) ignore ``prompt``. RGBA inputs are flattened onto ``background``.
        With ``keep_given`` the given frames are copied into the output unchanged.
        ``strength`` is where sampling starts: 1.0 from pure noise (stock); below 1 from the
        given frames' latents interpolated in time (:mod:`rdtf.conditioning`) noised to that
        fraction of the schedule, skipping the first steps (SDEdit); t2v always starts from
        noise. ``decode="residual"`` decodes only what the model changed: the given frames
        interpolated in pixel space plus ``D(z) - D(z_fill)``, so a small VAE's blur falls on
        the motion, not on the whole frame; ``"direct"`` decodes ``D(z)`` (stock). Sampler
        settings left at None (steps, guidance scales, scheduler, strength, decode) take the
        model's recommended ones for the task (:meth:`sampler_settings_for`).
        """
        request = self._validate(
            image=image,
            frames=frames,
            condition_mask=condition_mask,
            task=task,
            prompt=prompt,
            negative_prompt=negative_prompt,
            num_frames=num_frames,
            height=height,
            width=width,
            fps=fps,
            num_inference_steps=num_inference_steps,
            text_guidance=text_guidance,
            image_guidance=image_guidance,
            scheduler=scheduler,
            strength=strength,
            decode=decode,
            seed=seed,
            decode_chunk_size=decode_chunk_size,
            background=background,
        )
        given_latents, mask = self._given_latents(request)
        flow_frames, flow_latents = self._flow_fill(request, mask)
        latents = self._denoise(request, given_latents, mask, flow_latents, progress)
        video = self._decode(latents, request, given_latents, mask, flow_frames, flow_latents)
        if keep_given:
            for position, frame in request.given.items():
                video[position] = frame.astype(np.float32) / 255.0
        return video

    def interpolate(self, clip: Clip, factor: int, *, num_frames: int | None = None, **kwargs: Any) -> Clip:
        """Raise ``clip``'s frame rate ``factor`` times (2, 3 or 4), keeping its frames.

        The dense clip has ``(N - 1) * factor + 1`` frames at ``clip.fps * factor``; the
        original frames sit at every ``factor``-th position. Clips longer than the model's
        window (``num_frames``, default the model's clip length) are done in windows that
        share their end frames. Other keywords go to :meth:`generate` (prompt, seed, ...).
        """
        if not isinstance(clip, Clip):
            raise ValueError(f"clip: expected an rdtf.io.Clip, got {type(clip).__name__}")
        if factor not in INTERPOLATION_FACTORS:
            raise ValueError(f"factor={factor}: expected one of {INTERPOLATION_FACTORS}")
        if clip.num_frames < 2:
            raise ValueError(f"clip has {clip.num_frames} frame; interpolation needs at least 2")
        for reserved in ("frames", "condition_mask", "task", "image", "fps", "keep_given"):
            if reserved in kwargs:
                raise ValueError(f"interpolate() sets {reserved!r} itself; do not pass it")
        window = num_frames or self.components.config.num_frames
        intervals = (window - 1) // factor
        if intervals < 1:
            raise ValueError(
                f"num_frames={window}: a window must hold at least {factor + 1} frames for factor {factor}"
            )
        fps = clip.fps * factor
        total = (clip.num_frames - 1) * factor + 1
        dense: np.ndarray | None = None
        for start in range(0, clip.num_frames - 1, intervals):
            end = min(start + intervals, clip.num_frames - 1)
            length = (end - start) * factor + 1
            window_frames = np.zeros((length,) + clip.frames.shape[1:], dtype=np.uint8)
            window_frames[::factor] = clip.frames[start : end + 1]
            mask = torch.zeros(length)
            mask[::factor] = 1.0
            video = self.generate(
                frames=window_frames, condition_mask=mask, task="interpolation", num_frames=length, fps=fps, **kwargs
            )
            if dense is None:
                dense = np.zeros((total,) + video.shape[1:], dtype=np.float32)
            dense[start * factor : end * factor + 1] = video
        return _to_clip(dense, fps)

    # ------------------------------------------------------------------ validation

    def _validate(
        self,
        *,
        image: Any,
        frames: Any,
        condition_mask: Any,
        task: str | None,
        prompt: str,
        negative_prompt: str,
        num_frames: int | None,
        height: int | None,
        width: int | None,
        fps: float,
        num_inference_steps: int | None,
        text_guidance: float | None,
        image_guidance: float | None,
        scheduler: str | None,
        strength: float | None,
        decode: str | None,
        seed: int,
        decode_chunk_size: int | None,
        background: Sequence[int],
    ) -> _Request:
        if task is None and condition_mask is None and frames is None:
            task = ("it2v" if prompt else "i2v") if image is not None else "t2v"
        if task is not None and task not in TASKS:
            raise ValueError(f"task={task!r}: expected one of {', '.join(TASKS)}")
        recommended = self.sampler_settings_for(task)
        num_inference_steps = recommended["num_inference_steps"] if num_inference_steps is None else num_inference_steps
        text_guidance = recommended["text_guidance"] if text_guidance is None else text_guidance
        image_guidance = recommended["image_guidance"] if image_guidance is None else image_guidance
        scheduler = recommended["scheduler"] if scheduler is None else scheduler
        strength = recommended["strength"] if strength is None else float(strength)
        decode = recommended["decode"] if decode is None else decode
        check_sampler_settings(scheduler=scheduler, text_guidance=text_guidance, image_guidance=image_guidance,
                               strength=strength, decode=decode)
        if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
            raise ValueError("prompt and negative_prompt must be strings")
        if image is not None and frames is not None:
            raise ValueError("pass either image (one given frame) or frames (a clip of given frames), not both")
        clip_frames = None
        if frames is not None:
            clip_frames = _as_uint8_image(frames.frames if isinstance(frames, Clip) else frames, "frames")
            if clip_frames.ndim != 4 or clip_frames.shape[-1] not in (3, 4):
                raise ValueError(f"frames: expected shape (F, H, W, 3|4), got {clip_frames.shape}")
        if image is not None:
            image = _as_uint8_image(image, "image")
            if image.ndim != 3 or image.shape[-1] not in (3, 4):
                raise ValueError(f"image: expected shape (H, W, 3|4), got {image.shape}")
        if num_frames is None:
            num_frames = len(clip_frames) if clip_frames is not None else self.components.config.num_frames
        if not isinstance(num_frames, int) or not 1 <= num_frames <= MAX_FRAMES:
            raise ValueError(f"num_frames={num_frames}: must be an integer in [1, {MAX_FRAMES}]")
        if clip_frames is not None and len(clip_frames) != num_frames:
            raise ValueError(f"frames has {len(clip_frames)} frames but num_frames={num_frames}")
        size = self.components.default_size
        height = size if height is None else height
        width = size if width is None else width
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % 8:
                raise ValueError(f"{name}={value}: must be a positive multiple of 8")
        fps = float(fps)
        if not math.isfinite(fps) or fps <= 0:
            raise ValueError(f"fps={fps}: must be a finite number > 0")
        train_steps = int(self.components.scheduler.config.num_train_timesteps)
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= train_steps:
            raise ValueError(f"num_inference_steps={num_inference_steps}: must be an integer in [1, {train_steps}]")
        text_guidance, image_guidance = float(text_guidance), float(image_guidance)
        if not isinstance(seed, int):
            raise ValueError(f"seed={seed!r}: must be an integer")
        if decode_chunk_size is not None and (not isinstance(decode_chunk_size, int) or decode_chunk_size < 1):
            raise ValueError(f"decode_chunk_size={decode_chunk_size}: must be None or an integer >= 1")

        if condition_mask is not None:
            mask = _to_mask(condition_mask, num_frames)
        elif task is not None:
            mask = task_condition_mask(task, num_frames)
        else:
            raise ValueError("frames were given without condition_mask or task: say which frames are given")
        positions = [int(i) for i in torch.nonzero(mask).flatten()]
        if positions and image is None and clip_frames is None:
            raise ValueError(
                f"condition mask {''.join(str(int(v)) for v in mask)} gives {len(positions)} frame(s) but no image "
                f"or frames were passed (task {task or 'from mask'} needs them)"
            )
        if image is not None and len(positions) != 1:
            raise ValueError(
                f"image gives one frame but the condition mask gives {len(positions)}; pass frames= for several "
                "given frames, or no image for t2v"
            )
        given: dict[int, np.ndarray] = {}
        if positions:
            source = clip_frames[positions] if clip_frames is not None else image[None]
            given = dict(zip(positions, fit_frames(source, height, width, background)))
        uses_text = TASK_USES_TEXT[task] if task is not None else True
        return _Request(
            mask=mask,
            given=given,
            prompt=prompt if uses_text else "",
            negative_prompt=negative_prompt,
            height=height,
            width=width,
            fps=fps,
            steps=num_inference_steps,
            text_guidance=text_guidance,
            image_guidance=image_guidance,
            scheduler=scheduler,
            strength=strength,
            decode=decode,
            seed=seed,
            decode_chunk_size=decode_chunk_size,
        )

    # ------------------------------------------------------------------ model work

    @contextmanager
    def _running(self, *modules: nn.Module | None) -> Iterator[None]:
        """With offload, move ``modules`` to the device for the duration of the block only."""
        present = [m for m in modules if m is not None]
        if self.offload:
            for module in present:
                module.to(self.device)
        try:
            yield
        finally:
            if self.offload:
                for module in present:
                    module.to("cpu")

    def _text_embeddings(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        missing = sorted({t for t in texts if self._text_cache.get(t) is None})
        if missing:
            components = self.components
            with self._running(components.text_encoder, components.text_projection):
                states = encode_text(components, missing)
            for text, state in zip(missing, states):
                self._text_cache.put(text, state.to(self.device))
        return {t: self._text_cache.get(t) for t in texts}

    def _image_embedding(self, frame: np.ndarray) -> torch.Tensor:
        key = _content_key(frame)
        cached = self._image_cache.get(key)
        if cached is None:
            with self._running(self.components.image_encoder):
                cached = encode_image_embeddings(self.components, frame[None])[0].to(self.device)
            self._image_cache.put(key, cached)
        return cached

    def _frame_latents(self, frames: Sequence[np.ndarray]) -> list[torch.Tensor]:
        keys = [_content_key(frame) for frame in frames]
        todo = [i for i, key in enumerate(keys) if self._latent_cache.get(key) is None]
        if todo:
            vae = self.components.vae
            with self._running(vae):
                latents = encode_frames(vae, frames_to_pixels(np.stack([frames[i] for i in todo])))
            for i, latent in zip(todo, latents):
                self._latent_cache.put(keys[i], latent.to(self.device))
        return [self._latent_cache.get(key) for key in keys]

    def _given_latents(self, request: _Request) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1, C, F, h, w)`` latents with the given frames' where they sit (zeros elsewhere) and the ``(1, F)`` mask."""
        channels = self.components.unet.config.in_channels
        scale = self.components.vae_scale_factor
        latent_size = (request.height // scale, request.width // scale)
        latents = torch.zeros(1, channels, request.num_frames, *latent_size, device=self.device)
        mask = torch.zeros(1, request.num_frames, device=self.device)
        positions = sorted(request.given)
        for position, latent in zip(positions, self._frame_latents([request.given[p] for p in positions])):
            latents[0, :, position] = latent.float()
            mask[0, position] = 1.0
        return latents, mask

    def _given_frames(self, request: _Request) -> np.ndarray:
        """``(F, H, W, 3)`` uint8: the given frames where they sit, black elsewhere."""
        frames = np.zeros((request.num_frames, request.height, request.width, 3), np.uint8)
        for position, frame in request.given.items():
            frames[position] = frame
        return frames

    def _flow_fill(self, request: _Request, mask: torch.Tensor) -> tuple[np.ndarray | None, torch.Tensor | None]:
        """A ``flow``-fill model's fill, ``(F, H, W, 3)`` uint8 and its ``(1, C, F, h, w)`` latents; Nones otherwise."""
        if self.components.config.condition_fill != "flow" or not request.given:
            return None, None
        frames = flow_filled_frames(self._given_frames(request), mask[0].cpu().numpy())
        with self._running(self.components.vae):
            return frames, encode_clips(self.components.vae, frames[None]).to(self.device)

    def _guidance_branches(self, request: _Request) -> tuple[list[tuple[str, bool]], Callable[..., torch.Tensor]]:
        """The (text, with_image) conditions to evaluate and how to combine their predictions."""
        has_image = bool(request.given)
        uncond = (request.negative_prompt, False)
        image_cond = (request.negative_prompt, has_image)
        full = (request.prompt, has_image)
        s_txt, s_img = request.text_guidance, request.image_guidance
        if s_txt == s_img:
            if s_txt == 1.0:
                return [full], lambda pred: pred[full]
            return [uncond, full], lambda pred: pred[uncond] + s_txt * (pred[full] - pred[uncond])
        branches = list(dict.fromkeys([uncond, image_cond, full]))

        def combine(pred: dict[tuple[str, bool], torch.Tensor]) -> torch.Tensor:
            u, i, f = pred[uncond], pred[image_cond], pred[full]
            return u + s_img * (i - u) + s_txt * (f - i)

        return branches, combine

    def _denoise(
        self, request: _Request, given_latents: torch.Tensor, mask: torch.Tensor, flow_latents: torch.Tensor | None,
        progress: bool,
    ) -> torch.Tensor:
        components = self.components
        unet = components.unet
        branches, combine = self._guidance_branches(request)
        texts = self._text_embeddings([text for text, _ in branches])
        first_given = min(request.given) if request.given else None
        image_embedding = (
            self._image_embedding(request.given[first_given])
            if first_given is not None
            else torch.zeros(1, unet.config.cross_attention_dim, device=self.device)
        )
        zero_embedding = torch.zeros_like(image_embedding)
        dtype = unet.dtype
        count = len(branches)
        text_batch = torch.stack([texts[text] for text, _ in branches]).to(dtype)
        image_batch = torch.stack([image_embedding if with_image else zero_embedding for _, with_image in branches])
        image_batch = image_batch.to(dtype)
        image_latents = conditioning_latents(given_latents, mask, has_mask_channel(unet), components.config.condition_fill,
                                             flow_latents)
        image_latents = image_latents.to(dtype).expand(count, -1, -1, -1, -1)
        fps = torch.full((count,), request.fps, device=self.device)

        scheduler = make_scheduler(request.scheduler, components.scheduler.config)
        scheduler.set_timesteps(request.steps, device=self.device)
        timesteps = scheduler.timesteps
        offset = diffusion_offset(given_latents, mask, components.config.diffusion_space, flow_latents)
        noise = initial_noise(given_latents.shape, request.seed).to(self.device)
        if request.strength < 1 and request.given:
            skipped = min(request.steps - round(request.steps * request.strength), request.steps - 1) * scheduler.order
            timesteps = timesteps[skipped:]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(skipped)
            latents = scheduler.add_noise(filled_latents(given_latents, mask, flow_latents) - offset, noise, timesteps[:1])
        else:
            latents = noise * scheduler.init_noise_sigma
        step_kwargs = {}
        if "generator" in inspect.signature(scheduler.step).parameters:  # stochastic steps draw from the seed too
            step_kwargs["generator"] = torch.Generator("cpu").manual_seed(request.seed)
        with self._running(unet):
            for t in tqdm(timesteps, desc="sampling", disable=not progress, leave=False):
                model_input = scheduler.scale_model_input(latents.expand(count, -1, -1, -1, -1), t)
                prediction = unet(
                    model_input.to(dtype),
                    t,
                    fps=fps,
                    image_latents=image_latents,
                    image_embeddings=image_batch,
                    encoder_hidden_states=text_batch,
                    return_dict=False,
                )[0].float()
                eps = combine(dict(zip(branches, prediction.split(1))))
                latents = scheduler.step(eps, t, latents, **step_kwargs).prev_sample
        return latents + offset

    def _decode(
        self, latents: torch.Tensor, request: _Request, given_latents: torch.Tensor, mask: torch.Tensor,
        flow_frames: np.ndarray | None, flow_latents: torch.Tensor | None,
    ) -> np.ndarray:
        vae, chunk_size = self.components.vae, request.decode_chunk_size

        def decoded(clip_latents: torch.Tensor) -> torch.Tensor:
            return decode_latents(vae, clip_latents[0].permute(1, 0, 2, 3), chunk_size)  # (F, 3, H, W)

        with self._running(vae):
            pixels = decoded(latents)
            if request.decode == "residual" and request.given:
                fill = decoded(filled_latents(given_latents, mask, flow_latents))
                pixels = pixels - fill + self._given_pixel_fill(request, mask, flow_frames)
        return (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()

    def _given_pixel_fill(self, request: _Request, mask: torch.Tensor, flow_frames: np.ndarray | None) -> torch.Tensor:
        """``(F, 3, H, W)`` pixels in [-1, 1]: the given frames filled in time like the latent fill."""
        if flow_frames is not None:
            return frames_to_pixels(flow_frames).to(self.device)
        pixels = torch.zeros(1, 3, request.num_frames, request.height, request.width, device=self.device)
        for position, frame in request.given.items():
            pixels[0, :, position] = frames_to_pixels(frame[None])[0].to(self.device)
        return interpolate_given(pixels, mask)[0].permute(1, 0, 2, 3)
