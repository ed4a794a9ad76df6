"""Sticker files <-> RGBA frames with per-frame durations.

Every format the kit reads or writes (GIF, APNG/PNG, animated WebP, MP4, WebM) meets the
rest of the kit as one :class:`Clip`: ``(F, H, W, 4)`` uint8 RGBA frames plus each frame's
display time in milliseconds. Durations are kept per frame because real stickers hold
some poses longer than others; :func:`resample_clip` turns them into a constant frame
rate by time, so a frame shown for 300 ms is picked three times as often as a 100 ms one.

Timing rules for the animated image formats (GIF, APNG, WebP) — the browsers' rule:

* a frame with no duration, or a duration of 10 ms or less (GIF delays 0 and 1), is shown
  for :data:`DEFAULT_DURATION_MS`, as Firefox and Chromium show it;
* a GIF frame without its own graphic control extension keeps the previous one's delay and
  disposal (ImageMagick's reading); before the first one, the delay is missing;
* image writers never write less than :data:`MIN_WRITE_DURATION_MS`, so what is written
  reads back unchanged; GIF delays are rounded to its 10 ms steps.

Videos are written at a constant frame rate (see :func:`video_rate`) and read with each
frame's duration taken from its presentation timestamps.

GIF frames are composited here (disposal 0-3, per-frame transparency, local palettes,
sub-rectangles at offsets) rather than by Pillow, whose own compositing changes mode
between frames and re-quantizes. The result equals ImageMagick's ``convert -coalesce`` with
one deliberate exception: pixels no frame has drawn stay transparent, as in browsers, where
ImageMagick 6 turns them opaque once a background disposal happens in a GIF whose first
frame has no transparent index. Video goes through the ffmpeg binary shipped with
``imageio-ffmpeg``. Every reader checks the declared canvas size and frame count before
decoding pixels, and every writer writes atomically.
"""

from __future__ import annotations

import io
import math
import os
import re
import secrets
import struct
import subprocess
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

#: Display time given to a frame whose file gives none, or 10 ms or less (browser rule).
DEFAULT_DURATION_MS: int = 100
#: Shortest per-frame time the writers emit (GIF: 2 centiseconds; shorter reads as 100 ms).
MIN_WRITE_DURATION_MS: int = 20
#: File suffixes and the format each one means.
SUFFIX_FORMATS: dict[str, str] = {
    ".gif": "gif",
    ".png": "png",
    ".apng": "png",
    ".webp": "webp",
    ".mp4": "mp4",
    ".webm": "webm",
}

_PIL_ERRORS = (OSError, EOFError, SyntaxError, ValueError, struct.error, zlib.error, IndexError)


class StickerFileError(ValueError):
    """A sticker file that cannot be read or written; ``str(e) == f"{path}: {reason}"``."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass
class Clip:
    """An animated sticker: RGBA frames and how long each one is shown."""

    frames: np.ndarray  # (F, H, W, 4) uint8 RGBA
    durations_ms: np.ndarray  # (F,) int64, display time of each frame in ms

    def __post_init__(self) -> None:
        frames = self.frames
        if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
            raise ValueError(f"Clip.frames: expected a uint8 numpy array, got {_describe(frames)}")
        if frames.ndim != 4 or frames.shape[-1] != 4 or 0 in frames.shape:
            raise ValueError(f"Clip.frames: expected shape (F, H, W, 4) with F, H, W >= 1, got {frames.shape}")
        durations = np.asarray(self.durations_ms)
        if durations.dtype.kind not in "iu":
            raise ValueError(f"Clip.durations_ms: expected integer milliseconds, got dtype {durations.dtype}")
        if durations.shape != (frames.shape[0],):
            raise ValueError(
                f"Clip.durations_ms: expected shape ({frames.shape[0]},) to match the frames, got {durations.shape}"
            )
        if (durations < 1).any():
            raise ValueError(f"Clip.durations_ms: every duration must be >= 1 ms, got min {durations.min()}")
        self.durations_ms = durations.astype(np.int64)

    @classmethod
    def from_fps(cls, frames: np.ndarray, fps: float) -> Clip:
        """Frames at a constant rate; durations are rounded so that they add up to ``F / fps`` seconds."""
        if not fps > 0:
            raise ValueError(f"fps={fps}: must be > 0")
        count = len(frames)
        return cls(frames, _split_evenly(round(1000 * count / fps), count))

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def height(self) -> int:
        return int(self.frames.shape[1])

    @property
    def width(self) -> int:
        return int(self.frames.shape[2])

    @property
    def total_ms(self) -> int:
        return int(self.durations_ms.sum())

    @property
    def fps(self) -> float:
        """Mean frame rate: frames per second of display time."""
        return 1000.0 * self.num_frames / self.total_ms


# ----------------------------------------------------------------------------- reading


def read_clip(
    path: str | os.PathLike[str],
    *,
    max_frames: int = 2000,
    max_pixels: int = 4096 * 4096,
    max_total_pixels: int = 1 << 28,
) -> Clip:
    """Read a GIF, APNG/PNG, WebP, MP4 or WebM sticker into a :class:`Clip`.

    ``max_pixels`` bounds the declared canvas (width x height), ``max_frames`` the frame
    count and ``max_total_pixels`` their product (the decoded size: 4 bytes per pixel, 1 GiB
    by default); all are checked from the headers before any pixel is decoded. Any problem
    with the file raises :class:`StickerFileError` naming the file and what is wrong.
    """
    path = Path(path)
    _format_for_suffix(path)
    if not path.exists():
        raise StickerFileError(path, "file not found")
    if not path.is_file():
        raise StickerFileError(path, "not a regular file")
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        raise StickerFileError(path, "empty file (0 bytes)")
    kind = _sniff(head)
    if kind is None:
        raise StickerFileError(
            path, "not a GIF, PNG, WebP, MP4 or WebM file (unrecognised signature; wrong extension or corrupt?)"
        )
    return _READERS[kind](path, _Limits(max_frames, max_pixels, max_total_pixels))


def _format_for_suffix(path: Path) -> str:
    fmt = SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise StickerFileError(
            path, f"unknown extension {path.suffix!r} (expected one of {', '.join(sorted(SUFFIX_FORMATS))})"
        )
    return fmt


def _sniff(head: bytes) -> str | None:
    """Format from the file's first bytes: contents win over a mislabelled extension."""
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[4:8] == b"ftyp" or head[:4] == b"\x1a\x45\xdf\xa3":
        return "video"
    return None


@dataclass(frozen=True)
class _Limits:
    """How much a reader may decode (see :func:`read_clip`)."""

    max_frames: int
    max_pixels: int
    max_total_pixels: int

    def check_canvas(self, path: Path, width: int, height: int) -> None:
        if width <= 0 or height <= 0:
            raise StickerFileError(path, f"declares an empty {width}x{height} canvas")
        if width * height > self.max_pixels:
            raise StickerFileError(
                path,
                f"declares a {width}x{height} canvas ({width * height} pixels) > max_pixels={self.max_pixels}; "
                "refusing to decode (decompression bomb?)",
            )

    def check_frames(self, path: Path, frames: int, width: int, height: int, *, declared: bool = True) -> None:
        said = "declares" if declared else "has at least"
        if frames > self.max_frames:
            raise StickerFileError(path, f"{said} {frames} frames > max_frames={self.max_frames}")
        if frames * width * height > self.max_total_pixels:
            raise StickerFileError(
                path,
                f"{said} {frames} frames of {width}x{height} = {frames * width * height} pixels "
                f"> max_total_pixels={self.max_total_pixels}",
            )


def _image_duration_ms(value: float | None) -> int:
    """The browser rule: missing or <= 10 ms means :data:`DEFAULT_DURATION_MS`."""
    if value is None or round(value) <= 10:
        return DEFAULT_DURATION_MS
    return int(round(value))


# GIF ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _GifFrame:
    left: int
    top: int
    width: int
    height: int
    interlaced: bool
    palette: bytes | None  # local color table, None = use the global one
    lzw: bytes  # LZW minimum code size byte + data sub-blocks + terminator
    disposal: int
    transparency: int | None
    delay_cs: int | None


def _read_gif(path: Path, limits: _Limits) -> Clip:
    data = path.read_bytes()
    width, height, global_palette, frames = _parse_gif(path, data, limits)
    if not frames:
        raise StickerFileError(path, "contains no frames")
    limits.check_frames(path, len(frames), width, height)
    return Clip(
        _composite_gif(path, width, height, global_palette, frames),
        np.array([_image_duration_ms(None if f.delay_cs is None else 10 * f.delay_cs) for f in frames]),
    )


def _parse_gif(path: Path, data: bytes, limits: _Limits) -> tuple[int, int, bytes, list[_GifFrame]]:
    """Walk the GIF block structure (no pixel decoding) and collect each frame's pieces."""
    end = len(data)

    def need(pos: int, count: int) -> None:
        if pos + count > end:
            raise StickerFileError(path, f"truncated GIF (ends at byte {end}, needs {pos + count})")

    need(0, 13)
    width, height, flags = struct.unpack_from("<HHB", data, 6)
    limits.check_canvas(path, width, height)
    pos = 13
    size = 3 << ((flags & 7) + 1)
    global_palette = bytes(size)  # no global table: black entries, as ImageMagick reads it
    if flags & 0x80:
        need(pos, size)
        global_palette = data[pos : pos + size]
        pos += size

    def skip_sub_blocks(pos: int) -> int:
        while True:
            need(pos, 1)
            count = data[pos]
            pos += 1
            if count == 0:
                return pos
            pos += count

    frames: list[_GifFrame] = []
    # As in ImageMagick: disposal and delay stay in effect until the next graphic control
    # extension; its transparent index applies to the next image only.
    disposal, delay, transparency = 0, None, None
    while pos < end:
        block = data[pos]
        if block == 0x3B:  # trailer
            break
        if block == 0x21:  # extension
            need(pos, 2)
            if data[pos + 1] == 0xF9:
                need(pos, 8)
                packed, delay, index = struct.unpack_from("<BHB", data, pos + 3)
                disposal, transparency = (packed >> 2) & 7, index if packed & 1 else None
            pos = skip_sub_blocks(pos + 2)
        elif block == 0x2C:  # image descriptor
            need(pos, 10)
            left, top, w, h, packed = struct.unpack_from("<HHHHB", data, pos + 1)
            pos += 10
            palette = None
            if packed & 0x80:
                size = 3 << ((packed & 7) + 1)
                need(pos, size)
                palette = data[pos : pos + size]
                pos += size
            if w * h > limits.max_pixels:
                raise StickerFileError(
                    path,
                    f"frame {len(frames)} declares {w}x{h} pixels > max_pixels={limits.max_pixels} "
                    "(decompression bomb?)",
                )
            start = pos
            need(pos, 1)
            pos = skip_sub_blocks(pos + 1)
            frames.append(
                _GifFrame(left, top, w, h, bool(packed & 0x40), palette, data[start:pos], disposal, transparency, delay)
            )
            transparency = None
            if len(frames) > limits.max_frames:
                raise StickerFileError(path, f"has more than max_frames={limits.max_frames} frames")
        else:
            raise StickerFileError(path, f"corrupt GIF: unexpected block 0x{block:02x} at byte {pos}")
    return width, height, global_palette, frames


def _gif_indices(path: Path, number: int, frame: _GifFrame) -> np.ndarray:
    """LZW-decode one frame to its (h, w) palette indices with Pillow's C GIF decoder (interlacing undone)."""
    try:
        image = Image.frombytes("L", (frame.width, frame.height), frame.lzw[1:], "gif", frame.lzw[0], frame.interlaced)
    except _PIL_ERRORS as e:
        raise StickerFileError(path, f"corrupt GIF image data in frame {number}: {e}") from e
    return np.asarray(image)


def _gif_lut(palette: bytes, transparency: int | None) -> np.ndarray:
    """Index -> RGBA table with ImageMagick's edge rules.

    A transparent index one past the table adds a transparent entry; one further past is
    ignored. Indices beyond the table read as entry 0.
    """
    colors = np.frombuffer(palette, np.uint8).reshape(-1, 3)[:256]
    size = len(colors)
    lut = np.zeros((256, 4), np.uint8)
    lut[:size, :3] = colors
    lut[:, 3] = 255
    if transparency is not None and transparency <= size:
        lut[transparency, 3] = 0
        size = max(size, transparency + 1)
    lut[size:] = lut[0]
    return lut


_ALPHA_BITS = np.array([0, 0, 0, 255], np.uint8).view(np.uint32)[0]  # an RGBA pixel's alpha, seen as uint32


def _composite_gif(
    path: Path, width: int, height: int, global_palette: bytes, frames: list[_GifFrame]
) -> np.ndarray:
    """Coalesce GIF frames onto a transparent canvas, honouring each frame's disposal.

    Pixels are handled as one uint32 per RGBA (a view, no copies), so palette lookup and
    compositing are single numpy gathers and masked copies.
    """
    out = np.empty((len(frames), height, width), np.uint32)
    canvas = np.zeros((height, width), np.uint32)
    luts: dict[tuple[bytes, int | None], np.ndarray] = {}
    for number, frame in enumerate(frames):
        x0, y0 = min(frame.left, width), min(frame.top, height)
        x1, y1 = min(frame.left + frame.width, width), min(frame.top + frame.height, height)
        region = canvas[y0:y1, x0:x1]
        saved = region.copy() if frame.disposal == 3 else None
        if region.size:
            indices = _gif_indices(path, number, frame)[: y1 - y0, : x1 - x0]
            key = (frame.palette if frame.palette is not None else global_palette, frame.transparency)
            lut = luts.get(key)
            if lut is None:
                lut = luts[key] = _gif_lut(*key).view(np.uint32).reshape(256)
            pixels = lut[indices]
            if frame.transparency is None:  # opaque frame: copy
                region[...] = pixels
            else:  # frame with transparency: over
                np.copyto(region, pixels, where=(pixels & _ALPHA_BITS) != 0)
        out[number] = canvas
        if frame.disposal == 2:
            region[...] = 0
        elif saved is not None:
            region[...] = saved
    return out.view(np.uint8).reshape(len(frames), height, width, 4)


# PNG / APNG and WebP ------------------------------------------------------------------


def _png_declared_size(path: Path, head: bytes) -> tuple[int, int]:
    if len(head) < 24 or head[12:16] != b"IHDR":
        raise StickerFileError(path, "truncated or corrupt PNG (no IHDR header)")
    return struct.unpack(">II", head[16:24])


def _webp_declared_size(path: Path, head: bytes) -> tuple[int, int]:
    chunk = head[12:16]
    if chunk == b"VP8X" and len(head) >= 30:
        return 1 + int.from_bytes(head[24:27], "little"), 1 + int.from_bytes(head[27:30], "little")
    if chunk == b"VP8 " and len(head) >= 30 and head[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", head[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L" and len(head) >= 25 and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    raise StickerFileError(path, "truncated or corrupt WebP (no VP8X/VP8/VP8L header)")


def _read_with_pillow(path: Path, limits: _Limits) -> Clip:
    """PNG/APNG and WebP: headers checked here, frame compositing by Pillow (libpng/libwebp rules)."""
    with open(path, "rb") as f:
        head = f.read(64)
    declared = _png_declared_size if head[:4] == b"\x89PNG" else _webp_declared_size
    limits.check_canvas(path, *declared(path, head))
    frames: list[np.ndarray] = []
    durations: list[int] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=["PNG", "WEBP"]) as im:
                count = getattr(im, "n_frames", 1)
                limits.check_canvas(path, im.width, im.height)
                limits.check_frames(path, count, im.width, im.height)
                for index in range(count):
                    im.seek(index)
                    im.load()
                    frames.append(np.asarray(im.convert("RGBA")))
                    durations.append(_image_duration_ms(im.info.get("duration")))
    except StickerFileError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise StickerFileError(path, f"decompression bomb: {e}") from e
    except _PIL_ERRORS as e:
        raise StickerFileError(path, f"corrupt or truncated image: {e}") from e
    return Clip(np.stack(frames), np.array(durations))


# MP4 / WebM ------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoInfo:
    """What ffmpeg reports about a video file's first video stream (see :func:`probe_video`)."""

    codec: str
    pix_fmt: str
    width: int
    height: int
    fps: float | None
    duration_s: float | None
    has_alpha: bool  # WebM alpha_mode=1 (VP8/VP9 side-channel alpha)
    has_audio: bool
    container: str


def ffmpeg_exe() -> str:
    """The ffmpeg binary bundled with imageio-ffmpeg (imported here: a training machine needs no video encoder)."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def probe_video(path: str | os.PathLike[str]) -> VideoInfo:
    """Parse ``ffmpeg -i`` output: codec, size, frame rate, duration, alpha and audio."""
    path = Path(path)
    result = subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path)], capture_output=True, text=True, errors="replace"
    )
    text = result.stderr
    streams = re.findall(r"^\s*Stream #\d+:\d+.*?: (Video|Audio): (.*)$", text, re.MULTILINE)
    video = next((desc for kind, desc in streams if kind == "Video"), None)
    if video is None:
        reason = text.strip().splitlines()[-1] if text.strip() else "ffmpeg could not read it"
        raise StickerFileError(path, f"no video stream found ({reason})")
    size = re.search(r", (\d{1,5})x(\d{1,5})\b", video)
    if size is None:
        raise StickerFileError(path, f"video stream without a frame size: {video}")
    width, height = int(size[1]), int(size[2])
    rotation = re.search(r"rotation of (-?[\d.]+) degrees", text)
    if rotation and round(float(rotation[1])) % 180 == 90:
        width, height = height, width
    fps = re.search(r"([\d.]+)(k?) fps", video)
    duration = re.search(r"Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)", text)
    return VideoInfo(
        codec=video.split()[0].rstrip(","),
        pix_fmt=_first_group(r"^[^,]+, (\w+)", video),
        width=width,
        height=height,
        fps=float(fps[1]) * (1000 if fps[2] else 1) if fps else None,
        duration_s=int(duration[1]) * 3600 + int(duration[2]) * 60 + float(duration[3]) if duration else None,
        has_alpha=bool(re.search(r"^\s*alpha_mode\s*:\s*1\s*$", text, re.MULTILINE)),
        has_audio=any(kind == "Audio" for kind, _ in streams),
        container=_first_group(r"^Input #0, ([\w,]+), from", text, re.MULTILINE),
    )


def _first_group(pattern: str, text: str, flags: int = 0) -> str:
    match = re.search(pattern, text, flags)
    return match[1] if match else ""


def _read_video(path: Path, limits: _Limits) -> Clip:
    info = probe_video(path)
    limits.check_canvas(path, info.width, info.height)
    if info.fps and info.duration_s:  # a container's estimate; enforced exactly while decoding
        limits.check_frames(path, math.floor(info.fps * info.duration_s * 0.98), info.width, info.height)
    decoder = {"vp9": ["-c:v", "libvpx-vp9"], "vp8": ["-c:v", "libvpx"]}.get(info.codec, []) if info.has_alpha else []
    command = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-nostats", *decoder, "-i", str(path), "-map", "0:v:0"]
    command += ["-vf", "showinfo", "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgba", "pipe:1"]
    frame_bytes = info.width * info.height * 4
    frames: list[np.ndarray] = []
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log)
        assert process.stdout is not None
        try:
            while chunk := process.stdout.read(frame_bytes):
                if len(chunk) < frame_bytes:
                    break
                limits.check_frames(path, len(frames) + 1, info.width, info.height, declared=False)
                frames.append(np.frombuffer(chunk, np.uint8).reshape(info.height, info.width, 4))
        finally:
            process.stdout.close()
            if process.poll() is None:
                process.kill()
            process.wait()
        log.seek(0)
        text = log.read().decode(errors="replace")
    times = [float(t) for t in re.findall(r"\] n:\s*\d+ .*?pts_time:\s*(-?[\d.e+-]+)", text)]
    if process.returncode != 0 or not frames or len(times) < len(frames):
        tail = text.strip().splitlines()[-1] if text.strip() else f"exit code {process.returncode}"
        raise StickerFileError(path, f"could not decode video ({len(frames)} frames decoded): {tail}")
    return Clip(np.stack(frames), _video_durations(times[: len(frames)], info))


def _video_durations(times: list[float], info: VideoInfo) -> np.ndarray:
    """Per-frame ms from presentation times; the last frame lasts one nominal frame period."""
    period = 1.0 / info.fps if info.fps else DEFAULT_DURATION_MS / 1000
    ends_s = np.append(np.asarray(times[1:]), times[-1] + period)
    bounds = np.round(1000 * (np.concatenate([[times[0]], ends_s]) - times[0])).astype(np.int64)
    return np.maximum(np.diff(bounds), 1)


_READERS: dict[str, Callable[[Path, _Limits], Clip]] = {
    "gif": _read_gif,
    "png": _read_with_pillow,
    "webp": _read_with_pillow,
    "video": _read_video,
}


# ----------------------------------------------------------------------------- writing


def write_clip(clip: Clip, path: str | os.PathLike[str], **options: Any) -> Path:
    """Write ``clip`` in the format its suffix names, atomically; returns the path.

    Options by format (anything else raises ``ValueError``):

    * ``.gif``: one global palette for all frames (exact when the clip has <= 255 opaque
      colours, else median cut), index 255 transparent (alpha < 128), disposal 2, loop forever.
    * ``.webp``: ``lossless=False``, ``quality=90`` (0-100), ``method=4`` (0-6, slower =
      smaller); 8-bit alpha. libwebp merges identical consecutive frames (timing kept).
    * ``.png`` / ``.apng``: lossless APNG, every frame stored whole.
    * ``.mp4``: H.264 yuv420p, ``crf=18``, ``fps=None``, ``background=(255, 255, 255)`` — alpha
      is composited onto the background and odd sizes are padded with it to even.
    * ``.webm``: VP9 yuva420p (alpha kept), ``crf=30``, ``fps=None``, ``speed=4`` (libvpx
      ``-cpu-used``).

    Videos have a constant frame rate: ``fps`` if given (the clip is resampled by time),
    else the coarsest rate that shows every duration exactly (frames repeated as needed),
    else 30 fps.
    """
    if not isinstance(clip, Clip):
        raise ValueError(f"clip: expected a Clip, got {_describe(clip)}")
    path = Path(path)
    writer = _WRITERS[_format_for_suffix(path)]
    unknown = sorted(set(options) - set(writer.__kwdefaults__ or {}))
    if unknown:
        raise ValueError(
            f"write_clip({path.name}): unknown option(s) {unknown}; "
            f"{path.suffix} takes {sorted(writer.__kwdefaults__ or {})}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(path) as temporary:
        writer(clip, temporary, **options)
    return path


@contextmanager
def atomic_target(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary name next to ``path``, moved over it only if the writer succeeds.

    Readers see the old file or the new one, never half of one, even after a crash.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.{secrets.token_hex(6)}.tmp{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_target`)."""
    with atomic_target(path) as temporary:
        temporary.write_bytes(data)


def _write_durations(clip: Clip) -> np.ndarray:
    return np.maximum(clip.durations_ms, MIN_WRITE_DURATION_MS)


# GIF writing: a global palette, frames LZW-encoded by Pillow and spliced into our own blocks


_GIF_TRANSPARENT = 255
_GIF_COLORS = 255  # palette entries for colours; the last of 256 is the transparent one


def _gif_quantize(frames: np.ndarray, *, max_samples: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """One palette for all frames (no per-frame flicker) and every frame's indices into it.

    Clips with at most 255 distinct opaque colours keep them exactly; otherwise median cut
    over (a sample of) all frames' opaque pixels picks 255 and each colour maps to its
    nearest entry. Pixels with alpha < 128 get the transparent index 255.
    """
    opaque = frames[..., 3] >= 128
    rgb = frames[opaque][:, :3].astype(np.uint32)
    packed = (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]
    colors, inverse = np.unique(packed, return_inverse=True)
    colors = np.stack([colors >> 16, (colors >> 8) & 255, colors & 255], axis=1).astype(np.uint8)
    palette = np.zeros((256, 3), np.uint8)
    if len(colors) <= _GIF_COLORS:
        palette[: len(colors)] = colors
        lookup = np.arange(len(colors), dtype=np.uint8)
    else:
        sample = rgb[:: math.ceil(len(rgb) / max_samples)].astype(np.uint8)
        mosaic = Image.fromarray(np.ascontiguousarray(sample[None]), "RGB")
        chosen = mosaic.quantize(colors=_GIF_COLORS, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        entries = np.array(chosen.getpalette()[: 3 * _GIF_COLORS], np.uint8).reshape(-1, 3)
        palette[: len(entries)] = entries
        lookup = _nearest_entries(colors, entries)
    indexed = np.full(frames.shape[:3], _GIF_TRANSPARENT, np.uint8)
    indexed[opaque] = lookup[inverse]
    return palette, indexed


def _nearest_entries(colors: np.ndarray, entries: np.ndarray, chunk: int = 1 << 15) -> np.ndarray:
    """Index of the nearest palette entry (squared RGB distance) for each colour."""
    entries = entries.astype(np.int32)
    nearest = np.empty(len(colors), np.uint8)
    for start in range(0, len(colors), chunk):
        block = colors[start : start + chunk].astype(np.int32)
        distance = ((block[:, None, :] - entries[None, :, :]) ** 2).sum(axis=2)
        nearest[start : start + chunk] = distance.argmin(axis=1)
    return nearest


def _lzw_encode(indices: np.ndarray) -> bytes:
    """GIF LZW data (code size byte + sub-blocks + terminator) for an index array.

    Pillow encodes a one-frame palette-less GIF (its raw indices kept: no palette
    optimisation); the data block is taken out of it with our own parser.
    """
    buffer = io.BytesIO()
    Image.fromarray(indices, "L").save(buffer, "GIF", optimize=False, interlace=False)
    limits = _Limits(max_frames=1, max_pixels=indices.size, max_total_pixels=indices.size)
    (frame,) = _parse_gif(Path("<Pillow GIF encoder>"), buffer.getvalue(), limits)[3]
    return frame.lzw


def _visible_box(visible: np.ndarray) -> tuple[slice, slice]:
    """Rows and columns spanning the True pixels; the top-left pixel when there are none."""
    rows, cols = np.flatnonzero(visible.any(axis=1)), np.flatnonzero(visible.any(axis=0))
    if not len(rows):
        return slice(0, 1), slice(0, 1)
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _write_gif(clip: Clip, path: Path) -> None:
    delays_cs = np.maximum((clip.durations_ms + 5) // 10, MIN_WRITE_DURATION_MS // 10)  # 10 ms steps, half up
    if delays_cs.max() > 0xFFFF:
        raise ValueError(f"{path.name}: a GIF frame can last at most 655.35 s, got {delays_cs.max() / 100} s")
    palette, indexed = _gif_quantize(clip.frames)
    parts = [
        b"GIF89a",
        struct.pack("<HHBBB", clip.width, clip.height, 0xF7, _GIF_TRANSPARENT, 0),
        palette.tobytes(),
        b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00",  # loop forever
    ]
    for indices, delay in zip(indexed, delays_cs):
        # Each frame is cropped to its visible pixels: with disposal 2 everything else stays clear.
        rows, cols = _visible_box(indices != _GIF_TRANSPARENT)
        crop = np.ascontiguousarray(indices[rows, cols])
        parts.append(struct.pack("<BBBBHBB", 0x21, 0xF9, 4, (2 << 2) | 1, int(delay), _GIF_TRANSPARENT, 0))
        parts.append(struct.pack("<BHHHHB", 0x2C, cols.start, rows.start, crop.shape[1], crop.shape[0], 0))
        parts.append(_lzw_encode(crop))
    parts.append(b";")
    path.write_bytes(b"".join(parts))


# APNG writing: frames PNG-encoded by Pillow, IDAT data spliced into fdAT chunks


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_chunks(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    pos = 8
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        yield data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length


def _write_apng(clip: Clip, path: Path) -> None:
    durations = _write_durations(clip)
    if durations.max() > 0xFFFF:
        raise ValueError(f"{path.name}: an APNG frame can last at most 65.535 s, got {durations.max() / 1000} s")
    parts = [b"\x89PNG\r\n\x1a\n"]
    sequence = 0
    for number, (frame, duration) in enumerate(zip(clip.frames, durations)):
        buffer = io.BytesIO()
        Image.fromarray(frame, "RGBA").save(buffer, "PNG")
        chunks = list(_png_chunks(buffer.getvalue()))
        if number == 0:
            parts.append(_png_chunk(b"IHDR", dict(chunks)[b"IHDR"]))
            parts.append(_png_chunk(b"acTL", struct.pack(">II", clip.num_frames, 0)))
        control = struct.pack(">IIIIIHHBB", sequence, clip.width, clip.height, 0, 0, int(duration), 1000, 0, 0)
        parts.append(_png_chunk(b"fcTL", control))
        sequence += 1
        for kind, body in chunks:
            if kind != b"IDAT":
                continue
            if number == 0:
                parts.append(_png_chunk(b"IDAT", body))
            else:
                parts.append(_png_chunk(b"fdAT", struct.pack(">I", sequence) + body))
                sequence += 1
    parts.append(_png_chunk(b"IEND", b""))
    path.write_bytes(b"".join(parts))


def _write_webp(clip: Clip, path: Path, *, lossless: bool = False, quality: int = 90, method: int = 4) -> None:
    if not 0 <= quality <= 100:
        raise ValueError(f"quality={quality}: must be in [0, 100]")
    if not 0 <= method <= 6:
        raise ValueError(f"method={method}: must be in [0, 6]")
    images = [Image.fromarray(frame, "RGBA") for frame in clip.frames]
    images[0].save(
        path,
        "WEBP",
        save_all=True,
        append_images=images[1:],
        duration=[int(d) for d in _write_durations(clip)],
        loop=0,
        lossless=lossless,
        quality=quality,
        method=method,
        alpha_quality=100,
        background=(0, 0, 0, 0),
    )


# Video writing: raw RGBA frames piped into ffmpeg


#: Highest rate a video is given to show a clip's durations exactly (by repeating frames).
MAX_EXACT_FPS = 60


def video_rate(clip: Clip, fps: float | None = None) -> tuple[Clip, Fraction]:
    """The clip at the constant rate a video gets, and that rate.

    With ``fps`` the clip is resampled by time to it. Otherwise the rate is 1000 / gcd of
    the durations when that is at most :data:`MAX_EXACT_FPS` (frames repeated: every
    duration shown exactly), else 30 fps.
    """
    if fps is not None:
        rate = Fraction(fps).limit_denominator(1001)
        return resample_clip(clip, fps=float(rate)), rate
    step = reduce(math.gcd, (int(d) for d in clip.durations_ms))
    if 1000 / step <= MAX_EXACT_FPS:
        repeats = clip.durations_ms // step
        return Clip(np.repeat(clip.frames, repeats, axis=0), np.full(int(repeats.sum()), step)), Fraction(1000, step)
    return resample_clip(clip, fps=30.0), Fraction(30)


def _pipe_to_ffmpeg(path: Path, frames: np.ndarray, rate: Fraction, output_args: list[str]) -> None:
    height, width = frames.shape[1:3]
    pix_fmt = {3: "rgb24", 4: "rgba"}[frames.shape[3]]
    command = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", pix_fmt]
    command += ["-s", f"{width}x{height}", "-r", f"{rate.numerator}/{rate.denominator}", "-i", "pipe:0", "-an"]
    command += [*output_args, str(path)]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stderr=log)
        assert process.stdin is not None
        try:
            for frame in frames:
                process.stdin.write(np.ascontiguousarray(frame).tobytes())
            process.stdin.close()
        except BrokenPipeError:
            pass  # ffmpeg exited early; its log says why
        finally:
            process.wait()
        if process.returncode != 0:
            log.seek(0)
            raise StickerFileError(path, f"ffmpeg failed: {log.read().decode(errors='replace').strip()}")


def _pad_to_even(frames: np.ndarray, fill: Sequence[int]) -> np.ndarray:
    height, width = frames.shape[1:3]
    if height % 2 == 0 and width % 2 == 0:
        return frames
    padded = np.empty((len(frames), height + height % 2, width + width % 2, frames.shape[3]), np.uint8)
    padded[...] = np.asarray(fill, np.uint8)
    padded[:, :height, :width] = frames
    return padded


def _write_mp4(
    clip: Clip,
    path: Path,
    *,
    crf: int = 18,
    fps: float | None = None,
    background: tuple[int, int, int] = (255, 255, 255),
) -> None:
    if not 0 <= crf <= 51:
        raise ValueError(f"crf={crf}: H.264 takes 0-51")
    clip, rate = video_rate(clip, fps)
    frames = _pad_to_even(composite_over(clip.frames, background), background)
    args = ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", str(crf), "-movflags", "+faststart", "-f", "mp4"]
    _pipe_to_ffmpeg(path, frames, rate, args)


def _write_webm(clip: Clip, path: Path, *, crf: int = 30, fps: float | None = None, speed: int = 4) -> None:
    if not 0 <= crf <= 63:
        raise ValueError(f"crf={crf}: VP9 takes 0-63")
    clip, rate = video_rate(clip, fps)
    frames = _pad_to_even(clip.frames, (0, 0, 0, 0))
    args = ["-c:v", "libvpx-vp9", "-pix_fmt", "yuva420p", "-crf", str(crf), "-b:v", "0"]
    args += ["-deadline", "good", "-cpu-used", str(speed), "-row-mt", "1", "-auto-alt-ref", "0", "-f", "webm"]
    _pipe_to_ffmpeg(path, frames, rate, args)


_WRITERS: dict[str, Callable[..., None]] = {
    "gif": _write_gif,
    "png": _write_apng,
    "webp": _write_webp,
    "mp4": _write_mp4,
    "webm": _write_webm,
}


# ----------------------------------------------------------------------------- frames


def resample_clip(clip: Clip, *, num_frames: int | None = None, fps: float | None = None) -> Clip:
    """Resample by time to ``num_frames`` frames or to ``fps``; total duration is kept.

    Output frame k shows whatever the input shows at time ``k * T / N`` (T = total ms), so
    the first frame is always kept and a frame displayed three times as long is picked
    three times as often. Output durations are ``T / N`` rounded so that they sum to T.
    """
    if (num_frames is None) == (fps is None):
        raise ValueError("resample_clip: give exactly one of num_frames or fps")
    total = clip.total_ms
    if fps is not None:
        if not fps > 0:
            raise ValueError(f"fps={fps}: must be > 0")
        num_frames = max(1, round(total * fps / 1000))
    assert num_frames is not None
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames}: must be >= 1")
    if num_frames > total:
        raise ValueError(f"num_frames={num_frames}: more frames than the clip's {total} ms (< 1 ms per frame)")
    ends = np.cumsum(clip.durations_ms)  # frame i is shown during [ends[i-1], ends[i])
    picks = np.searchsorted(ends * num_frames, np.arange(num_frames, dtype=np.int64) * total, side="right")
    return Clip(clip.frames[picks], _split_evenly(total, num_frames))


def _split_evenly(total_ms: int, count: int) -> np.ndarray:
    """``count`` integer durations, each ``total_ms / count`` rounded, summing to ``total_ms``."""
    bounds = np.round(np.arange(count + 1) * (total_ms / count)).astype(np.int64)
    return np.diff(bounds)


def composite_over(frames: np.ndarray, background: Sequence[int] = (255, 255, 255)) -> np.ndarray:
    """Flatten RGBA ``(..., 4)`` uint8 onto an opaque colour: ``(..., 3)`` uint8, rounded."""
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.shape[-1:] != (4,):
        raise ValueError(f"frames: expected uint8 (..., 4) RGBA, got {_describe(frames)}")
    if len(background) != 3 or not all(0 <= int(c) <= 255 for c in background):
        raise ValueError(f"background={background!r}: expected an (r, g, b) tuple of 0-255")
    alpha = frames[..., 3:].astype(np.uint32)
    mixed = frames[..., :3] * alpha + np.asarray(background, np.uint32) * (255 - alpha)
    return ((mixed + 127) // 255).astype(np.uint8)


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"array {value.dtype} {value.shape}"
    return type(value).__name__
