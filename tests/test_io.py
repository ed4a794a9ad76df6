"""rdtf.io: real files built by the tests, decoded and compared with ImageMagick and by hand."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from gif_fixtures import ApngFrame, GifFrame, build_apng, build_gif, gif_structure
from PIL import Image

from rdtf.io import (
    DEFAULT_DURATION_MS,
    MIN_WRITE_DURATION_MS,
    Clip,
    StickerFileError,
    composite_over,
    probe_video,
    read_clip,
    resample_clip,
    write_clip,
)

# ----------------------------------------------------------------------------- helpers


def _imagemagick() -> str | None:
    for candidate in ("/usr/bin/convert", shutil.which("magick"), shutil.which("convert")):
        if candidate and os.path.exists(candidate):
            result = subprocess.run([candidate, "-version"], capture_output=True, text=True)
            if "ImageMagick" in result.stdout:
                return candidate
    return None


@pytest.fixture(scope="module")
def imagemagick() -> str:
    binary = _imagemagick()
    if binary is None:
        if os.environ.get("RDTF_REQUIRE_IMAGEMAGICK") == "1":
            pytest.fail("ImageMagick not found but RDTF_REQUIRE_IMAGEMAGICK=1")
        pytest.skip("ImageMagick not installed (set RDTF_REQUIRE_IMAGEMAGICK=1 to make this a failure)")
    return binary


def imagemagick_coalesce(binary: str, gif: Path, out_dir: Path) -> np.ndarray:
    out_dir.mkdir()
    subprocess.run([binary, str(gif), "-coalesce", f"PNG32:{out_dir}/frame_%03d.png"], check=True)
    files = sorted(out_dir.glob("frame_*.png"))
    return np.stack([np.asarray(Image.open(f).convert("RGBA")) for f in files])


def assert_same_rgba(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal pixel for pixel, except that fully transparent pixels match whatever their RGB."""
    assert actual.shape == expected.shape
    both_clear = (actual[..., 3] == 0) & (expected[..., 3] == 0)
    differ = (actual != expected).any(axis=-1) & ~both_clear
    assert not differ.any(), f"{differ.sum()} pixels differ, first at {np.argwhere(differ)[0]}"


def random_palette(rng: np.random.Generator, size: int) -> np.ndarray:
    return rng.integers(0, 256, (size, 3), dtype=np.uint8)


def random_gif(rng: np.random.Generator, num_frames: int) -> tuple[int, int, list[GifFrame], np.ndarray]:
    """Mixed disposals, sub-rectangles at offsets, local palettes, transparency, interlace, no-GCE frames."""
    width, height = int(rng.integers(16, 48)), int(rng.integers(16, 48))
    global_palette = random_palette(rng, 16)
    frames = []
    for number in range(num_frames):
        w, h = int(rng.integers(1, width + 1)), int(rng.integers(1, height + 1))
        left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        palette = random_palette(rng, int(rng.choice([2, 4, 8, 32]))) if rng.random() < 0.4 else None
        colors = len(palette) if palette is not None else len(global_palette)
        # Blocky content so transparency shows as shapes, not salt and pepper.
        indices = rng.integers(0, colors, (h // 4 + 1, w // 4 + 1)).repeat(4, 0).repeat(4, 1)[:h, :w]
        frames.append(
            GifFrame(
                indices=indices.astype(np.uint8),
                left=left,
                top=top,
                palette=palette,
                disposal=int(rng.choice([0, 1, 2, 3])),
                transparency=int(rng.integers(0, colors)) if rng.random() < 0.6 else None,
                delay_cs=None if number and rng.random() < 0.15 else int(rng.integers(0, 30)),
                interlaced=bool(rng.random() < 0.2),
            )
        )
    # ImageMagick 6 keeps its canvas without an alpha channel when the first frame has no
    # transparent index; a later background disposal then turns never-drawn pixels opaque
    # (background colour) where browsers keep them transparent. Keep the first frame clear
    # of that quirk: it declares a transparent index, or covers the canvas and is not
    # restored away. test_gif_disposal_by_hand pins the browser behaviour for that case.
    first = frames[0]
    if first.transparency is None and (first.indices.shape != (height, width) or first.disposal == 3):
        first.transparency = int(rng.integers(0, len(first.palette if first.palette is not None else global_palette)))
    return width, height, frames, global_palette


def solid_frames(colors: list[tuple[int, int, int, int]], height: int = 12, width: int = 10) -> np.ndarray:
    return np.stack([np.full((height, width, 4), c, np.uint8) for c in colors])


def blocky_clip(rng: np.random.Generator, num_frames: int, height: int, width: int, block: int = 8) -> np.ndarray:
    """Smooth-ish RGBA content (8x8 blocks) that lossy codecs reproduce approximately."""
    small = rng.integers(0, 256, (num_frames, height // block + 1, width // block + 1, 4), dtype=np.uint8)
    small[..., 3] = np.where(small[..., 3] > 100, 255, 0)
    return np.ascontiguousarray(small.repeat(block, 1).repeat(block, 2)[:, :height, :width])


# ----------------------------------------------------------------------------- GIF decoding


@pytest.mark.parametrize("seed", range(12))
def test_gif_coalesce_matches_imagemagick(tmp_path: Path, imagemagick: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    width, height, frames, global_palette = random_gif(rng, num_frames=int(rng.integers(3, 10)))
    # Seed 0 pins the hard cases: restore-previous right after the first frame and twice in a row.
    if seed == 0:
        frames[0].disposal, frames[1].disposal, frames[2].disposal = 3, 3, 2
        frames[0].transparency = 0
    gif = tmp_path / "in.gif"
    gif.write_bytes(build_gif(width, height, frames, global_palette))

    clip = read_clip(gif)

    expected = imagemagick_coalesce(imagemagick, gif, tmp_path / "magick")
    assert clip.frames.shape == (len(frames), height, width, 4)
    assert_same_rgba(clip.frames, expected)


def test_gif_disposal_by_hand(tmp_path: Path) -> None:
    """Disposal 0/1 keep, 2 clears the rectangle, 3 restores the canvas from before the frame.

    Pixels no frame has drawn stay transparent, as in browsers (ImageMagick 6 turns them
    opaque after frame 2's background disposal because frame 0 has no transparent index).
    """
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    red, green, blue, clear = [255, 0, 0, 255], [0, 255, 0, 255], [0, 0, 255, 255], [0, 0, 0, 0]
    frames = [
        GifFrame(np.full((1, 2), 1, np.uint8), left=0, top=0, disposal=1),  # red at (0,0)-(0,1)
        GifFrame(np.array([[2, 0]], np.uint8), left=1, top=0, disposal=3, transparency=0),  # green at x=1 only
        GifFrame(np.array([[3]], np.uint8), left=2, top=1, disposal=2),  # blue at (1,2), then cleared
        GifFrame(np.array([[0]], np.uint8), left=0, top=1, disposal=0, transparency=0),  # fully transparent
    ]
    gif = tmp_path / "hand.gif"
    gif.write_bytes(build_gif(3, 2, frames, palette))

    got = read_clip(gif).frames

    assert got.tolist() == [
        [[red, red, clear], [clear, clear, clear]],
        [[red, green, clear], [clear, clear, clear]],
        [[red, red, clear], [clear, clear, blue]],  # frame 1 restored away
        [[red, red, clear], [clear, clear, clear]],  # frame 2 cleared
    ]


def test_gif_local_palette_and_offsets(tmp_path: Path) -> None:
    global_palette = np.array([[10, 20, 30], [40, 50, 60]], np.uint8)
    local = np.array([[200, 100, 0], [0, 100, 200], [1, 2, 3], [4, 5, 6]], np.uint8)
    frames = [
        GifFrame(np.zeros((4, 5), np.uint8)),
        GifFrame(np.array([[3, 1], [2, 0]], np.uint8), left=3, top=2, palette=local),
    ]
    gif = tmp_path / "local.gif"
    gif.write_bytes(build_gif(5, 4, frames, global_palette))

    got = read_clip(gif).frames[1]

    assert got[0, 0].tolist() == [10, 20, 30, 255]
    assert got[2:4, 3:5].tolist() == [[[4, 5, 6, 255], [0, 100, 200, 255]], [[1, 2, 3, 255], [200, 100, 0, 255]]]


def test_gif_durations_follow_the_browser_rule(tmp_path: Path) -> None:
    """No graphic control extension yet, delay 0 and delay 1 (10 ms) all mean DEFAULT_DURATION_MS.

    A frame without its own extension keeps the previous delay, as ImageMagick reads it.
    """
    delays = [None, 0, 1, 2, 7, None, 250]
    frames = [GifFrame(np.full((2, 2), i % 2, np.uint8), delay_cs=d) for i, d in enumerate(delays)]
    gif = tmp_path / "delays.gif"
    gif.write_bytes(build_gif(2, 2, frames, np.array([[0, 0, 0], [255, 255, 255]], np.uint8)))

    durations = read_clip(gif).durations_ms

    assert durations.dtype == np.int64
    assert durations.tolist() == [DEFAULT_DURATION_MS, DEFAULT_DURATION_MS, DEFAULT_DURATION_MS, 20, 70, 70, 2500]


# ----------------------------------------------------------------------------- GIF writing


def test_gif_write_round_trip_keeps_identical_frames_and_durations(tmp_path: Path) -> None:
    colors = [(255, 0, 0, 255), (255, 0, 0, 255), (255, 0, 0, 255), (0, 0, 255, 255), (0, 0, 255, 255)]
    frames = solid_frames(colors)
    frames[3, :4, :4] = (0, 0, 0, 0)  # a transparent corner
    frames[4, :, :] = frames[3]  # identical consecutive frames again
    frames[4, 5, 5] = (9, 9, 9, 100)  # alpha < 128 -> transparent
    clip = Clip(frames, [100, 33, 15, 250, 47])
    path = write_clip(clip, tmp_path / "out.gif")

    back = read_clip(path)
    structure = gif_structure(path.read_bytes())

    assert back.num_frames == 5
    assert back.durations_ms.tolist() == [100, 30, 20, 250, 50]  # 10 ms steps, at least 20 ms
    expected = frames.copy()
    expected[4, 5, 5] = 0
    assert_same_rgba(back.frames, expected)
    assert structure.global_palette_size == 256 and structure.local_palettes == 0
    assert structure.loop == 0
    assert structure.disposals == [2] * 5
    assert structure.transparency == [255] * 5


def test_gif_write_uses_one_palette_without_flicker(tmp_path: Path) -> None:
    """More than 255 colours: quantized once for all frames, so unchanged pixels stay unchanged."""
    rng = np.random.default_rng(3)
    background = rng.integers(0, 256, (48, 64, 4), dtype=np.uint8)
    background[..., 3] = 255
    frames = np.repeat(background[None], 6, axis=0)
    for i in range(6):
        frames[i, 10:20, 5 + 8 * i : 15 + 8 * i] = (255, 255, 0, 255)  # a moving square
    path = write_clip(Clip(frames, np.full(6, 80)), tmp_path / "many.gif")

    back = read_clip(path).frames

    untouched = np.ones((48, 64), bool)
    untouched[10:20, 5:63] = False
    assert (back[:, untouched] == back[0, untouched]).all()  # same colour in every frame
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 12  # a 255-colour approximation
    assert (back[3, 12, 30] == (255, 255, 0, 255)).all()


def test_written_gif_matches_imagemagick_and_pillow_reads_it(tmp_path: Path, imagemagick: str) -> None:
    rng = np.random.default_rng(4)
    frames = blocky_clip(rng, 5, 30, 41)
    path = write_clip(Clip(frames, [60, 60, 200, 60, 60]), tmp_path / "w.gif")

    ours = read_clip(path).frames

    assert_same_rgba(ours, imagemagick_coalesce(imagemagick, path, tmp_path / "magick"))
    assert Image.open(path).n_frames == 5


# ----------------------------------------------------------------------------- other formats


def test_apng_round_trip_is_lossless(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    frames = rng.integers(0, 256, (4, 9, 13, 4), dtype=np.uint8)  # 8-bit alpha, any value
    frames[2] = frames[1]
    clip = Clip(frames, [100, 250, 250, 40])
    for name in ("a.png", "b.apng"):
        back = read_clip(write_clip(clip, tmp_path / name))
        assert np.array_equal(back.frames, frames)
        assert back.durations_ms.tolist() == [100, 250, 250, 40]


def test_apng_compositing_of_sub_frames(tmp_path: Path) -> None:
    """Offsets, blend over, dispose to background and to previous, as the APNG spec defines them."""
    red, half_blue = (255, 0, 0, 255), (0, 0, 255, 128)
    base = np.full((3, 4, 4), red, np.uint8)
    frames = [
        ApngFrame(base, delay_ms=50),
        ApngFrame(np.full((1, 2, 4), half_blue, np.uint8), left=1, top=1, blend_op=0, dispose_op=2),
        ApngFrame(np.full((1, 1, 4), (0, 255, 0, 255), np.uint8), left=3, top=2, blend_op=1, dispose_op=1),
        ApngFrame(np.zeros((1, 1, 4), np.uint8), left=0, top=0, blend_op=1, delay_ms=0),
    ]
    path = tmp_path / "sub.png"
    path.write_bytes(build_apng(4, 3, frames))

    clip = read_clip(path)

    assert clip.num_frames == 4
    assert clip.frames[1, 1, 1:3].tolist() == [list(half_blue)] * 2  # blend source replaces
    assert clip.frames[2, 1, 1].tolist() == list(red)  # dispose previous undid frame 1
    assert clip.frames[2, 2, 3].tolist() == [0, 255, 0, 255]
    assert clip.frames[3, 2, 3, 3] == 0  # dispose background cleared frame 2's pixel
    assert clip.frames[3, 0, 0].tolist() == list(red)  # blend over with a clear pixel keeps red
    assert clip.durations_ms.tolist() == [50, 100, 100, DEFAULT_DURATION_MS]


def test_webp_lossless_keeps_8bit_alpha_and_lossy_is_smaller(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    frames = blocky_clip(rng, 4, 40, 40, block=4)
    frames[..., 3] = np.linspace(0, 255, 40, dtype=np.uint8)[None, :, None]  # an alpha ramp
    clip = Clip(frames, [100, 120, 140, 160])

    lossless = read_clip(write_clip(clip, tmp_path / "a.webp", lossless=True))
    lossy_path = write_clip(clip, tmp_path / "b.webp", quality=30)
    lossy = read_clip(lossy_path)

    visible = frames[..., 3] > 0  # WebP may change the colour under fully clear pixels
    assert np.array_equal(lossless.frames[..., 3], frames[..., 3])
    assert np.array_equal(lossless.frames[visible], frames[visible])
    assert lossless.durations_ms.tolist() == [100, 120, 140, 160]
    assert lossy_path.stat().st_size < (tmp_path / "a.webp").stat().st_size
    assert np.abs(lossy.frames[..., 3].astype(int) - frames[..., 3]).max() <= 2  # alpha kept
    assert np.abs(lossy.frames[visible].astype(int) - frames[visible]).mean() < 20


def test_webp_merges_identical_frames_but_keeps_timing(tmp_path: Path) -> None:
    frames = solid_frames([(1, 2, 3, 255), (1, 2, 3, 255), (200, 0, 0, 255)])
    back = read_clip(write_clip(Clip(frames, [100, 200, 300]), tmp_path / "m.webp", lossless=True))
    assert back.durations_ms.tolist() == [300, 300]
    assert back.total_ms == 600


def test_mp4_is_h264_yuv420p_with_even_size(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    frames = blocky_clip(rng, 6, 31, 45, block=16)  # odd size
    clip = Clip(frames, [100] * 6)

    path = write_clip(clip, tmp_path / "v.mp4")
    info = probe_video(path)
    back = read_clip(path)

    assert (info.codec, info.pix_fmt, info.width, info.height, info.has_audio) == ("h264", "yuv420p", 46, 32, False)
    assert back.num_frames == 6 and back.durations_ms.tolist() == [100] * 6
    flat = composite_over(frames)
    assert np.abs(back.frames[:, :31, :45, :3].astype(int) - flat).mean() < 8
    assert back.frames[:, 31, :, :3].mean() > 225  # padded with the white background (chroma bleeds a little)
    assert (back.frames[..., 3] == 255).all()


def test_webm_vp9_keeps_alpha_and_variable_timing(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    frames = blocky_clip(rng, 4, 48, 64, block=16)
    clip = Clip(frames, [100, 300, 100, 100])  # shown exactly at 10 fps with frame 1 repeated

    path = write_clip(clip, tmp_path / "v.webm")
    info = probe_video(path)
    back = read_clip(path)

    assert (info.codec, info.has_alpha, info.has_audio, info.fps) == ("vp9", True, False, 10.0)
    assert back.num_frames == 6 and back.total_ms == 600
    expected = frames[[0, 1, 1, 1, 2, 3]]
    assert np.abs(back.frames[..., 3].astype(int) - expected[..., 3]).mean() < 4  # alpha round trip
    opaque = expected[..., 3] == 255
    assert np.abs(back.frames[opaque][:, :3].astype(int) - expected[opaque][:, :3]).mean() < 12


def test_video_fps_option_resamples_by_time(tmp_path: Path) -> None:
    frames = solid_frames([(255, 0, 0, 255), (0, 0, 255, 255)], 16, 16)
    back = read_clip(write_clip(Clip(frames, [300, 100]), tmp_path / "r.mp4", fps=20))
    assert back.num_frames == 8 and back.total_ms == 400
    reds = back.frames[:, 8, 8, 0] > 128
    assert reds.tolist() == [True] * 6 + [False] * 2


def test_static_png_is_a_one_frame_clip(tmp_path: Path) -> None:
    path = tmp_path / "still.png"
    Image.new("RGBA", (7, 5), (10, 20, 30, 40)).save(path)
    clip = read_clip(path)
    assert clip.frames.shape == (1, 5, 7, 4) and clip.durations_ms.tolist() == [DEFAULT_DURATION_MS]
    assert clip.frames[0, 0, 0].tolist() == [10, 20, 30, 40]


def test_reading_leaves_the_file_untouched(tmp_path: Path) -> None:
    path = write_clip(Clip(solid_frames([(1, 2, 3, 255)] * 2), [100, 100]), tmp_path / "keep.gif")
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    read_clip(path)
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before


# ----------------------------------------------------------------------------- bad input


def _expect_error(path: Path, fragment: str, **limits: int) -> StickerFileError:
    with pytest.raises(StickerFileError) as caught:
        read_clip(path, **limits)
    error = caught.value
    assert error.path == path and str(error) == f"{path}: {error.reason}"
    assert fragment in error.reason, error.reason
    return error


def _png_header(width: int, height: int) -> bytes:
    body = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + body + struct.pack(">I", zlib.crc32(b"IHDR" + body))


def _idat_end(pixels: bytes) -> bytes:
    data = zlib.compress(pixels)
    idat = struct.pack(">I", len(data)) + b"IDAT" + data + struct.pack(">I", zlib.crc32(b"IDAT" + data))
    return idat + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


def test_missing_empty_and_unknown_files(tmp_path: Path) -> None:
    _expect_error(tmp_path / "nope.gif", "file not found")
    (tmp_path / "empty.webp").write_bytes(b"")
    _expect_error(tmp_path / "empty.webp", "empty file")
    (tmp_path / "notes.gif").write_text("these are not pixels\n" * 10)
    _expect_error(tmp_path / "notes.gif", "unrecognised signature")
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 100)
    _expect_error(tmp_path / "clip.mp4", "unrecognised signature")
    (tmp_path / "x.bmp").write_bytes(b"BM" + b"\x00" * 60)
    _expect_error(tmp_path / "x.bmp", "unknown extension '.bmp'")
    (tmp_path / "folder.gif").mkdir()
    _expect_error(tmp_path / "folder.gif", "not a regular file")


def test_truncated_and_corrupt_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    good = build_gif(
        40, 40, [GifFrame(rng.integers(0, 16, (40, 40)).astype(np.uint8))] * 2, random_palette(rng, 16)
    )
    (tmp_path / "cut.gif").write_bytes(good[: len(good) // 2])
    _expect_error(tmp_path / "cut.gif", "truncated GIF")
    (tmp_path / "header.gif").write_bytes(good[:9])
    _expect_error(tmp_path / "header.gif", "truncated GIF")
    (tmp_path / "block.gif").write_bytes(good[: 13 + 48] + b"\x99" + good[13 + 48 :])
    _expect_error(tmp_path / "block.gif", "unexpected block 0x99")
    garbled = bytearray(good)
    data_start = garbled.index(b"\x2c\x00\x00\x00\x00") + 10 + 2  # past the code size and block length
    garbled[data_start : data_start + 200] = rng.integers(0, 256, 200, dtype=np.uint8).tobytes()
    (tmp_path / "lzw.gif").write_bytes(bytes(garbled))
    _expect_error(tmp_path / "lzw.gif", "corrupt GIF image data in frame 0")

    png = tmp_path / "cut.png"
    write_clip(Clip(rng.integers(0, 256, (3, 30, 30, 4), dtype=np.uint8), [100] * 3), png)
    png.write_bytes(png.read_bytes()[:-900])
    _expect_error(png, "corrupt or truncated")

    webp = tmp_path / "cut.webp"
    write_clip(Clip(rng.integers(0, 256, (3, 30, 30, 4), dtype=np.uint8), [100] * 3), webp)
    webp.write_bytes(webp.read_bytes()[:40])
    _expect_error(webp, "corrupt or truncated")

    mp4 = tmp_path / "junk.mp4"
    mp4.write_bytes(b"\x00\x00\x00\x18ftypisom" + rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    _expect_error(mp4, "no video stream")


def test_zero_frames(tmp_path: Path) -> None:
    path = tmp_path / "none.gif"
    path.write_bytes(build_gif(4, 4, [], np.zeros((2, 3), np.uint8)))
    _expect_error(path, "no frames")


def test_decompression_bombs_are_refused_before_decoding(tmp_path: Path) -> None:
    # Tiny files declaring huge canvases: refused from the header alone.
    gif = tmp_path / "bomb.gif"
    gif.write_bytes(build_gif(60000, 60000, [GifFrame(np.zeros((1, 1), np.uint8))], np.zeros((2, 3), np.uint8)))
    _expect_error(gif, "max_pixels")
    frame_bomb = tmp_path / "frame_bomb.gif"
    data = bytearray(build_gif(8, 8, [GifFrame(np.zeros((1, 1), np.uint8))], np.zeros((2, 3), np.uint8)))
    descriptor = data.index(b"\x2c\x00\x00\x00\x00")
    data[descriptor + 5 : descriptor + 9] = struct.pack("<HH", 65000, 65000)
    frame_bomb.write_bytes(bytes(data))
    _expect_error(frame_bomb, "frame 0 declares 65000x65000")
    png = tmp_path / "bomb.png"
    png.write_bytes(_png_header(50000, 50000) + _idat_end(b"\x00" * 100))
    _expect_error(png, "declares a 50000x50000 canvas")
    webp = tmp_path / "bomb.webp"
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x10\x00\x00\x00" + (16383).to_bytes(3, "little") * 2
    webp.write_bytes(b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x)
    _expect_error(webp, "declares a 16384x16384 canvas")
    # With our limit lifted, Pillow's own bomb guard fires: still a StickerFileError.
    _expect_error(png, "decompression bomb", max_pixels=10**10)


def test_too_many_frames(tmp_path: Path) -> None:
    gif = tmp_path / "many.gif"
    gif.write_bytes(build_gif(2, 2, [GifFrame(np.zeros((2, 2), np.uint8))] * 5, np.zeros((2, 3), np.uint8)))
    _expect_error(gif, "more than max_frames=3", max_frames=3)
    clip = Clip(solid_frames([(50 * i, 0, 0, 255) for i in range(5)], 8, 8), [100] * 5)
    for name in ("many.png", "many.webp", "many.webm"):
        _expect_error(write_clip(clip, tmp_path / name), "max_frames=3", max_frames=3)
    # Many frames on a big canvas: each limit alone passes, their product does not.
    canvas = tmp_path / "canvas.gif"
    canvas.write_bytes(build_gif(1000, 1000, [GifFrame(np.zeros((1, 1), np.uint8))] * 30, np.zeros((2, 3), np.uint8)))
    _expect_error(canvas, "30 frames of 1000x1000", max_total_pixels=20_000_000)
    _expect_error(write_clip(clip, tmp_path / "total.png"), "max_total_pixels=256", max_total_pixels=256)


def test_max_frames_is_enforced_while_decoding_video(tmp_path: Path) -> None:
    """A stream with more frames than its header suggests stops at the limit."""
    clip = Clip(solid_frames([(i * 40, 0, 0, 255) for i in range(6)], 8, 8), [100] * 6)
    path = write_clip(clip, tmp_path / "v.mp4")
    assert read_clip(path, max_frames=6).num_frames == 6
    _expect_error(path, "max_frames=5", max_frames=5)


# ----------------------------------------------------------------------------- atomic writes


def test_failed_write_leaves_no_partial_file(tmp_path: Path) -> None:
    clip = Clip(solid_frames([(1, 2, 3, 255)] * 2), [100, 100])
    target = tmp_path / "keep.webm"
    target.write_bytes(b"old contents")

    with pytest.raises(ValueError, match="crf=99"):
        write_clip(clip, target, crf=99)
    with pytest.raises(ValueError, match="crf=-7"):
        write_clip(clip, tmp_path / "new.mp4", crf=-7)
    with pytest.raises(StickerFileError, match="ffmpeg failed"):
        write_clip(clip, tmp_path / "new.webm", speed=99)
    with pytest.raises(ValueError, match="655.35 s"):
        write_clip(Clip(clip.frames, [100, 700_000]), tmp_path / "long.gif")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['quality'\]"):
        write_clip(clip, tmp_path / "x.gif", quality=5)

    assert target.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.webm"]


def test_write_replaces_existing_file_and_makes_folders(tmp_path: Path) -> None:
    clip = Clip(solid_frames([(1, 2, 3, 255)] * 2), [100, 100])
    target = tmp_path / "deep" / "dir" / "s.gif"
    write_clip(clip, target)
    target.write_bytes(b"stale")
    assert write_clip(clip, target) == target
    assert read_clip(target).num_frames == 2
    assert [p.name for p in target.parent.iterdir()] == ["s.gif"]


# ----------------------------------------------------------------------------- frames


def test_resample_by_time_honours_variable_durations() -> None:
    frames = solid_frames([(0, 0, 0, 255), (1, 0, 0, 255), (2, 0, 0, 255)], 2, 2)
    clip = Clip(frames, [300, 100, 100])  # frame 0 shown three times as long

    to_fps = resample_clip(clip, fps=10)
    to_count = resample_clip(clip, num_frames=2)

    assert to_fps.frames[:, 0, 0, 0].tolist() == [0, 0, 0, 1, 2]
    assert to_fps.durations_ms.tolist() == [100] * 5
    assert to_count.frames[:, 0, 0, 0].tolist() == [0, 0]  # times 0 and 250 ms both show frame 0
    assert to_count.total_ms == 500
    up = resample_clip(clip, num_frames=15)
    assert np.bincount(up.frames[:, 0, 0, 0]).tolist() == [9, 3, 3]
    uneven = resample_clip(Clip(frames, [100, 100, 100]), fps=7)
    assert uneven.num_frames == 2 and uneven.durations_ms.tolist() == [150, 150]


def test_resample_rejects_bad_arguments() -> None:
    clip = Clip(solid_frames([(0, 0, 0, 255)] * 2, 2, 2), [10, 10])
    with pytest.raises(ValueError, match="exactly one"):
        resample_clip(clip, num_frames=2, fps=3)
    with pytest.raises(ValueError, match="exactly one"):
        resample_clip(clip)
    with pytest.raises(ValueError, match="num_frames=0"):
        resample_clip(clip, num_frames=0)
    with pytest.raises(ValueError, match="fps=-1"):
        resample_clip(clip, fps=-1)
    with pytest.raises(ValueError, match="< 1 ms per frame"):
        resample_clip(clip, num_frames=21)


def test_composite_over() -> None:
    pixels = np.array([[[255, 0, 0, 255], [255, 0, 0, 0], [255, 0, 0, 128], [0, 0, 0, 1]]], np.uint8)
    assert composite_over(pixels).tolist() == [[[255, 0, 0], [255, 255, 255], [255, 127, 127], [254, 254, 254]]]
    assert composite_over(pixels, (0, 0, 0)).tolist() == [[[255, 0, 0], [0, 0, 0], [128, 0, 0], [0, 0, 0]]]
    with pytest.raises(ValueError, match="background"):
        composite_over(pixels, (0, 0, 300))
    with pytest.raises(ValueError, match="uint8"):
        composite_over(pixels[..., :3])


def test_clip_validates_and_reports() -> None:
    frames = np.zeros((3, 4, 5, 4), np.uint8)
    clip = Clip(frames, [100, 200, 300])
    assert (clip.num_frames, clip.height, clip.width, clip.total_ms) == (3, 4, 5, 600)
    assert clip.fps == pytest.approx(5.0)
    assert clip.durations_ms.dtype == np.int64
    assert Clip.from_fps(frames, 30).durations_ms.tolist() == [33, 34, 33]
    with pytest.raises(ValueError, match="uint8"):
        Clip(frames.astype(np.float32), [1, 1, 1])
    with pytest.raises(ValueError, match=r"shape \(F, H, W, 4\)"):
        Clip(frames[..., :3], [1, 1, 1])
    with pytest.raises(ValueError, match=r"expected shape \(3,\)"):
        Clip(frames, [1, 1])
    with pytest.raises(ValueError, match=">= 1 ms"):
        Clip(frames, [1, 0, 1])
    with pytest.raises(ValueError, match="integer"):
        Clip(frames, [1.5, 1, 1])


def test_write_durations_never_below_the_minimum(tmp_path: Path) -> None:
    clip = Clip(solid_frames([(1, 0, 0, 255), (2, 0, 0, 255)]), [5, 11])
    for name in ("a.gif", "a.png", "a.webp"):
        back = read_clip(write_clip(clip, tmp_path / name, **({"lossless": True} if name.endswith("webp") else {})))
        assert back.durations_ms.tolist() == [MIN_WRITE_DURATION_MS] * 2, name
