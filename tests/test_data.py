"""Dataset preparation and loading, on real sticker files the tests write."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from rdtf.data import (
    JOURNAL_FILE,
    MANIFEST_FILE,
    CaptionsError,
    ShardedStickerDataset,
    StickerDataset,
    prepare_dataset,
    read_captions,
    sticker_keys,
)
from rdtf.io import Clip, read_clip, resample_clip, write_clip
from rdtf.keyframes import decode_strip, encode_strip, fit_frames, keyframe_durations, select_keyframes

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- builders


def moving_square(count: int, height: int = 40, width: int = 32, *, transparent: bool = False) -> np.ndarray:
    """``count`` RGBA frames of a square moving right: every frame differs from the last."""
    frames = np.zeros((count, height, width, 4), np.uint8)
    if not transparent:
        frames[...] = (250, 250, 250, 255)
    for index in range(count):
        left = index % (width - 8)
        frames[index, 8:20, left : left + 8] = (200, (40 * index) % 256, 30, 255)
    return frames


def scenes(colours: list[tuple[int, int, int]], per_scene: int) -> Clip:
    """Runs of identical frames, one run per colour (a sticker with distinct poses)."""
    frames = np.concatenate([np.full((per_scene, 16, 16, 4), (*colour, 255), np.uint8) for colour in colours])
    return Clip(frames, np.full(len(frames), 100))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def build_source(root: Path) -> Path:
    """A small, varied sticker folder: five formats, a short clip, uneven timing, sub-folders."""
    write_clip(Clip.from_fps(moving_square(12), 10), root / "stickers" / "wave.gif")
    write_clip(Clip.from_fps(moving_square(3, 24, 40), 8), root / "stickers" / "short.png")
    write_clip(Clip.from_fps(moving_square(10, transparent=True), 12), root / "stickers" / "spin.webp")
    write_clip(Clip.from_fps(moving_square(9, 32, 32), 10), root / "clips" / "jump.mp4")
    held = moving_square(6)
    write_clip(Clip(held, np.array([500, 100, 100, 100, 100, 100])), root / "stickers" / "held.gif")
    write_jsonl(
        root / "captions.jsonl",
        [
            {
                "file": "stickers/wave.gif",
                "caption_en": "waving",
                "caption_zh": "挥手",
                "split": "train",
                "emoji": "👋",
            },
            {"file": "stickers/short.png", "caption_en": "blink", "caption_zh": "眨眼", "split": "train"},
            {"file": "stickers/spin.webp", "caption_en": "spin", "caption_zh": "旋转", "split": "val"},
            {"file": "clips/jump.mp4", "caption_en": "jump", "caption_zh": "跳", "split": "train"},
            {
                "file": "stickers/held.gif",
                "caption_en": "pause",
                "caption_zh": "停顿",
                "split": "train",
                "keyframes": [0, 2, 5],
            },
        ],
    )
    return root


def build_many(root: Path, count: int) -> Path:
    """``count`` GIF stickers of 6-21 frames, listed in captions.jsonl."""
    records = []
    for index in range(count):
        write_clip(Clip.from_fps(moving_square(6 + index % 16, 32 + index % 5 * 8, 40), 10), root / f"s{index:03d}.gif")
        records.append({"file": f"s{index:03d}.gif", "caption_en": f"sticker {index}", "caption_zh": f"贴纸{index}"})
    write_jsonl(root / "captions.jsonl", records)
    return root


def tree_digest(root: Path) -> str:
    """Hash of every path and file content under ``root`` (symlinks by target)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_symlink():
            digest.update(os.readlink(path).encode())
        elif path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / MANIFEST_FILE).read_text(encoding="utf-8").splitlines()]


def output_files(out: Path) -> dict[str, bytes]:
    """Every output file except the report (which records timings)."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and not p.name.startswith("report.")
    }


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def prepare(source: Path, out: Path, **options):
    return prepare_dataset(source, out, size=32, num_frames=8, progress=False, **options)


# ----------------------------------------------------------------------------- keyframes


def test_uniform_selection_follows_display_time():
    clip = Clip(moving_square(6), np.array([500, 100, 100, 100, 100, 100]))
    indices = select_keyframes(clip, 4, "uniform")
    # instants 0, 250, 500, 750 ms: frame 0 is on screen for the first half
    assert indices == [0, 0, 1, 3]
    assert keyframe_durations(clip.durations_ms, indices) == [250, 250, 200, 300]
    even = Clip(moving_square(16), np.full(16, 100))
    assert select_keyframes(even, 8) == [0, 2, 4, 6, 8, 10, 12, 14]


def test_uniform_selection_agrees_with_time_resampling():
    clip = Clip(moving_square(11), np.array([40, 300, 60, 100, 100, 20, 220, 100, 80, 100, 50]))
    indices = select_keyframes(clip, 5, "uniform")
    assert np.array_equal(clip.frames[indices], resample_clip(clip, num_frames=5).frames)


def test_max_change_picks_the_frames_after_the_biggest_changes():
    clip = scenes([(255, 0, 0), (0, 255, 0), (0, 0, 255)], per_scene=4)
    clip.frames[6, :4, :4] = (10, 10, 10, 255)  # a small change inside the green scene
    assert select_keyframes(clip, 3, "max_change") == [0, 4, 8]
    assert select_keyframes(clip, 5, "max_change") == [0, 4, 6, 7, 8]


def test_cluster_picks_the_first_frame_of_each_scene_deterministically():
    clip = scenes([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)], per_scene=5)
    assert select_keyframes(clip, 4, "cluster", seed=3) == [0, 5, 10, 15]
    varied = Clip(moving_square(30), np.full(30, 100))
    picks = [select_keyframes(varied, 8, "cluster", seed=1) for _ in range(2)]
    assert picks[0] == picks[1] and len(set(picks[0])) == 8 and picks[0] == sorted(picks[0]) and picks[0][0] == 0
    static = scenes([(9, 9, 9)], per_scene=10)  # all frames equal: still 8 distinct frames
    assert len(set(select_keyframes(static, 8, "cluster"))) == 8


def test_short_clips_keep_every_frame_and_bad_arguments_are_refused():
    clip = Clip(moving_square(3), np.full(3, 100))
    for method in ("uniform", "max_change", "cluster"):
        assert select_keyframes(clip, 8, method) == [0, 1, 2]
    with pytest.raises(ValueError, match="selection method 'best'"):
        select_keyframes(clip, 2, "best")
    with pytest.raises(ValueError, match="num_frames=0"):
        select_keyframes(clip, 0)


def test_durations_cover_the_clip_from_the_first_keyframe():
    durations = np.array([100, 200, 100, 100, 300])
    assert keyframe_durations(durations, [0, 2, 4]) == [300, 200, 300]
    assert keyframe_durations(durations, [1, 3]) == [300, 400]
    assert keyframe_durations(durations, [0, 0, 0, 4]) == [167, 167, 166, 300]


def test_fit_frames_keeps_aspect_ratio_on_the_background():
    wide = np.zeros((1, 20, 40, 4), np.uint8)
    wide[...] = (255, 0, 0, 255)
    fitted = fit_frames(wide, 16, (0, 0, 255))
    assert fitted.shape == (1, 16, 16, 3)
    assert (fitted[0, :4] == (0, 0, 255)).all() and (fitted[0, 12:] == (0, 0, 255)).all()
    assert (fitted[0, 4:12] == (255, 0, 0)).all()
    half = np.zeros((1, 8, 8, 4), np.uint8)
    half[...] = (255, 255, 255, 128)
    assert (fit_frames(half, 8, (0, 0, 0))[0] == 128).all()  # composited, no resize needed
    kept = fit_frames(wide, 16, None)
    assert kept.shape == (1, 16, 16, 4) and (kept[0, :4, :, 3] == 0).all() and (kept[0, 5:11, :, 3] == 255).all()


def test_fit_frames_leaves_no_dark_fringe_when_shrinking_transparent_art():
    frames = np.zeros((1, 37, 37, 4), np.uint8)  # invisible pixels are black
    frames[0, 9:28, 9:28] = (255, 255, 255, 255)
    assert fit_frames(frames, 16, (255, 255, 255)).min() == 255  # straight-alpha area resizing gives 230


def test_strip_png_round_trips_losslessly():
    frames = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 4), dtype=np.uint8)
    assert np.array_equal(decode_strip(encode_strip(frames)), frames)
    assert np.array_equal(decode_strip(encode_strip(frames[..., :3])), frames[..., :3])


# ----------------------------------------------------------------------------- preparation


def test_prepare_writes_manifest_frames_and_report(tmp_path):
    source = build_source(tmp_path / "src")
    out = tmp_path / "out"
    report = prepare(source, out)
    assert (report.prepared, report.reused, report.skipped, report.padded) == (5, 0, [], 2)
    rows = {row["source"]: row for row in read_rows(out)}
    assert list(rows) == [
        "stickers/wave.gif",
        "stickers/short.png",
        "stickers/spin.webp",
        "clips/jump.mp4",
        "stickers/held.gif",
    ]

    wave = rows["stickers/wave.gif"]
    assert wave["key"] == "stickers_wave" and wave["frames"] == "frames/stickers_wave.png"
    assert wave["keyframes"] == [0, 1, 3, 4, 6, 7, 9, 10] and wave["num_real"] == 8 and wave["loss_mask"] == [1] * 8
    assert sum(wave["durations_ms"]) == 1200 and wave["fps"] == pytest.approx(8 / 1.2, abs=1e-3)
    assert (wave["caption_en"], wave["caption_zh"], wave["split"], wave["emoji"]) == ("waving", "挥手", "train", "👋")
    assert wave["source_frames"] == 12 and wave["keyframe_selection"] == "uniform"

    short = rows["stickers/short.png"]
    assert (
        short["num_real"] == 3 and short["loss_mask"] == [1, 1, 1, 0, 0, 0, 0, 0] and short["fps"] == pytest.approx(8.0)
    )
    frames = decode_strip(out / short["frames"])
    assert frames.shape == (8, 32, 32, 3)
    assert all(np.array_equal(frames[i], frames[2]) for i in range(3, 8))  # padding repeats the last frame
    source_frames = read_clip(source / "stickers/short.png").frames
    assert (frames[0, :6] == 255).all()  # 24x40 fitted to 19x32, centred on white
    assert not np.array_equal(frames[0], frames[1]) and len(source_frames) == 3

    held = rows["stickers/held.gif"]
    assert held["keyframes"] == [0, 2, 5] and held["keyframe_selection"] == "explicit"
    assert held["durations_ms"] == [600, 300, 100] and held["num_real"] == 3

    report_json = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report_json["counts"] == {
        "in_manifest": 5,
        "prepared": 5,
        "reused": 0,
        "padded": 2,
        "skipped": 0,
        "shards": 0,
    }
    assert "Nothing was skipped" in (out / "report.md").read_text(encoding="utf-8")
    assert not (out / JOURNAL_FILE).exists()


def test_selection_methods_and_rgba_output(tmp_path):
    source = build_source(tmp_path / "src")
    report = prepare(source, tmp_path / "cluster", selection="cluster", background=None)
    rows = {row["source"]: row for row in read_rows(tmp_path / "cluster")}
    assert report.prepared == 5 and rows["stickers/wave.gif"]["keyframe_selection"] == "cluster"
    assert len(set(rows["stickers/wave.gif"]["keyframes"])) == 8
    spin = decode_strip(tmp_path / "cluster" / rows["stickers/spin.webp"]["frames"])
    assert spin.shape == (8, 32, 32, 4) and spin[0, 0, 0, 3] == 0 and spin[..., 3].max() == 255


def test_bad_inputs_are_reported_and_every_good_file_is_prepared(tmp_path):
    source = build_source(tmp_path / "src")
    stickers = source / "stickers"
    good_gif = (stickers / "wave.gif").read_bytes()
    (stickers / "truncated.gif").write_bytes(good_gif[: len(good_gif) // 2])
    (stickers / "empty.gif").write_bytes(b"")
    (stickers / "notes.png").write_text("these are my notes, not a picture")
    (stickers / "no_frames.gif").write_bytes(b"GIF89a" + struct.pack("<HHBBB", 10, 10, 0, 0, 0) + b";")
    bomb = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 6, 0, 0, 0)) + png_chunk(b"IEND", b"")
    (stickers / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bomb)
    many = np.zeros((2001, 2, 2, 4), np.uint8)
    many[::2] = 255
    write_clip(Clip(many, np.full(2001, 20)), stickers / "endless.gif")
    (stickers / "folder.gif").mkdir()
    write_clip(Clip.from_fps(moving_square(4), 10), stickers / "unlisted.gif")
    write_clip(Clip.from_fps(moving_square(4), 10), tmp_path / "outside.gif")
    write_clip(Clip.from_fps(moving_square(9), 10), stickers / "nine.gif")
    (stickers / "link.gif").symlink_to(tmp_path / "outside.gif")
    lines = (source / "captions.jsonl").read_bytes()
    lines += b'{"file": "stickers/unlisted.gif", "caption_zh": "\xb4\xf3\xcf\xf3"}\n'  # GBK, not UTF-8
    lines += b"{not json\n"
    for name in (
        "truncated.gif",
        "empty.gif",
        "notes.png",
        "no_frames.gif",
        "bomb.png",
        "endless.gif",
        "folder.gif",
        "ghost.gif",
        "link.gif",
    ):
        lines += json.dumps({"file": f"stickers/{name}", "caption_en": name}).encode() + b"\n"
    lines += json.dumps({"file": "../outside.gif"}).encode() + b"\n"
    lines += json.dumps({"file": str(tmp_path / "outside.gif")}).encode() + b"\n"
    lines += json.dumps({"file": "stickers/wave.gif", "caption_en": "again"}).encode() + b"\n"
    lines += json.dumps({"file": "./stickers/spin.webp"}).encode() + b"\n"
    lines += json.dumps({"file": "stickers/nine.gif", "keyframes": [0, 40]}).encode() + b"\n"
    lines += json.dumps({"file": "stickers/short.png", "caption_en": 7}).encode() + b"\n"
    (source / "captions.jsonl").write_bytes(lines)
    before = tree_digest(source)

    report = prepare(source, tmp_path / "out")

    assert tree_digest(source) == before
    assert report.prepared == 5
    assert [row["source"] for row in read_rows(tmp_path / "out")] == [
        "stickers/wave.gif",
        "stickers/short.png",
        "stickers/spin.webp",
        "clips/jump.mp4",
        "stickers/held.gif",
    ]
    reasons = {}
    for file, reason in report.skipped:
        reasons.setdefault(file, []).append(reason)
    expected = {
        "captions.jsonl:6": "not valid UTF-8 (byte 0xb4",
        "captions.jsonl:7": "not valid JSON",
        "stickers/truncated.gif": "truncated",
        "stickers/empty.gif": "empty file",
        "stickers/notes.png": "unrecognised signature",
        "stickers/no_frames.gif": "no frames",
        "stickers/bomb.png": "decompression bomb",
        "stickers/endless.gif": "max_frames=2000",
        "stickers/folder.gif": "not a regular file",
        "stickers/ghost.gif": "file not found",
        "stickers/link.gif": "outside the dataset root (through a symbolic link)",
        "../outside.gif": "outside the dataset root",
        str(tmp_path / "outside.gif"): "absolute path",
        "stickers/wave.gif": "duplicate entry (first listed on line 1)",
        "./stickers/spin.webp": "duplicate entry (first listed on line 3)",
        "stickers/nine.gif": "keyframes [40] are outside the clip's 9 frames",
        "captions.jsonl:22": "caption_en must be text",
        "stickers/unlisted.gif": "not listed in captions.jsonl",
    }
    for file, fragment in expected.items():
        assert any(fragment in reason for reason in reasons.get(file, [])), (file, reasons.get(file))
    assert len(report.skipped) == len(expected)
    markdown = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert f"## Skipped ({len(expected)})" in markdown and "| stickers/bomb.png |" in markdown
    summary = report.summary()
    assert "5 stickers in" in summary and f"{len(expected)} skipped" in summary and "8 more in" in summary
    assert json.loads((tmp_path / "out" / "report.json").read_text())["counts"]["skipped"] == len(expected)


def test_csv_captions_with_keyframes_extra_fields_and_a_badly_encoded_row(tmp_path):
    source = build_source(tmp_path / "src")
    (source / "captions.jsonl").unlink()
    csv_bytes = (
        "file,caption_en,caption_zh,keyframes,motion\n"
        'stickers/wave.gif,"waving, happily",挥手,"[0, 5, 11]",wave\n'
        "stickers/short.png,blink,眨眼,,blink\n"
    ).encode()
    csv_bytes += b"stickers/spin.webp,spin,\xd0\xfd\xd7\xaa,,spin\n"  # GBK
    csv_bytes += "clips/jump.mp4,jump,跳,0 4 8,jump\n".encode()
    csv_bytes += b"stickers/held.gif,pause,,,hold,extra\n"
    (source / "captions.csv").write_bytes(csv_bytes)

    entries, problems = read_captions(source / "captions.csv")
    assert problems == [("captions.csv:4", "not valid UTF-8"), ("captions.csv:6", "1 more fields than the header")]
    assert [e.keyframes for e in entries] == [(0, 5, 11), None, (0, 4, 8)]

    report = prepare(source, tmp_path / "out")
    rows = read_rows(tmp_path / "out")
    assert [row["key"] for row in rows] == ["stickers_wave", "stickers_short", "clips_jump"]
    assert (
        rows[0]["caption_en"] == "waving, happily"
        and rows[0]["motion"] == "wave"
        and rows[0]["keyframes"] == [0, 5, 11]
    )
    assert rows[2]["keyframes"] == [0, 4, 8]
    assert ("stickers/spin.webp", "not listed in captions.csv") in report.skipped


def test_parameters_are_checked_before_any_work(tmp_path):
    source = build_source(tmp_path / "src")
    out = tmp_path / "out"
    for options, message in [
        ({"num_frames": 0}, "num_frames=0"),
        ({"size": 12}, "size=12"),
        ({"size": 0}, "size=0"),
        ({"selection": "random"}, "selection='random'"),
        ({"background": (300, 0, 0)}, "background="),
        ({"workers": 0}, "workers=0"),
        ({"shard_size": 0}, "shard_size=0"),
    ]:
        with pytest.raises(ValueError, match=message):
            prepare_dataset(source, out, progress=False, **options)
    with pytest.raises(FileNotFoundError, match="source folder not found"):
        prepare_dataset(tmp_path / "nope", out, progress=False)
    with pytest.raises(ValueError, match="inside source"):
        prepare_dataset(source, source / "out", progress=False)
    (tmp_path / "uncaptioned").mkdir()
    with pytest.raises(FileNotFoundError, match="captions.jsonl or captions.csv"):
        prepare_dataset(tmp_path / "uncaptioned", out, progress=False)
    (tmp_path / "notes.txt").write_text("file\n")
    with pytest.raises(CaptionsError, match="must be a .jsonl or .csv"):
        prepare_dataset(source, out, captions=tmp_path / "notes.txt", progress=False)
    (tmp_path / "headless.csv").write_text("path,caption_en\nstickers/wave.gif,waving\n")
    with pytest.raises(CaptionsError, match=r"needs a 'file' column \(found \['path', 'caption_en'\]\)"):
        prepare_dataset(source, out, captions=tmp_path / "headless.csv", progress=False)
    assert not out.exists() and not (source / "out").exists()


def test_output_folder_must_match_its_settings(tmp_path):
    source = build_source(tmp_path / "src")
    prepare(source, tmp_path / "out")
    with pytest.raises(ValueError, match=r"size 32 -> 64"):
        prepare_dataset(source, tmp_path / "out", size=64, progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        prepare(source, tmp_path / "busy")


def test_output_is_identical_with_one_or_two_workers(tmp_path):
    source = build_many(tmp_path / "src", 12)
    one = prepare(source, tmp_path / "one", workers=1, shard_size=5)
    two = prepare(source, tmp_path / "two", workers=2, shard_size=5)
    assert one.prepared == two.prepared == 12 and one.num_shards == two.num_shards == 3
    files = output_files(tmp_path / "one")
    assert files == output_files(tmp_path / "two")
    assert len([name for name in files if name.startswith("frames/")]) == 12


def test_rerun_after_a_partial_run_reuses_items_and_matches_a_clean_run(tmp_path):
    source = build_source(tmp_path / "src")
    records = [json.loads(line) for line in (source / "captions.jsonl").read_text(encoding="utf-8").splitlines()]
    part = write_jsonl(tmp_path / "part.jsonl", records[1:3])
    prepare(source, tmp_path / "out", captions=part)
    report = prepare(source, tmp_path / "out")
    assert (report.reused, report.prepared) == (2, 3)
    clean = prepare(source, tmp_path / "clean")
    assert output_files(tmp_path / "out") == output_files(tmp_path / "clean") and clean.reused == 0
    rerun = prepare(source, tmp_path / "out")
    assert (rerun.reused, rerun.prepared) == (5, 0)
    # a changed source file is prepared again
    write_clip(Clip.from_fps(moving_square(5), 10), source / "stickers" / "wave.gif")
    changed = prepare(source, tmp_path / "out")
    assert (changed.reused, changed.prepared) == (4, 1)
    assert read_rows(tmp_path / "out")[0]["source_frames"] == 5


def test_rerun_after_a_killed_run_finishes_without_duplicates(tmp_path):
    source = build_many(tmp_path / "src", 40)
    out = tmp_path / "out"
    script = (
        "from rdtf.data import prepare_dataset\n"
        f"prepare_dataset({str(source)!r}, {str(out)!r}, size=32, num_frames=8, selection='cluster', progress=False)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    journal = out / JOURNAL_FILE
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and child.poll() is None:
        if journal.is_file() and journal.read_bytes().count(b"\n") >= 3:
            child.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    child.wait()
    assert child.returncode == -signal.SIGKILL, "the preparation was not interrupted"
    assert not (out / MANIFEST_FILE).exists()

    report = prepare(source, out, selection="cluster")
    assert report.reused >= 3 and report.reused + report.prepared == 40
    keys = [row["key"] for row in read_rows(out)]
    assert len(keys) == len(set(keys)) == 40
    prepare(source, tmp_path / "clean", selection="cluster")
    assert output_files(out) == output_files(tmp_path / "clean")


# ----------------------------------------------------------------------------- loading


def test_sticker_dataset_items_through_a_dataloader_with_workers(tmp_path):
    out = tmp_path / "out"
    prepare(build_source(tmp_path / "src"), out)
    dataset = StickerDataset(out)
    item = dataset[1]
    assert item["video"].shape == (3, 8, 32, 32) and item["video"].dtype == torch.float32
    assert item["video"].min() >= -1 and item["video"].max() == 1  # white background
    assert item["loss_mask"].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert (item["key"], item["caption_zh"], item["fps"]) == ("stickers_short", "眨眼", pytest.approx(8.0))
    assert "alpha" not in item
    frames = decode_strip(out / "frames" / "stickers_short.png")
    assert torch.allclose(item["video"], torch.from_numpy(np.array(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1)

    loader = DataLoader(dataset, batch_size=2, num_workers=2)
    batches = list(loader)
    assert [b["video"].shape[0] for b in batches] == [2, 2, 1]
    assert batches[0]["loss_mask"].shape == (2, 8) and batches[0]["fps"].shape == (2,)
    assert sorted(key for b in batches for key in b["key"]) == sorted(row["key"] for row in dataset.rows)


def test_sticker_dataset_filters_crops_and_explains_errors(tmp_path):
    out = tmp_path / "out"
    prepare(build_source(tmp_path / "src"), out)
    assert [row["key"] for row in StickerDataset(out, split="val").rows] == ["stickers_spin"]
    assert len(StickerDataset(out, split="train", predicate=lambda row: row["num_real"] == 8)) == 2
    cropped = StickerDataset(out, num_frames=2)[0]
    assert cropped["video"].shape == (3, 2, 32, 32) and cropped["loss_mask"].shape == (2,)
    with pytest.raises(ValueError, match="stores 8 frames"):
        StickerDataset(out, num_frames=9)
    with pytest.raises(ValueError, match=r"split='test'.*'train', 'val'"):
        StickerDataset(out, split="test")
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        StickerDataset(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="not a prepared sticker dataset"):
        StickerDataset(tmp_path / "src")
    (out / MANIFEST_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="did not finish"):
        StickerDataset(out)


def test_rgba_dataset_gives_alpha_and_composites_video_on_white(tmp_path):
    out = tmp_path / "out"
    prepare(build_source(tmp_path / "src"), out, background=None)
    item = StickerDataset(out, split="val")[0]
    assert item["alpha"].shape == (1, 8, 32, 32) and item["alpha"].min() == 0 and item["alpha"].max() == 1
    transparent = item["alpha"][0] == 0
    assert (item["video"][:, transparent] == 1).all()


def test_shards_stream_every_sticker_once_across_ranks_and_workers(tmp_path):
    source = build_many(tmp_path / "src", 11)
    out = tmp_path / "out"
    report = prepare(source, out, shard_size=2)
    assert report.num_shards == 6
    all_keys = [row["key"] for row in read_rows(out)]
    with tarfile.open(out / "shards" / "shard-00000.tar") as tar:
        assert tar.getnames() == ["s000.png", "s000.json", "s001.png", "s001.json"]
        assert json.loads(tar.extractfile("s001.json").read())["key"] == "s001"

    seen: list[str] = []
    shard_sets = []
    for rank in range(2):
        dataset = ShardedStickerDataset(out, rank=rank, world_size=2)
        shard_sets += [set(dataset.shards_for(worker, 2)) for worker in range(2)]
        for item in DataLoader(dataset, batch_size=None, num_workers=2):
            assert item["video"].shape == (3, 8, 32, 32)
            seen.append(item["key"])
    assert sorted(seen) == sorted(all_keys)  # full coverage, no duplicates
    assert sum(len(s) for s in shard_sets) == 6 and set().union(*shard_sets) == set(dataset.shards)

    reference = StickerDataset(out)[3]
    streamed = next(item for item in ShardedStickerDataset(out) if item["key"] == reference["key"])
    assert torch.equal(streamed["video"], reference["video"]) and streamed["fps"] == reference["fps"]

    picked = [item["key"] for item in ShardedStickerDataset(out, predicate=lambda row: row["key"] < "s005")]
    assert picked == ["s000", "s001", "s002", "s003", "s004"]

    shuffled = ShardedStickerDataset(out, shuffle=True, seed=1)
    first = [item["key"] for item in shuffled]
    shuffled.set_epoch(1)
    second = [item["key"] for item in shuffled]
    assert sorted(first) == sorted(second) == sorted(all_keys) and first != second
    with pytest.raises(ValueError, match="cannot feed 7 ranks"):
        ShardedStickerDataset(out, rank=0, world_size=7)
    prepare(source, out)  # re-run without shards removes the old ones
    with pytest.raises(FileNotFoundError, match="no shards"):
        ShardedStickerDataset(out)


def test_keys_are_safe_unique_and_dot_free():
    keys = sticker_keys(["a/cat.gif", "a/cat.png", "b/dog run.webp", "..weird.gif"])
    assert keys["b/dog run.webp"] == "b_dog_run"
    assert keys["a/cat.gif"] != keys["a/cat.png"] and keys["a/cat.gif"].startswith("a_cat-")
    assert all("." not in key and "/" not in key for key in keys.values())
