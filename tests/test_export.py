"""rdtf.export: produced sticker files checked against every platform limit by reading them back."""

from __future__ import annotations

import re
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from rdtf.export import PRESETS, ExportError, export_sticker
from rdtf.io import Clip, probe_video, read_clip


def noisy_clip(seconds: float, fps: float, width: int, height: int, seed: int = 0) -> Clip:
    """A moving disc of fresh noise on a transparent background: hard to compress, like no real sticker."""
    rng = np.random.default_rng(seed)
    count = round(seconds * fps)
    yy, xx = np.mgrid[0:height, 0:width]
    frames = np.zeros((count, height, width, 4), np.uint8)
    for i in range(count):
        cx = width / 2 + width / 4 * np.sin(i / 7)
        disc = (xx - cx) ** 2 + (yy - height / 2) ** 2 < (0.3 * min(width, height)) ** 2
        frames[i, ..., :3] = rng.integers(0, 256, (height, width, 3))
        frames[i, ..., 3] = disc * 255
    return Clip.from_fps(frames, fps)


#: The changes the size search may make, in plain words.
SIZE_STEP = (
    r"fps [\d.]+ -> [\d.]+ \(to fit {limit} KB\)"
    r"|trimmed [\d.]+ s -> [\d.]+ s \(to fit {limit} KB\)"
    r"|{top} -> \d+"
)


def webp_flags(path: Path) -> tuple[bool, bool]:
    """(animated, has alpha) from the extended WebP header."""
    data = path.read_bytes()[:21]
    assert data[:4] == b"RIFF" and data[8:16] == b"WEBPVP8X"
    return bool(data[20] & 0x02), bool(data[20] & 0x10)


@pytest.mark.slow
def test_whatsapp_export_meets_every_limit(tmp_path: Path) -> None:
    clip = noisy_clip(seconds=10.6, fps=50, width=96, height=72)
    report = export_sticker(clip, tmp_path / "s.webp", "whatsapp")

    back = read_clip(report.path)
    animated, alpha = webp_flags(report.path)
    assert report.path.stat().st_size == report.size_bytes <= 500 * 1024
    assert (back.width, back.height) == (report.width, report.height) == (512, 512)
    assert back.total_ms <= 10_000 and back.total_ms == round(report.duration_s * 1000)
    assert animated and alpha
    assert (back.frames[:, 0, 0, 3] == 0).all() and (back.frames[..., 3] == 255).any()  # padded clear, subject opaque
    assert report.changes[:3] == [
        "resized 96x72 -> 512x384",
        "padded 512x384 -> 512x512 with transparent borders",
        "trimmed 10.6 s -> 10.0 s",
    ]
    size_steps = report.changes[3:]  # raw, the clip is far over 500 KB
    assert size_steps and all(re.fullmatch(SIZE_STEP.format(limit=500, top="quality 90"), c) for c in size_steps)
    assert [p.name for p in tmp_path.iterdir()] == ["s.webp"]  # candidates cleaned up


@pytest.mark.slow
def test_telegram_export_meets_every_limit(tmp_path: Path) -> None:
    clip = noisy_clip(seconds=4.2, fps=60, width=72, height=96)
    report = export_sticker(clip, tmp_path / "s.webm", "telegram")

    info = probe_video(report.path)
    back = read_clip(report.path)
    assert report.path.stat().st_size == report.size_bytes <= 256 * 1024
    assert (info.codec, info.container) == ("vp9", "matroska,webm")
    assert info.has_alpha and not info.has_audio
    assert (back.frames[..., 3] == 0).any() and (back.frames[..., 3] == 255).any()  # alpha survived
    assert (info.width, info.height) == (back.width, back.height) == (report.width, report.height) == (384, 512)
    assert info.fps is not None and info.fps <= 30 and info.fps == pytest.approx(report.fps)
    assert info.duration_s is not None and info.duration_s <= 3.0
    assert back.total_ms <= 3000 and back.num_frames == report.num_frames
    assert report.changes[:3] == ["resized 72x96 -> 384x512", "trimmed 4.2 s -> 3.0 s", "fps 60 -> 30 (limit 30 fps)"]
    size_steps = report.changes[3:]
    assert size_steps and all(re.fullmatch(SIZE_STEP.format(limit=256, top="quality crf 24"), c) for c in size_steps)


def test_easy_clip_needs_no_changes_and_keeps_its_timing(tmp_path: Path) -> None:
    frames = np.zeros((4, 512, 256, 4), np.uint8)
    for i in range(4):
        frames[i, 100 + 50 * i : 200 + 50 * i, 50:200] = (255, 200, 0, 255)  # a sliding flat block
    clip = Clip(frames, [100, 300, 100, 100])

    telegram = export_sticker(clip, tmp_path / "t.webm", "telegram")
    info = probe_video(telegram.path)

    assert telegram.changes == []
    assert (info.fps, telegram.num_frames, telegram.duration_s) == (10.0, 6, 0.6)  # 300 ms = 3 frames at 10 fps
    assert read_clip(telegram.path).num_frames == 6

    whatsapp = export_sticker(clip, tmp_path / "w.webp", "whatsapp")
    assert whatsapp.changes == ["padded 256x512 -> 512x512 with transparent borders"]
    assert read_clip(whatsapp.path).durations_ms.tolist() == [100, 300, 100, 100]  # WebP keeps variable timing
    assert whatsapp.summary().splitlines() == [
        f"{tmp_path / 'w.webp'}: whatsapp sticker, 512x512, 4 frames at 6.67 fps, 0.60 s, "
        f"{whatsapp.size_bytes / 1024:.1f} KB",
        "  - padded 256x512 -> 512x512 with transparent borders",
    ]
    assert telegram.summary().endswith("(no changes needed)")


def test_short_frames_are_paced_for_webp(tmp_path: Path) -> None:
    frames = np.zeros((20, 512, 512, 4), np.uint8)
    frames[:, :, :, 3] = 255
    frames[np.arange(20), np.arange(20) * 20] = (255, 0, 0, 255)
    report = export_sticker(Clip(frames, [10] * 20), tmp_path / "fast.webp", "whatsapp")
    back = read_clip(report.path)
    assert report.changes == ["fps 100 -> 50 (limit 50 fps)"]
    assert back.total_ms == 200 and (back.durations_ms >= 20).all()


def test_impossible_limits_raise_and_write_nothing(tmp_path: Path) -> None:
    tiny = replace(PRESETS["telegram"], name="tiny", side=64, max_bytes=1024)
    clip = noisy_clip(seconds=2.0, fps=30, width=64, height=64, seed=1)
    with pytest.raises(ExportError, match=r"cannot fit the tiny limit of 1 KB: the smallest file is [\d.]+ KB"):
        export_sticker(clip, tmp_path / "no.webm", tiny)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(tmp_path: Path) -> None:
    clip = Clip(np.zeros((1, 8, 8, 4), np.uint8), [100])
    with pytest.raises(ValueError, match="preset='signal'"):
        export_sticker(clip, tmp_path / "a.webp", "signal")
    with pytest.raises(ValueError, match="telegram stickers are .webm files"):
        export_sticker(clip, tmp_path / "a.gif", "telegram")


def test_lower_rates_and_lengths_are_tried_in_order(tmp_path: Path) -> None:
    """Quality first, then frame rate, then length; each step is recorded."""
    small = replace(PRESETS["whatsapp"], name="small", side=96, max_bytes=40 * 1024, min_fps=10)
    report = export_sticker(noisy_clip(4.0, 25, 96, 96, seed=2), tmp_path / "s.webp", small)
    steps = [c.split(" ")[0] for c in report.changes]
    assert report.size_bytes <= 40 * 1024
    assert steps[0] == "fps" and "(to fit 40 KB)" in report.changes[0]
    assert "trimmed" in steps and steps.index("trimmed") > steps.index("fps")
    assert read_clip(report.path).total_ms == round(report.duration_s * 1000) < 4000
    assert struct.unpack("<I", report.path.read_bytes()[4:8])[0] + 8 == report.size_bytes
