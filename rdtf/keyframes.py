"""From one sticker file to its F normalised keyframes, stored as one strip PNG.

Long stickers are cut down to F frames by a selection method (or by frame indices the
captions file gives); short ones keep every frame and are padded to F by repeating their
last frame, with a loss mask (1 = real frame, 0 = padding) so training ignores the padding
while the model still sees plausible pixels there. Frames are resized with their aspect
ratio kept, centred on a square canvas and composited on a background colour (or kept
RGBA, on a transparent canvas, when the background is None). The F frames are stored
losslessly as one horizontal strip PNG, ``F * size`` wide and ``size`` tall: fast to
decode, viewable in any image viewer, small.

Preparation worker processes import this module, so it stays free of torch.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from rdtf.io import Clip, StickerFileError, composite_over, read_clip, write_atomic

SELECTION_METHODS: tuple[str, ...] = ("uniform", "max_change", "cluster")
#: Frames are compared as FEATURE_SIDE x FEATURE_SIDE premultiplied RGBA thumbnails.
FEATURE_SIDE = 16
KMEANS_MAX_ITERATIONS = 100

Background = tuple[int, int, int] | None


class KeyframeError(ValueError):
    """Explicit keyframe indices that do not fit the clip they were given for."""


def select_keyframes(clip: Clip, num_frames: int, method: str = "uniform", seed: int = 0) -> list[int]:
    """Source indices of at most ``num_frames`` keyframes of ``clip``, in time order.

    A clip with at most ``num_frames`` frames keeps all of them (padding comes later).
    ``"uniform"``: the frames on screen at ``num_frames`` equally spaced instants, so a
    frame held for half the clip is picked for about half the keyframes (indices can
    repeat when durations are uneven). ``"max_change"``: frame 0 plus the frames right
    after the largest changes. ``"cluster"``: k-means (k = ``num_frames``, seeded) over
    downsampled frames; the first frame of each cluster. Both of the last two give
    distinct indices.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames}: must be >= 1")
    if method not in SELECTION_METHODS:
        raise ValueError(f"selection method {method!r}: expected one of {', '.join(SELECTION_METHODS)}")
    if clip.num_frames <= num_frames:
        return list(range(clip.num_frames))
    if method == "uniform":
        return _uniform_in_time(np.asarray(clip.durations_ms, dtype=np.int64), num_frames)
    features = frame_features(clip.frames)
    if method == "max_change":
        return _after_largest_changes(features, num_frames)
    return _first_of_each_cluster(features, num_frames, seed)


def _uniform_in_time(durations_ms: np.ndarray, num_frames: int) -> list[int]:
    """The frame on screen at each instant ``k * T / num_frames`` (the rule of rdtf.io.resample_clip)."""
    ends = np.cumsum(durations_ms)
    instants = np.arange(num_frames, dtype=np.int64) * int(ends[-1])
    return [int(i) for i in np.searchsorted(ends * num_frames, instants, side="right")]


def _after_largest_changes(features: np.ndarray, num_frames: int) -> list[int]:
    """Frame 0 plus the ``num_frames - 1`` frames that differ most from their predecessor."""
    change = np.abs(np.diff(features, axis=0)).mean(axis=1)
    order = np.lexsort((np.arange(len(change)), -change))  # largest first, earlier frame on ties
    return sorted([0, *(int(i) + 1 for i in order[: num_frames - 1])])


def _first_of_each_cluster(features: np.ndarray, num_frames: int, seed: int) -> list[int]:
    labels = kmeans(features.astype(np.float64), num_frames, seed)
    return sorted(int(np.flatnonzero(labels == cluster)[0]) for cluster in range(num_frames))


def kmeans(points: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Cluster labels of ``points`` (N, D), k-means++ seeded by ``seed``; every cluster non-empty.

    A cluster that empties takes the point farthest from its centre out of a cluster
    with two or more points, so ``k <= N`` always gives ``k`` clusters, even when frames
    repeat.
    """
    count = len(points)
    if not 1 <= k <= count:
        raise ValueError(f"k={k}: must be in [1, {count}] for {count} points")
    rng = np.random.default_rng(seed)
    centres = points[[int(rng.integers(count))]]
    while len(centres) < k:  # k-means++: next centre drawn in proportion to squared distance
        nearest = _squared_distances(points, centres).min(axis=1)
        weights = nearest / nearest.sum() if nearest.sum() > 0 else np.full(count, 1.0 / count)
        centres = np.concatenate([centres, points[[int(rng.choice(count, p=weights))]]])
    labels = np.full(count, -1)
    for _ in range(KMEANS_MAX_ITERATIONS):
        distances = _squared_distances(points, centres)
        new_labels = distances.argmin(axis=1)
        for cluster in range(k):
            if not np.any(new_labels == cluster):
                sizes = np.bincount(new_labels, minlength=k)
                own = distances[np.arange(count), new_labels]
                own[sizes[new_labels] < 2] = -1.0
                new_labels[int(own.argmax())] = cluster
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
        centres = np.stack([points[labels == cluster].mean(axis=0) for cluster in range(k)])
    return labels


def _squared_distances(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """(N, K) squared distances, one centre at a time to keep memory at N x D."""
    return np.stack([((points - centre) ** 2).sum(axis=1) for centre in centres], axis=1)


def keyframe_durations(durations_ms: np.ndarray, indices: list[int]) -> list[int]:
    """How long each keyframe stays on screen so the keyframes replay the clip's timing.

    Each keyframe lasts until the next distinct keyframe starts, the last one until the
    clip ends; a keyframe repeated m times splits its span into m near-equal parts.
    """
    durations = np.asarray(durations_ms, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(durations)[:-1]])
    total = int(durations.sum())
    runs: list[tuple[int, int]] = []  # (source index, repeat count)
    for index in indices:
        if runs and runs[-1][0] == index:
            runs[-1] = (index, runs[-1][1] + 1)
        else:
            runs.append((index, 1))
    result: list[int] = []
    for position, (index, count) in enumerate(runs):
        end = int(starts[runs[position + 1][0]]) if position + 1 < len(runs) else total
        span = end - int(starts[index])
        result.extend(span // count + (1 if part < span % count else 0) for part in range(count))
    return result


def frame_features(frames: np.ndarray) -> np.ndarray:
    """``(N, FEATURE_SIDE**2 * 4)`` float32 premultiplied-RGBA thumbnails in [0, 1].

    Premultiplying makes invisible pixels (alpha 0) count the same whatever colour they hold.
    """
    side = (FEATURE_SIDE, FEATURE_SIDE)
    thumbs = []
    for frame in frames:  # one frame at a time: a float copy of a whole long clip can be large
        rgba = frame.astype(np.float32) / 255.0
        rgba[..., :3] *= rgba[..., 3:4]
        thumbs.append(cv2.resize(rgba, side, interpolation=cv2.INTER_AREA))
    return np.stack(thumbs).reshape(len(frames), -1)


def check_explicit_keyframes(indices: tuple[int, ...], clip_frames: int, num_frames: int) -> list[int]:
    """Keyframes from the captions file, checked against the clip they index."""
    if len(indices) > num_frames:
        raise KeyframeError(f"keyframes lists {len(indices)} frames, more than num_frames={num_frames}")
    outside = [index for index in indices if not 0 <= index < clip_frames]
    if outside:
        raise KeyframeError(f"keyframes {outside} are outside the clip's {clip_frames} frames")
    return list(indices)


def fit_frames(frames: np.ndarray, size: int, background: Background) -> np.ndarray:
    """Resize ``(N, H, W, 4)`` RGBA frames into ``size`` x ``size`` squares, aspect ratio kept.

    Frames are centred on a transparent canvas; with a background colour the canvas is
    then composited on it and comes back RGB ``(N, size, size, 3)``, margins in that
    colour; with ``None`` it stays RGBA. Pillow resizes RGBA in premultiplied alpha (no
    dark fringes), which also makes resizing before compositing equal to the reverse,
    on fewer pixels.
    """
    height, width = frames.shape[1:3]
    scale = size / max(height, width)
    new_width, new_height = max(1, round(width * scale)), max(1, round(height * scale))
    left, top = (size - new_width) // 2, (size - new_height) // 2
    canvas = np.zeros((len(frames), size, size, 4), dtype=np.uint8)
    for frame, target in zip(frames, canvas, strict=True):
        if (new_width, new_height) != (width, height):
            frame = np.asarray(Image.fromarray(frame).resize((new_width, new_height), Image.Resampling.LANCZOS))
        target[top : top + new_height, left : left + new_width] = frame
    return canvas if background is None else composite_over(canvas, background)


def pad_frames(frames: np.ndarray, num_frames: int) -> tuple[np.ndarray, list[int]]:
    """Pad to ``num_frames`` by repeating the last frame; the loss mask marks real frames with 1."""
    real = len(frames)
    if real > num_frames:
        raise ValueError(f"{real} frames do not fit in num_frames={num_frames}")
    padded = np.concatenate([frames, np.repeat(frames[-1:], num_frames - real, axis=0)])
    return padded, [1] * real + [0] * (num_frames - real)


def encode_strip(frames: np.ndarray) -> bytes:
    """``(F, S, S, C)`` uint8 frames -> PNG bytes of one ``S`` x ``F * S`` strip (frame f at x = f * S)."""
    count, height, width, channels = frames.shape
    strip = frames.transpose(1, 0, 2, 3).reshape(height, count * width, channels)
    buffer = io.BytesIO()
    Image.fromarray(strip).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_strip(data: bytes | Path) -> np.ndarray:
    """Inverse of :func:`encode_strip`: PNG bytes or a path -> ``(F, S, S, C)`` uint8 frames."""
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    with Image.open(source) as image:
        strip = np.asarray(image)
    height, total_width = strip.shape[:2]
    if total_width % height:
        name = data if isinstance(data, Path) else "strip PNG"
        raise ValueError(f"{name}: width {total_width} is not a multiple of its height {height}")
    count = total_width // height
    return strip.reshape(height, count, height, -1).transpose(1, 0, 2, 3)


@dataclass(frozen=True)
class StickerJob:
    """Everything a worker process needs to normalise one sticker file."""

    source: Path
    frames_path: Path
    num_frames: int
    size: int
    background: Background
    selection: str
    seed: int = 0
    keyframes: tuple[int, ...] | None = None  # explicit indices from the captions file


@dataclass(frozen=True)
class StickerOutcome:
    """Manifest fields derived from the file, or why the file was skipped."""

    fields: dict[str, Any] | None
    skip_reason: str | None = None


def prepare_sticker(job: StickerJob) -> StickerOutcome:
    """Read, select, normalise and store one sticker; bad files come back as a skip reason.

    Runs in worker processes: failures are returned, not raised, so one bad file never
    stops the others (and no custom exception has to cross a process boundary).
    """
    try:
        clip = read_clip(job.source)
        if job.keyframes is not None:
            indices = check_explicit_keyframes(job.keyframes, clip.num_frames, job.num_frames)
        else:
            indices = select_keyframes(clip, job.num_frames, job.selection, job.seed)
    except StickerFileError as error:
        return StickerOutcome(None, error.reason)
    except KeyframeError as error:
        return StickerOutcome(None, str(error))
    durations = keyframe_durations(clip.durations_ms, indices)
    frames, loss_mask = pad_frames(fit_frames(clip.frames[indices], job.size, job.background), job.num_frames)
    write_atomic(job.frames_path, encode_strip(frames))
    fields = {
        "num_frames": job.num_frames,
        "num_real": len(indices),
        "loss_mask": loss_mask,
        "fps": round(len(indices) * 1000.0 / sum(durations), 4),
        "durations_ms": durations,
        "keyframes": indices,
        "keyframe_selection": "explicit" if job.keyframes is not None else job.selection,
        "source_frames": clip.num_frames,
        "source_sha256": file_sha256(job.source),
    }
    return StickerOutcome(fields)


def file_sha256(path: Path) -> str:
    """Content fingerprint of a source file; resumed runs reuse outputs only when it still matches."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
