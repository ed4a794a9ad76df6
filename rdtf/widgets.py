"""The notebooks' interactive sampler and inline pictures, built on pure functions.

:func:`generate_sticker` does all the work of the UI: it takes a :class:`SampleRequest`
(task, source clip, prompt, sampler settings, LoRA) and returns a :class:`rdtf.io.Clip`,
raising on bad input before any model work. :class:`StickerStudio` is a thin ipywidgets
face on it: every handler builds a request from the controls and calls the same
functions a notebook cell or a test can call. ipywidgets swallows exceptions raised in a
button callback, so the handlers catch them and show the message in the UI instead;
called directly, the pure functions raise, so a headless papermill run fails loudly.

The display helpers at the end (:func:`gif_bytes`, :func:`comparison_clip`,
:func:`sample_gallery_html`, :func:`training_log_figure`, :func:`summary_markdown`) turn
clips, datasets, training logs and evaluation results into what the notebooks show inline.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import io
import json
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ipywidgets as w
import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from rdtf.data import StickerDataset
from rdtf.evaluate import METRICS, EvalResult, frames_from_item
from rdtf.export import export_sticker
from rdtf.io import SUFFIX_FORMATS, Clip, StickerFileError, read_clip, write_clip
from rdtf.lora import LORA_WEIGHT_NAME, adapter_names, load_lora, set_lora_scale
from rdtf.masks import TASK_USES_TEXT, TASKS, condition_mask
from rdtf.pipeline import (
    DECODES, INTERPOLATION_FACTORS, MAX_FRAMES, SCHEDULERS, RDTFPipeline, check_sampler_settings, fit_frames,
)
from rdtf.strips import compose_strip
from rdtf.train import CARD_NAME

#: Uploads larger than this are refused before decoding.
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
#: Largest canvas (width x height) and frame count an upload may declare.
MAX_UPLOAD_PIXELS = 4096 * 4096
MAX_UPLOAD_FRAMES = 500
#: What the save button writes: label -> (file suffix, export preset or None for a plain GIF).
EXPORT_FORMATS: dict[str, tuple[str, str | None]] = {
    "GIF": (".gif", None),
    "WebP (WhatsApp sticker)": (".webp", "whatsapp"),
    "WebM (Telegram sticker)": (".webm", "telegram"),
}
TASK_LABELS: dict[str, str] = {
    "i2v": "i2v: animate the image",
    "it2v": "it2v: image + description",
    "t2v": "t2v: description only",
    "interpolation": "interpolation: raise the frame rate",
    "predict_forward": "prediction: continue forward",
    "predict_backward": "prediction: lead up backward",
}
_NEEDS_SOURCE = ("i2v", "it2v", "interpolation", "predict_forward", "predict_backward")
_NEEDS_PROMPT = ("it2v", "t2v")


class UploadError(ValueError):
    """An uploaded file cannot be used: too large, not an image or sticker, or unreadable."""


# --------------------------------------------------------------------------- the pure path


@dataclass(frozen=True, eq=False)
class SampleRequest:
    """Everything one generation depends on; the same request and seed give the same clip.

    ``source`` is the still (frame 0 is used) for i2v / it2v, the low-frame-rate clip for
    interpolation (its frame rate goes up ``interpolation_factor`` times; ``num_frames``
    and ``fps`` do not apply) and the clip whose first (forward) or last (backward)
    ``num_frames // 2`` frames are given for prediction. ``lora`` is a LoRA folder or
    ``.safetensors`` file made the only active adapter, at ``lora_scale``.
    """

    task: str = "it2v"
    source: Clip | None = None
    prompt: str = ""
    negative_prompt: str = ""
    num_frames: int = 8
    interpolation_factor: int = 2
    fps: float = 8.0
    num_inference_steps: int | None = None  # None: the model's recommended sampler settings
    text_guidance: float | None = None
    image_guidance: float | None = None
    scheduler: str | None = None
    strength: float | None = None
    decode: str | None = None
    seed: int = 0
    lora: str | None = None
    lora_scale: float = 1.0

    def check(self) -> None:
        """Raise ValueError naming the field for anything the task cannot use; no model work."""
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r}: expected one of {', '.join(TASKS)}")
        if self.task in _NEEDS_SOURCE and self.source is None:
            raise ValueError(f"task {self.task} needs a source image or clip: upload one or pick a built-in sample")
        if self.task in _NEEDS_PROMPT and not self.prompt.strip():
            raise ValueError(f"task {self.task} needs a prompt (a description of the motion, 中文 or English)")
        if not isinstance(self.num_frames, int) or not 2 <= self.num_frames <= MAX_FRAMES:
            raise ValueError(f"num_frames={self.num_frames}: must be an integer in [2, {MAX_FRAMES}]")
        if self.task == "interpolation":
            if self.interpolation_factor not in INTERPOLATION_FACTORS:
                raise ValueError(
                    f"interpolation_factor={self.interpolation_factor}: expected one of {INTERPOLATION_FACTORS}"
                )
            if self.source.num_frames < 2:
                raise ValueError("interpolation needs a source clip of at least 2 frames; the source is a still image")
        if self.task.startswith("predict_"):
            given = self.num_frames // 2
            if self.source.num_frames < given:
                raise ValueError(
                    f"task {self.task} with num_frames={self.num_frames} gives {given} frames of the source, "
                    f"but the source has only {self.source.num_frames}"
                )
        check_sampler_settings(scheduler=self.scheduler, text_guidance=self.text_guidance,
                               image_guidance=self.image_guidance, strength=self.strength, decode=self.decode)
        if not math.isfinite(float(self.lora_scale)):
            raise ValueError(f"lora_scale={self.lora_scale}: must be finite")
        if self.lora is not None:
            lora_file(self.lora)


def lora_file(path: str | Path) -> Path:
    """The LoRA weights file of a folder (``pytorch_lora_weights.safetensors``) or a ``.safetensors`` path."""
    path = Path(path)
    file = path if path.suffix == ".safetensors" else path / LORA_WEIGHT_NAME
    if not file.is_file():
        raise FileNotFoundError(f"lora={str(path)!r}: no LoRA file at {file}")
    return file


def lora_adapter_name(path: str | Path) -> str:
    """A name for the adapter loaded from ``path``: a file rewritten by a new run gets a new name."""
    file = lora_file(path).resolve()
    stat = file.stat()
    return "lora_" + hashlib.sha1(f"{file}:{stat.st_mtime_ns}:{stat.st_size}".encode()).hexdigest()[:12]


def apply_lora(pipeline: RDTFPipeline, path: str | Path | None, scale: float = 1.0) -> str | None:
    """Make the LoRA at ``path`` the only active adapter, at ``scale`` (``None``: switch every adapter off).

    Each file is loaded once and then only re-scaled, so switching LoRAs in the UI is cheap.
    Returns the active adapter's name.
    """
    wanted = None if path is None else lora_adapter_name(path)
    if wanted is not None and wanted not in adapter_names(pipeline):
        load_lora(pipeline, lora_file(path), scale=scale, adapter_name=wanted)
    for name in adapter_names(pipeline):
        set_lora_scale(pipeline, name, scale if name == wanted else 0.0)
    return wanted


def prediction_inputs(source: Clip, task: str, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Frames ``(num_frames, H, W, 4)`` and condition mask for prediction: the source's first or last frames given."""
    mask = condition_mask(task, num_frames).numpy()
    given = np.flatnonzero(mask > 0.5)
    frames = np.zeros((num_frames,) + source.frames.shape[1:], np.uint8)
    frames[given] = source.frames[: len(given)] if task == "predict_forward" else source.frames[-len(given) :]
    return frames, mask


def generate_sticker(pipeline: RDTFPipeline, request: SampleRequest, *, progress: bool = False) -> Clip:
    """Generate the clip ``request`` describes; raises ValueError (before sampling) on bad input."""
    request.check()
    apply_lora(pipeline, request.lora, request.lora_scale)
    sampler = dict(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        num_inference_steps=request.num_inference_steps,
        text_guidance=request.text_guidance,
        image_guidance=request.image_guidance,
        scheduler=request.scheduler,
        strength=request.strength,
        decode=request.decode,
        seed=request.seed,
        progress=progress,
    )
    task = request.task
    if task == "interpolation":
        return pipeline.interpolate(request.source, request.interpolation_factor, **sampler)
    timing = dict(num_frames=request.num_frames, fps=request.fps)
    if task == "t2v":
        return pipeline(task=task, **timing, **sampler)
    if task in ("i2v", "it2v"):
        return pipeline(image=request.source.frames[0], task=task, **timing, **sampler)
    frames, mask = prediction_inputs(request.source, task, request.num_frames)
    return pipeline(frames=frames, condition_mask=mask, task=task, **timing, **sampler)


def interpolation_timing(source: Clip, factor: int) -> tuple[int, float]:
    """Frame count and fps that interpolating ``source`` by ``factor`` gives (as :meth:`RDTFPipeline.interpolate`).

    Interpolation keeps the source's frames and timing, so these replace the request's
    ``num_frames`` and ``fps``; the UI shows them instead of its sliders.
    """
    return (source.num_frames - 1) * factor + 1, source.fps * factor


def task_inputs(task: str, clip: Clip, interpolation_factor: int = 2) -> tuple[Clip | None, Clip]:
    """From a full reference clip: the source a task starts from, and the ground truth to compare with.

    Interpolation keeps every ``interpolation_factor``-th frame (a low-frame-rate clip) and
    compares with the frames it spans; t2v starts from nothing; the other tasks start from
    the clip itself (i2v / it2v use its first frame).
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r}: expected one of {', '.join(TASKS)}")
    if task == "t2v":
        return None, clip
    if task != "interpolation":
        return clip, clip
    if interpolation_factor not in INTERPOLATION_FACTORS:
        raise ValueError(f"interpolation_factor={interpolation_factor}: expected one of {INTERPOLATION_FACTORS}")
    if clip.num_frames < interpolation_factor + 1:
        raise ValueError(
            f"the clip has {clip.num_frames} frames; {interpolation_factor}x interpolation needs at least "
            f"{interpolation_factor + 1} to keep two of them"
        )
    kept = clip.frames[::interpolation_factor]
    spanned = clip.frames[: (len(kept) - 1) * interpolation_factor + 1]
    return Clip.from_fps(kept, clip.fps / interpolation_factor), Clip.from_fps(spanned, clip.fps)


def sample_clip(dataset: StickerDataset, index: int) -> Clip:
    """Sticker ``index`` of a prepared dataset as a clip of its real frames (padding dropped)."""
    if not 0 <= index < len(dataset):
        raise IndexError(f"index={index}: the dataset {dataset.root} has {len(dataset)} stickers")
    item = dataset[index]
    frames = frames_from_item(item)[np.asarray(item["loss_mask"]) > 0.5]
    return Clip.from_fps(frames, float(item["fps"]))


def decode_upload(upload: Mapping[str, Any], *, max_bytes: int = MAX_UPLOAD_BYTES) -> Clip:
    """One ``FileUpload`` entry (``name``, ``content``) as a clip; :class:`UploadError` says what is wrong.

    Animated GIF / APNG / WebP and MP4 / WebM go through :func:`rdtf.io.read_clip` (its
    header checks run before decoding); other stills (JPEG, BMP, ...) through Pillow.
    """
    name = str(upload.get("name") or "upload")
    content = bytes(upload.get("content") or b"")
    if not content:
        raise UploadError(f"{name}: the file is empty")
    if len(content) > max_bytes:
        raise UploadError(f"{name}: {_human_size(len(content))} is over the {_human_size(max_bytes)} upload limit")
    suffix = Path(name).suffix.lower()
    if suffix in SUFFIX_FORMATS:
        with tempfile.TemporaryDirectory(prefix="rdtf-upload-") as folder:
            path = Path(folder) / f"upload{suffix}"
            path.write_bytes(content)
            try:
                return read_clip(path, max_frames=MAX_UPLOAD_FRAMES, max_pixels=MAX_UPLOAD_PIXELS)
            except StickerFileError as error:
                raise UploadError(f"{name}: {error.reason}") from None
    return _decode_still(name, content)


def _human_size(count: int) -> str:
    if count >= 2**20:
        return f"{count / 2**20:.3g} MB"
    return f"{count / 1024:.3g} KB" if count >= 1024 else f"{count} bytes"


def _decode_still(name: str, content: bytes) -> Clip:
    readable = "GIF, PNG, WebP, JPEG, BMP, MP4 or WebM"
    try:
        image = Image.open(io.BytesIO(content))
    except Image.DecompressionBombError:
        raise UploadError(f"{name}: declares more than {MAX_UPLOAD_PIXELS} pixels; refusing to decode it") from None
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise UploadError(f"{name}: not an image or sticker file that can be read ({readable}): {error}") from None
    with image:
        width, height = image.size
        if width * height > MAX_UPLOAD_PIXELS:
            raise UploadError(f"{name}: a {width}x{height} image is over the {MAX_UPLOAD_PIXELS} pixel limit")
        try:
            frame = np.asarray(image.convert("RGBA"))
        except (OSError, ValueError, SyntaxError, EOFError) as error:
            raise UploadError(f"{name}: the image data is corrupt or truncated: {error}") from None
    return Clip.from_fps(frame[None], 1.0)


def save_sticker(clip: Clip, folder: str | Path, name: str, fmt: str) -> tuple[Path, str]:
    """Write ``clip`` as ``folder/name.<suffix>`` in one of :data:`EXPORT_FORMATS`; returns the path and a summary.

    The sticker presets go through :func:`rdtf.export.export_sticker`, which fits the
    platform's limits and says what it changed.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format={fmt!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    name = name.strip()
    if not name or Path(name).name != name or name.startswith("."):
        raise ValueError(f"name={name!r}: expected a plain file name without folders, e.g. 'bouncing-cat'")
    suffix, preset = EXPORT_FORMATS[fmt]
    path = Path(folder) / f"{name}{suffix}"
    if preset is None:
        write_clip(clip, path)
        return path, f"{path}: GIF, {clip.width}x{clip.height}, {clip.num_frames} frames at {clip.fps:.3g} fps"
    report = export_sticker(clip, path, preset)
    return path, report.summary()


def find_loras(root: str | Path, *, base: str | Path | None = None) -> list[Path]:
    """Folders under ``root`` holding a LoRA file (``pytorch_lora_weights.safetensors``), sorted.

    With ``base``, only the LoRAs whose training card names that base model (a hub id, or a
    folder relative to the working directory as the trainer saw it): a LoRA only fits the
    model it was trained on, so the shipped ``assets/`` LoRA is offered with the shipped model only.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    folders = sorted(file.parent for file in root.rglob(LORA_WEIGHT_NAME))
    return folders if base is None else [folder for folder in folders if _trained_on(folder, base)]


def _trained_on(folder: Path, base: str | Path) -> bool:
    card = folder / CARD_NAME
    if not card.is_file():
        return False
    trained = str(json.loads(card.read_text(encoding="utf-8")).get("base", ""))
    return trained == str(base) or (Path(trained).exists() and Path(trained).resolve() == Path(base).resolve())


# --------------------------------------------------------------------------- the widget UI


class StickerStudio:
    """The sampling UI: source (upload or built-in sample), prompt, task, sampler, LoRA, result, export.

    ``dataset`` fills the built-in sample picker (ground truth is shown next to results made
    from a sample); ``loras`` fills the LoRA selector; saved stickers go to ``export_dir``.
    ``widget`` is the box to display. The ``on_*`` methods are the event handlers; they
    never raise (errors appear in ``status`` and in :attr:`last_error`).
    """

    def __init__(
        self,
        pipeline: RDTFPipeline,
        *,
        dataset: StickerDataset | None = None,
        loras: Sequence[str | Path] = (),
        export_dir: str | Path = "stickers",
        progress: bool = True,
        max_upload_bytes: int = MAX_UPLOAD_BYTES,
    ) -> None:
        self.pipeline = pipeline
        self.dataset = dataset
        self.export_dir = Path(export_dir)
        self.progress = progress
        self.max_upload_bytes = max_upload_bytes
        self.last_result: Clip | None = None
        self.last_error: str | None = None
        self._uploaded: Clip | None = None
        self._upload_error: str | None = None
        self._sample: Clip | None = None
        frames = int(pipeline.components.config.num_frames)
        slider = dict(continuous_update=False, style={"description_width": "initial"})

        self.upload = w.FileUpload(
            accept="image/*,.gif,.png,.apng,.webp,.mp4,.webm", multiple=False, description="Upload sticker"
        )
        samples = [] if dataset is None else [(_sample_label(row), i) for i, row in enumerate(dataset.rows)]
        self.sample = w.Dropdown(options=[("(none)", None), *samples], value=None, description="Built-in sample")
        self.caption = w.HTML()
        self.prompt = w.Textarea(placeholder="描述动作 / describe the motion", description="Prompt")
        self.negative_prompt = w.Text(description="Negative")
        self.task = w.Dropdown(options=[(TASK_LABELS[t], t) for t in TASKS], value="it2v", description="Task")
        self.factor = w.Dropdown(options=list(INTERPOLATION_FACTORS), value=2, description="Factor")
        recommended = pipeline.sampler_settings  # the model's own settings start the sliders (see on_task)
        guidance = dict(min=0.0, max=20.0, step=0.5, **slider)
        self.text_guidance = w.FloatSlider(value=recommended["text_guidance"], description="Text guidance", **guidance)
        self.image_guidance = w.FloatSlider(value=recommended["image_guidance"], description="Image guidance", **guidance)
        self.num_frames = w.IntSlider(value=frames, min=2, max=max(32, frames), description="Frames", **slider)
        steps = recommended["num_inference_steps"]
        self.steps = w.IntSlider(value=steps, min=1, max=max(100, steps), description="Denoising steps", **slider)
        self.fps = w.FloatSlider(value=8.0, min=1.0, max=30.0, step=1.0, description="fps", **slider)
        self.timing = w.HTML()
        self.seed = w.IntText(value=0, description="Seed")
        self.scheduler = w.Dropdown(options=list(SCHEDULERS), value=recommended["scheduler"], description="Scheduler")
        self.strength = w.FloatSlider(value=recommended["strength"], min=0.05, max=1.0, step=0.05,
                                      description="Start strength", **slider)
        self.decode = w.Dropdown(options=list(DECODES), value=recommended["decode"], description="Decode")
        lora_options = [("(none)", None), *[(str(path), str(path)) for path in loras]]
        self.lora = w.Dropdown(options=lora_options, value=None, description="LoRA")
        self.lora_scale = w.FloatSlider(value=1.0, min=0.0, max=2.0, step=0.05, description="LoRA scale", **slider)
        self.generate_button = w.Button(description="Generate", button_style="primary", icon="play")
        self.status = w.HTML()
        self.result = w.Image(format="gif")
        self.export_format = w.Dropdown(options=list(EXPORT_FORMATS), value="GIF", description="Save as")
        self.export_name = w.Text(value="sticker", description="File name")
        self.save_button = w.Button(description="Save", icon="download")
        self.log = w.Output()

        self.upload.observe(self.on_upload, names="value")
        self.sample.observe(self.on_sample, names="value")
        self.task.observe(self.on_task, names="value")
        for control in (self.upload, self.sample, self.factor):  # after their own handlers: the source is set
            control.observe(self._show_timing, names="value")
        self.generate_button.on_click(self.on_generate)
        self.save_button.on_click(self.on_save)
        self.on_task()
        self.widget = w.VBox(
            [
                w.HBox([self.upload, self.sample]),
                self.caption,
                self.prompt,
                self.negative_prompt,
                w.HBox([self.task, self.factor]),
                w.HBox([self.text_guidance, self.image_guidance]),
                w.HBox([self.num_frames, self.fps]),
                self.timing,
                w.HBox([self.steps, self.scheduler, self.seed]),
                w.HBox([self.strength, self.decode]),
                w.HBox([self.lora, self.lora_scale]),
                self.generate_button,
                self.status,
                self.result,
                w.HBox([self.export_format, self.export_name, self.save_button]),
                self.log,
            ]
        )

    # ---------------------------------------------------------------- reading the controls

    def reference(self) -> Clip | None:
        """The built-in sample's clip when the source is a sample (the ground truth to compare with)."""
        return None if self._uploaded is not None else self._sample

    def request(self) -> SampleRequest:
        """The request the controls describe; raises UploadError if the uploaded file was unusable."""
        if self._upload_error is not None:
            raise UploadError(self._upload_error)
        task = self.task.value
        return SampleRequest(
            task=task,
            source=self._source(task),
            prompt=self.prompt.value,
            negative_prompt=self.negative_prompt.value,
            num_frames=self.num_frames.value,
            interpolation_factor=self.factor.value,
            fps=self.fps.value,
            num_inference_steps=self.steps.value,
            text_guidance=self.text_guidance.value,
            image_guidance=self.image_guidance.value,
            scheduler=self.scheduler.value,
            strength=self.strength.value,
            decode=self.decode.value,
            seed=self.seed.value,
            lora=self.lora.value,
            lora_scale=self.lora_scale.value,
        )

    def _source(self, task: str) -> Clip | None:
        """The upload, else what ``task`` starts from in the picked sample (see :func:`task_inputs`)."""
        if self._uploaded is not None:
            return self._uploaded
        if self._sample is not None:
            return task_inputs(task, self._sample, self.factor.value)[0]
        return None

    def ground_truth(self) -> Clip | None:
        """What the current task should produce from the picked sample (None for uploads)."""
        reference = self.reference()
        if reference is None:
            return None
        return task_inputs(self.task.value, reference, self.factor.value)[1]

    # ---------------------------------------------------------------- handlers

    def on_upload(self, change: Any = None) -> None:
        """Decode the uploaded file now, so a bad file is reported at once."""
        self._uploaded, self._upload_error = None, None
        entries = self.upload.value
        if not entries:
            return
        entry = entries[0]
        try:
            clip = decode_upload(entry, max_bytes=self.max_upload_bytes)
        except UploadError as error:
            self._upload_error = str(error)
            self._show_error(error)
            return
        self._uploaded = clip
        self.sample.value = None
        kind = "still image" if clip.num_frames == 1 else f"{clip.num_frames} frames at {clip.fps:.3g} fps"
        self._show_message(f"Loaded {entry['name']}: {clip.width}x{clip.height}, {kind}.")

    def on_sample(self, change: Any = None) -> None:
        """Load the picked sample; its caption becomes the prompt and its timing the frame count and fps."""
        index = self.sample.value
        if index is None:
            self._sample = None
            self.caption.value = ""
            return
        try:
            self._sample = sample_clip(self.dataset, index)
        except Exception as error:
            self._sample = None
            self._show_error(error)
            return
        if self.upload.value:
            self.upload.value = ()
        row = self.dataset.rows[index]
        self.prompt.value = row.get("caption_en", "")
        self.num_frames.value = min(max(self._sample.num_frames, self.num_frames.min), self.num_frames.max)
        self.fps.value = min(max(round(self._sample.fps), self.fps.min), self.fps.max)
        self.caption.value = (
            f"<b>{html.escape(str(row['key']))}</b>: {html.escape(row.get('caption_en', ''))}"
            f"<br>中文: {html.escape(row.get('caption_zh', ''))}"
        )

    def on_task(self, change: Any = None) -> None:
        """Show the interpolation factor only where it applies; there the source sets the timing, not the sliders.

        Settings the model recommends per task (e.g. i2v's start strength) move to the new task's value.
        """
        recommended = self.pipeline.sampler_settings_for(self.task.value)
        controls = {"num_inference_steps": self.steps, "scheduler": self.scheduler, "text_guidance": self.text_guidance,
                    "image_guidance": self.image_guidance, "strength": self.strength, "decode": self.decode}
        for changes in self.pipeline.components.config.task_sampler.values():
            for name in changes:
                controls[name].value = recommended[name]
        interpolating = self.task.value == "interpolation"
        self.factor.layout.display = None if interpolating else "none"
        self.num_frames.disabled = self.fps.disabled = interpolating
        self._show_timing()

    def _show_timing(self, change: Any = None) -> None:
        """Under the disabled Frames / fps sliders, say what interpolation will make instead."""
        if self.task.value != "interpolation":
            self.timing.value = ""
            return
        factor = self.factor.value
        try:
            source = self._source("interpolation")
        except ValueError:  # a sample too short for this factor; generating reports it
            source = None
        if source is None or source.num_frames < 2:
            note = f"the source clip's frames and fps ×{factor} set the output"
        else:
            frames, fps = interpolation_timing(source, factor)
            note = (
                f"{source.num_frames} source frames at {source.fps:.3g} fps ×{factor} "
                f"→ {frames} frames at {fps:.3g} fps"
            )
        self.timing.value = f"<i>Interpolation: {html.escape(note)} (the Frames and fps sliders do not apply).</i>"

    def on_generate(self, button: Any = None) -> Clip | None:
        """Generate from the controls and show the result (next to the ground truth for a sample)."""
        self.last_error = None
        try:
            request = self.request()
            self._show_message("Generating ...")
            with self.log:
                clip = generate_sticker(self.pipeline, request, progress=self.progress)
            self.result.value = gif_bytes(
                comparison_clip(clip, self.ground_truth(), given_frames(request, clip.num_frames))
            )
        except Exception as error:  # a button callback must not raise: ipywidgets would hide it
            self._show_error(error)
            return None
        self.last_result = clip
        timing = f"{clip.num_frames} frames at {clip.fps:.3g} fps"
        if request.task == "interpolation":
            source = request.source
            timing = (
                f"{source.num_frames} frames at {source.fps:.3g} fps ×{request.interpolation_factor} → {timing}"
                " (set by the source and factor, not the Frames / fps sliders)"
            )
        uses_text = TASK_USES_TEXT[request.task]
        self._show_message(
            f"{request.task}: {timing}, seed {request.seed}" + ("" if uses_text else " (this task ignores the prompt)")
        )
        return clip

    def on_save(self, button: Any = None) -> Path | None:
        """Save the last result in the chosen format under ``export_dir``."""
        self.last_error = None
        try:
            if self.last_result is None:
                raise ValueError("nothing to save yet: generate a sticker first")
            path, summary = save_sticker(
                self.last_result, self.export_dir, self.export_name.value, self.export_format.value
            )
        except Exception as error:
            self._show_error(error)
            return None
        self._show_message(f"Saved. {summary}")
        return path

    def _show_message(self, text: str) -> None:
        self.status.value = f"<pre style='white-space:pre-wrap'>{html.escape(text)}</pre>"

    def _show_error(self, error: BaseException) -> None:
        self.last_error = f"{type(error).__name__}: {error}"
        self.status.value = f"<pre style='white-space:pre-wrap;color:#b00020'>{html.escape(self.last_error)}</pre>"


def _sample_label(row: Mapping[str, Any]) -> str:
    caption = str(row.get("caption_en", ""))
    caption = caption if len(caption) <= 48 else caption[:47] + "…"
    return f"{row.get('split', '?')} · {caption or row['key']}"


# --------------------------------------------------------------------------- inline display


def gif_bytes(clip: Clip) -> bytes:
    """``clip`` as looping GIF bytes, for ``ipywidgets.Image`` and ``IPython.display.Image``."""
    with tempfile.TemporaryDirectory(prefix="rdtf-gif-") as folder:
        return write_clip(clip, Path(folder) / "clip.gif").read_bytes()


def given_frames(request: SampleRequest, num_frames: int) -> np.ndarray:
    """Which of the ``num_frames`` generated frames were given to the model (1) rather than generated (0)."""
    if request.task == "interpolation":
        mask = np.zeros(num_frames, np.float32)
        mask[:: request.interpolation_factor] = 1.0
        return mask
    return condition_mask(request.task, num_frames).numpy()


def comparison_clip(result: Clip, ground_truth: Clip | None = None, given_mask: np.ndarray | None = None) -> Clip:
    """A labelled strip, "generated" next to "ground truth" when there is one, playing in sync.

    The ground truth is fitted to the result's size; the shorter clip holds its last frame.
    ``given_mask`` (one entry per result frame, see :func:`given_frames`) marks the given
    frames in the footer.
    """
    columns = {"generated": result.frames}
    if ground_truth is not None:
        rgb = fit_frames(ground_truth.frames, result.height, result.width)
        columns["ground truth"] = np.concatenate([rgb, np.full(rgb.shape[:-1] + (1,), 255, np.uint8)], axis=-1)
    length = max(len(frames) for frames in columns.values())
    padded = {name: _hold_last(frames, length) for name, frames in columns.items()}
    if given_mask is not None:
        given_mask = np.concatenate([given_mask, np.zeros(length - len(given_mask), np.float32)])
    return Clip.from_fps(compose_strip(padded, given_mask=given_mask), result.fps)


def _hold_last(frames: np.ndarray, length: int) -> np.ndarray:
    if len(frames) >= length:
        return frames
    return np.concatenate([frames, np.repeat(frames[-1:], length - len(frames), axis=0)])


def sample_gallery_html(dataset: StickerDataset, indices: Sequence[int], *, width: int = 128) -> str:
    """An HTML grid of animated samples, each with its English and Chinese caption."""
    cards = []
    for index in indices:
        row = dataset.rows[index]
        data = base64.b64encode(gif_bytes(sample_clip(dataset, index))).decode("ascii")
        meta = " · ".join(str(row[k]) for k in ("motion", "split") if k in row)
        cards.append(
            f"<figure style='margin:4px;width:{width + 40}px;font-size:12px'>"
            f"<img src='data:image/gif;base64,{data}' width='{width}' style='image-rendering:pixelated'>"
            f"<figcaption>{html.escape(row.get('caption_en', ''))}<br>{html.escape(row.get('caption_zh', ''))}"
            f"<br><span style='color:#777'>{html.escape(meta)}</span></figcaption></figure>"
        )
    return "<div style='display:flex;flex-wrap:wrap'>" + "".join(cards) + "</div>"


def read_training_log(path: str | Path) -> dict[str, np.ndarray]:
    """``log.csv`` of :func:`rdtf.train.train` as float columns; blank cells (not logged that step) are NaN."""
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{path}: the training log has no rows")
    return {
        column: np.array([float(row[column]) if row.get(column) else np.nan for row in rows])
        for column in rows[0]
    }


def training_log_figure(path: str | Path) -> Figure:
    """Loss per task (training points, validation lines) and the curriculum's task mix over training."""
    log = read_training_log(path)
    tasks = [task for task in TASKS if f"weight_{task}" in log]
    figure = Figure(figsize=(11, 3.6), dpi=100)
    losses, mix = figure.subplots(1, 2)
    steps = log["step"]
    for number, task in enumerate(tasks):
        colour = f"C{number}"
        trained = log.get(f"loss_{task}")
        if trained is not None and not np.isnan(trained).all():
            losses.plot(steps, trained, ".", color=colour, alpha=0.4)
        validation = log.get(f"val_{task}")
        if validation is not None and not np.isnan(validation).all():
            seen = ~np.isnan(validation)
            losses.plot(steps[seen], validation[seen], "o-", markersize=3, color=colour, label=task)
    losses.set(xlabel="step", ylabel="loss", title="loss per task (dots: training batches, lines: validation)")
    losses.title.set_fontsize(9)
    losses.legend(fontsize=7)
    losses.grid(alpha=0.3)
    mix.stackplot(steps, *[log[f"weight_{task}"] for task in tasks], labels=tasks, alpha=0.85)
    mix.set(xlabel="step", ylabel="sampling weight", ylim=(0, 1), title="task mix")
    mix.title.set_fontsize(9)
    mix.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    return figure


def summary_markdown(result: EvalResult, metrics: Sequence[str] = ("psnr", "ssim")) -> str:
    """One Markdown table per metric: tasks as rows, methods as columns, mean over clips with its CI."""
    blocks = []
    for metric in metrics:
        if metric not in result.metrics:
            continue
        arrow = {True: " ↑", False: " ↓", None: ""}[METRICS[metric]]
        header = "| task | " + " | ".join(result.methods) + " |"
        lines = [f"**{metric}{arrow}**", "", header, "|---" * (len(result.methods) + 1) + "|"]
        for task in result.tasks:
            cells = []
            for method in result.methods:
                entry = result.aggregate(task, method, metric)
                cells.append("–" if entry is None else _mean_with_ci(entry))
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    if not blocks:
        raise ValueError(f"metrics={list(metrics)}: none of them is in this result (has {', '.join(result.metrics)})")
    return "\n\n".join(blocks) + "\n"


def _mean_with_ci(entry: Mapping[str, Any]) -> str:
    def number(value: float) -> str:
        return "∞" if math.isinf(value) else f"{value:.3g}"

    if math.isnan(entry["mean"]):
        return "–"
    if math.isnan(entry["ci_low"]):
        return number(entry["mean"])
    return f"{number(entry['mean'])} [{number(entry['ci_low'])}, {number(entry['ci_high'])}]"
