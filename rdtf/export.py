"""Export a clip as a sticker a messaging app accepts (WhatsApp WebP, Telegram WebM).

Each preset is a set of hard limits (DESIGN.md §4). :func:`export_sticker` fits the clip to
the canvas, trims it to the longest allowed length and caps its frame rate, then meets the
size limit by a search that starts from high quality: quality first, then frame rate,
then length. Every change is recorded in plain words in :attr:`ExportReport.changes`; if
the limits cannot be met even at the lowest settings, :class:`ExportError` says why.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from functools import reduce
from pathlib import Path

import numpy as np
from PIL import Image

from rdtf.io import MIN_WRITE_DURATION_MS, Clip, resample_clip, write_clip


class ExportError(ValueError):
    """The clip cannot be made to fit the preset's limits."""


@dataclass(frozen=True)
class StickerPreset:
    """A platform's limits and the quality ladder used to meet them (best quality first)."""

    name: str
    suffix: str  # the file type the platform takes
    video: bool  # WebM: constant frame rate and even frame sizes
    side: int  # exactly side x side if square, else the longer side is exactly side
    square: bool
    max_bytes: int
    max_ms: int
    max_fps: float
    quality_option: str  # the write_clip option the ladder sets
    quality_ladder: tuple[int, ...]  # best first
    quality_label: str  # how a ladder value reads in the change log
    min_fps: float = 5.0  # below this an animation reads as a slideshow
    min_ms: int = 1000  # the shortest length worth sending


PRESETS: dict[str, StickerPreset] = {
    # WhatsApp animated sticker: WebP 512x512, <= 500 KB, <= 10 s. No frame-rate limit of its
    # own; 50 fps is the fastest an animated image plays (frames under 20 ms read as 100 ms).
    "whatsapp": StickerPreset(
        name="whatsapp",
        suffix=".webp",
        video=False,
        side=512,
        square=True,
        max_bytes=500 * 1024,
        max_ms=10_000,
        max_fps=1000 / MIN_WRITE_DURATION_MS,
        quality_option="quality",
        quality_ladder=(90, 75, 60, 45, 30, 15),
        quality_label="quality {}",
    ),
    # Telegram video sticker: WebM VP9 with alpha, one side 512, <= 3 s, <= 30 fps, <= 256 KB,
    # no audio (write_clip never writes an audio stream).
    "telegram": StickerPreset(
        name="telegram",
        suffix=".webm",
        video=True,
        side=512,
        square=False,
        max_bytes=256 * 1024,
        max_ms=3_000,
        max_fps=30.0,
        quality_option="crf",
        quality_ladder=(24, 32, 40, 48, 56, 63),
        quality_label="quality crf {}",
    ),
}


@dataclass
class ExportReport:
    """What was written and what had to change to meet the preset's limits."""

    path: Path
    preset: str
    size_bytes: int
    width: int
    height: int
    num_frames: int  # frames encoded (libwebp merges identical consecutive ones in its file)
    fps: float  # the video's frame rate; for WebP the mean rate
    duration_s: float
    changes: list[str]

    def summary(self) -> str:
        """What was written, then one line per change (for the CLI and notebooks)."""
        head = (
            f"{self.path}: {self.preset} sticker, {self.width}x{self.height}, {self.num_frames} frames at "
            f"{self.fps:.3g} fps, {self.duration_s:.2f} s, {self.size_bytes / 1024:.1f} KB"
        )
        changes = [f"  - {change}" for change in self.changes] or ["  (no changes needed)"]
        return "\n".join([head, *changes])


@dataclass(frozen=True)
class _Candidate:
    """A clip ready to encode; ``rate`` is the constant frame rate a video is written at."""

    clip: Clip
    rate: float | None

    @property
    def fps(self) -> float:
        return self.rate if self.rate is not None else self.clip.fps


def export_sticker(clip: Clip, path: str | os.PathLike[str], preset: str | StickerPreset) -> ExportReport:
    """Write ``clip`` to ``path`` within the limits of ``preset`` ("whatsapp" or "telegram").

    Raises ``ValueError`` for an unknown preset or a path with the wrong suffix and
    :class:`ExportError` when no quality, frame rate and length within the preset's floors
    fit its size limit. The file is only written once a candidate fits.
    """
    if not isinstance(clip, Clip):
        raise ValueError(f"clip: expected a rdtf.io.Clip, got {type(clip).__name__}")
    spec = preset if isinstance(preset, StickerPreset) else PRESETS.get(preset)
    if spec is None:
        raise ValueError(f"preset={preset!r}: expected one of {sorted(PRESETS)}")
    path = Path(path)
    if path.suffix.lower() != spec.suffix:
        raise ValueError(f"{path}: {spec.name} stickers are {spec.suffix} files")
    changes: list[str] = []
    canvas = _Canvas.fitting(clip, spec, changes)
    base = _trim(clip, spec.max_ms, changes)
    candidate = _pace(base, spec, changes)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.export-") as workdir:
        candidate, encoded = _meet_size(base, candidate, spec, canvas, Path(workdir), changes)
        os.replace(encoded, path)
    final = candidate.clip
    return ExportReport(
        path=path,
        preset=spec.name,
        size_bytes=path.stat().st_size,
        width=final.width,
        height=final.height,
        num_frames=final.num_frames,
        fps=candidate.fps,
        duration_s=final.total_ms / 1000,
        changes=changes,
    )


# ----------------------------------------------------------------------------- canvas, length, pace


@dataclass(frozen=True)
class _Canvas:
    """Where the frames go: scaled to ``width`` x ``height`` (aspect kept), centred on the canvas."""

    width: int
    height: int
    canvas_width: int
    canvas_height: int

    @classmethod
    def fitting(cls, clip: Clip, spec: StickerPreset, changes: list[str]) -> _Canvas:
        """The longer side becomes exactly ``spec.side``; square presets pad the other with transparency."""
        scale = spec.side / max(clip.width, clip.height)
        step = 2 if spec.video else 1  # 4:2:0 video wants even sizes
        width = max(step, step * round(clip.width * scale / step))
        height = max(step, step * round(clip.height * scale / step))
        if (width, height) != (clip.width, clip.height):
            changes.append(f"resized {clip.width}x{clip.height} -> {width}x{height}")
        if not spec.square:
            return cls(width, height, width, height)
        if (width, height) != (spec.side, spec.side):
            changes.append(f"padded {width}x{height} -> {spec.side}x{spec.side} with transparent borders")
        return cls(width, height, spec.side, spec.side)

    def apply(self, clip: Clip) -> Clip:
        frames = clip.frames
        if (self.width, self.height) != (clip.width, clip.height):
            size = (self.width, self.height)
            frames = np.stack(
                [np.asarray(Image.fromarray(f, "RGBA").resize(size, Image.Resampling.LANCZOS)) for f in frames]
            )
        if (self.canvas_width, self.canvas_height) != (self.width, self.height):
            padded = np.zeros((len(frames), self.canvas_height, self.canvas_width, 4), np.uint8)
            top, left = (self.canvas_height - self.height) // 2, (self.canvas_width - self.width) // 2
            padded[:, top : top + self.height, left : left + self.width] = frames
            frames = padded
        return Clip(frames, clip.durations_ms)


def _trim(clip: Clip, max_ms: int, changes: list[str] | None = None) -> Clip:
    """Keep the first ``max_ms`` of the clip (the last kept frame is shortened)."""
    if clip.total_ms <= max_ms:
        return clip
    starts = np.cumsum(clip.durations_ms) - clip.durations_ms
    keep = int(np.searchsorted(starts, max_ms, side="left"))
    durations = clip.durations_ms[:keep].copy()
    durations[-1] -= int(durations.sum()) - max_ms
    if changes is not None:
        changes.append(f"trimmed {clip.total_ms / 1000:.1f} s -> {max_ms / 1000:.1f} s")
    return Clip(clip.frames[:keep], durations)


def _at_fps(clip: Clip, fps: float, spec: StickerPreset) -> _Candidate:
    """Resample by time to a constant ``fps`` without running past the clip's end."""
    count = max(1, math.floor(clip.total_ms * fps / 1000 + 1e-9))
    paced = resample_clip(_trim(clip, round(count * 1000 / fps)), num_frames=count)
    return _Candidate(paced, fps if spec.video else None)


def _pace(clip: Clip, spec: StickerPreset, changes: list[str]) -> _Candidate:
    """Timing the format can carry within ``spec.max_fps``.

    WebP keeps variable timing unless a frame is shorter than 1000 / max_fps ms. Video gets
    a constant rate: the clip's own (:func:`_native_rate`) when it is within the limit,
    else max_fps.
    """
    if spec.video:
        rate = _native_rate(clip)
        if rate <= spec.max_fps:
            return _at_fps(clip, rate, spec)
    elif clip.durations_ms.min() >= 1000 / spec.max_fps:
        return _Candidate(clip, None)
    durations = clip.durations_ms
    if durations.max() - durations.min() <= 1:
        changes.append(f"fps {clip.fps:.3g} -> {spec.max_fps:g} (limit {spec.max_fps:g} fps)")
    else:
        changes.append(f"fps {clip.fps:.3g} (variable) -> {spec.max_fps:g} constant (limit {spec.max_fps:g} fps)")
    return _at_fps(clip, spec.max_fps, spec)


def _native_rate(clip: Clip) -> float:
    """The constant rate that shows ``clip`` as timed (its last frame, maybe cut by a trim, aside).

    Durations equal up to millisecond rounding give their rate, snapped to a whole number
    when that is within 0.5 ms per frame (33, 33, 34 ms -> 30 fps); otherwise the rate of
    their greatest common step (100, 300 ms -> 10 fps, frames repeated).
    """
    durations = clip.durations_ms[:-1] if clip.num_frames > 1 else clip.durations_ms
    if durations.max() - durations.min() > 1:
        return 1000 / reduce(math.gcd, durations.tolist())
    mean = float(durations.mean())
    whole = max(1, round(1000 / mean))
    return float(whole) if abs(1000 / whole - mean) <= 0.5 else round(1000 / mean, 3)


# ----------------------------------------------------------------------------- size search


def _meet_size(
    base: Clip, candidate: _Candidate, spec: StickerPreset, canvas: _Canvas, workdir: Path, changes: list[str]
) -> tuple[_Candidate, Path]:
    """Lower quality, then frame rate, then length until the file fits ``spec.max_bytes``.

    ``base`` is the trimmed clip that lower frame rates are resampled from; each candidate
    is put on the ``canvas`` before it is encoded. The size of the lowest-quality file sets
    the next frame rate or length (bytes grow about linearly with the number of frames;
    20 % margin because fewer frames differ more).
    """
    ladder, limit_kb = spec.quality_ladder, spec.max_bytes // 1024
    first_round = True
    lowered_fps: float | None = None  # set once the frame rate has been cut for size
    while True:
        candidate = _Candidate(canvas.apply(candidate.clip), candidate.rate)
        quality, encoded, smallest = _best_quality(candidate, spec, workdir, try_best_first=first_round)
        if encoded is not None:
            if quality != ladder[0]:
                changes.append(f"{spec.quality_label.format(ladder[0])} -> {quality}")
            return candidate, encoded
        first_round = False
        shrink = 0.8 * spec.max_bytes / smallest
        fps = candidate.fps
        if fps > spec.min_fps:
            new_fps = max(spec.min_fps, math.floor(fps * shrink * 10) / 10)
            changes.append(f"fps {fps:.3g} -> {new_fps:g} (to fit {limit_kb} KB)")
            lowered_fps = new_fps
            candidate = _at_fps(base, new_fps, spec)
            continue
        new_ms = math.floor(base.total_ms * shrink)
        if new_ms < spec.min_ms:
            raise ExportError(
                f"cannot fit the {spec.name} limit of {limit_kb} KB: the smallest file is {smallest / 1024:.1f} KB "
                f"at {spec.quality_label.format(ladder[-1])}, {fps:.3g} fps, {base.total_ms / 1000:.1f} s "
                f"(floors: {spec.min_fps:g} fps, {spec.min_ms / 1000:g} s)"
            )
        changes.append(f"trimmed {base.total_ms / 1000:.1f} s -> {new_ms / 1000:.1f} s (to fit {limit_kb} KB)")
        base = _trim(base, new_ms)
        candidate = _pace(base, spec, []) if lowered_fps is None else _at_fps(base, lowered_fps, spec)


#: Frames in the excerpt whose encoded size screens out hopeless full encodes.
EXCERPT_FRAMES = 30
#: A rung is skipped without a full encode when the excerpt predicts this many times the limit.
HOPELESS_FACTOR = 1.5


def _best_quality(
    candidate: _Candidate, spec: StickerPreset, workdir: Path, *, try_best_first: bool
) -> tuple[int, Path | None, float]:
    """Binary search of the ladder for the best quality whose file fits.

    Returns (quality, file, size); when even the last rung is too big the file is None and
    the size is that smallest file's (or its estimate). ``try_best_first`` encodes the top
    rung first (the usual case fits at once); after a failed round the last rung goes first.

    Full encodes of long clips are slow (tens of seconds at 512 px), so each rung is first
    encoded as an excerpt of :data:`EXCERPT_FRAMES` consecutive frames from the middle of
    the clip; a rung whose excerpt, scaled to the clip's length, is over
    :data:`HOPELESS_FACTOR` times the limit counts as too big without a full encode. Only full
    encodes ever decide that a file fits.
    """
    ladder, clip = spec.quality_ladder, candidate.clip
    sizes: dict[int, float] = {}
    start = max(0, (clip.num_frames - EXCERPT_FRAMES) // 2)
    excerpt = Clip(clip.frames[start : start + EXCERPT_FRAMES], clip.durations_ms[start : start + EXCERPT_FRAMES])
    scale = clip.num_frames / excerpt.num_frames

    def file(index: int) -> Path:
        return workdir / f"quality-{ladder[index]}{spec.suffix}"

    def encode(frames: Clip, index: int, path: Path) -> int:
        options: dict[str, object] = {spec.quality_option: ladder[index]}
        if candidate.rate is not None:
            options["fps"] = candidate.rate
        return write_clip(frames, path, **options).stat().st_size

    def fits(index: int) -> bool:
        if scale > 1:
            estimate = encode(excerpt, index, workdir / f"excerpt{spec.suffix}") * scale
            if estimate > HOPELESS_FACTOR * spec.max_bytes:
                sizes[index] = estimate
                return False
        sizes[index] = encode(clip, index, file(index))
        return sizes[index] <= spec.max_bytes

    failing, fitting = -1, len(ladder) - 1  # failing = -1: nothing known to fail yet
    if try_best_first:
        if fits(0):
            return ladder[0], file(0), sizes[0]
        failing = 0
    if not fits(fitting):
        return ladder[fitting], None, sizes[fitting]
    while fitting - failing > 1:
        middle = (failing + fitting) // 2
        if fits(middle):
            fitting = middle
        else:
            failing = middle
    return ladder[fitting], file(fitting), sizes[fitting]
