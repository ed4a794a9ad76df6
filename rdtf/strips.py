"""Side-by-side pictures of one case: an animated GIF strip and a static contact sheet.

Columns are ``name -> (F, H, W, 4)`` uint8 clips of one case (input, ground truth, each
method), composited over one background and laid out left to right in one image, so
the GIF plays every column in sync; the contact sheet shows the same as a grid of frames
for papers and PDFs. Both are composed directly with numpy and Pillow (a matplotlib grid
of one axes per frame took seconds per sheet). Frames smaller than
:data:`MIN_COLUMN_WIDTH` are enlarged by an integer factor with nearest-neighbour
sampling so labels fit and pixels stay crisp.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rdtf.cases import EvalCase
from rdtf.io import Clip, composite_over, write_atomic, write_clip
from rdtf.metrics import DEFAULT_BACKGROUND

#: Columns narrower than this are enlarged by an integer factor.
MIN_COLUMN_WIDTH = 128
#: What an input column shows for a frame the method was not given.
HIDDEN_FRAME_RGBA = (170, 170, 170, 255)
_LABEL_HEIGHT, _FOOTER_HEIGHT, _GAP, _FONT_SIZE = 18, 16, 4, 12
#: Contact sheets: widest row label (longer names get an ellipsis) and the margin around the grid.
_SHEET_LABEL_WIDTH, _SHEET_MARGIN = 140, 6
_GAP_RGB, _TEXT_RGB, _GIVEN_RGB = (200, 200, 200), (20, 20, 20), (0, 110, 200)


def input_frames(case: EvalCase) -> np.ndarray:
    """What the method saw: the given frames, and a flat grey frame wherever it had to generate."""
    shown = np.empty_like(case.frames)
    shown[...] = np.asarray(HIDDEN_FRAME_RGBA, np.uint8)
    given = case.condition_mask > 0.5
    shown[given] = case.frames[given]
    return shown


def case_columns(case: EvalCase, predictions: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The standard layout: input | ground truth | each method in the order given."""
    return {"input": input_frames(case), "ground truth": case.frames, **predictions}


def _check_columns(columns: Mapping[str, np.ndarray], given_mask: np.ndarray | None) -> tuple[int, int, int]:
    if not columns:
        raise ValueError("columns: nothing to draw (empty)")
    shapes = {name: np.shape(frames) for name, frames in columns.items()}
    first = next(iter(shapes.values()))
    for name, shape in shapes.items():
        frames = columns[name]
        if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or len(shape) != 4 or shape[-1] != 4:
            raise ValueError(f"columns[{name!r}]: expected (F, H, W, 4) uint8 frames, got {shape}")
        if shape != first:
            raise ValueError(f"columns[{name!r}]: shape {shape} differs from {first}; every column shows the same case")
    if given_mask is not None and np.shape(given_mask) != (first[0],):
        raise ValueError(f"given_mask: expected {first[0]} entries (one per frame), got {np.shape(given_mask)}")
    return first[0], first[1], first[2]


def compose_strip(
    columns: Mapping[str, np.ndarray],
    *,
    given_mask: np.ndarray | None = None,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
) -> np.ndarray:
    """All columns side by side, labelled, one opaque ``(F, H', W', 4)`` uint8 frame per time step.

    The footer names the frame (``frame 3/8``) and marks frames where ``given_mask`` is 1.
    """
    num_frames, height, width = _check_columns(columns, given_mask)
    scale = max(1, -(-MIN_COLUMN_WIDTH // width))
    cell_h, cell_w = height * scale, width * scale
    total_w = len(columns) * cell_w + (len(columns) - 1) * _GAP
    total_h = _LABEL_HEIGHT + cell_h + _FOOTER_HEIGHT
    font = ImageFont.load_default(size=_FONT_SIZE)

    header = Image.new("RGB", (total_w, _LABEL_HEIGHT), background)
    draw = ImageDraw.Draw(header)
    for index, name in enumerate(columns):
        draw.text((index * (cell_w + _GAP) + 3, 2), _fit(name, font, cell_w - 6), fill=_TEXT_RGB, font=font)
    header_pixels = np.asarray(header)

    out = np.empty((num_frames, total_h, total_w, 3), np.uint8)
    for t in range(num_frames):
        canvas = np.empty((total_h, total_w, 3), np.uint8)
        canvas[...] = np.asarray(background, np.uint8)
        canvas[:_LABEL_HEIGHT] = header_pixels
        for index, frames in enumerate(columns.values()):
            left = index * (cell_w + _GAP)
            cell = composite_over(frames[t], background).repeat(scale, axis=0).repeat(scale, axis=1)
            canvas[_LABEL_HEIGHT : _LABEL_HEIGHT + cell_h, left : left + cell_w] = cell
            if index:
                canvas[_LABEL_HEIGHT : _LABEL_HEIGHT + cell_h, left - _GAP : left] = _GAP_RGB
        footer = Image.fromarray(canvas)
        is_given = given_mask is not None and bool(given_mask[t] > 0.5)
        text = f"frame {t + 1}/{num_frames}" + ("  given" if is_given else "")
        ImageDraw.Draw(footer).text(
            (3, _LABEL_HEIGHT + cell_h + 1), text, fill=_GIVEN_RGB if is_given else _TEXT_RGB, font=font
        )
        out[t] = np.asarray(footer)
    return np.concatenate([out, np.full((*out.shape[:3], 1), 255, np.uint8)], axis=-1)


def _fit(text: str, font: ImageFont.FreeTypeFont, width: int) -> str:
    """``text`` shortened with an ellipsis until it is at most ``width`` pixels wide."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def side_by_side_gif(
    columns: Mapping[str, np.ndarray],
    path: str | Path,
    fps: float,
    *,
    given_mask: np.ndarray | None = None,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
) -> Path:
    """Write the labelled strip of ``columns`` as one looping GIF at ``fps``; returns the path."""
    strip = compose_strip(columns, given_mask=given_mask, background=background)
    return write_clip(Clip.from_fps(strip, fps), Path(path))


def compose_sheet(
    columns: Mapping[str, np.ndarray],
    *,
    given_mask: np.ndarray | None = None,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
    title: str | None = None,
) -> np.ndarray:
    """The contact-sheet grid as one ``(H, W, 3)`` uint8 image: a row per column, a panel per frame.

    Row labels name the columns; the header numbers the frames and marks (in blue) those
    where ``given_mask`` is 1; ``title`` goes on top.
    """
    num_frames, height, width = _check_columns(columns, given_mask)
    scale = max(1, -(-MIN_COLUMN_WIDTH // width))
    cell_h, cell_w = height * scale, width * scale
    font = ImageFont.load_default(size=_FONT_SIZE)
    label_w = min(_SHEET_LABEL_WIDTH, int(max(font.getlength(name) for name in columns))) + 2 * _SHEET_MARGIN
    title_h = _LABEL_HEIGHT if title else 0
    top, left = _SHEET_MARGIN + title_h + _LABEL_HEIGHT, label_w
    grid_h = len(columns) * (cell_h + _GAP) - _GAP
    grid_w = num_frames * (cell_w + _GAP) - _GAP

    canvas = np.full((top + grid_h + _SHEET_MARGIN, left + grid_w + _SHEET_MARGIN, 3), 255, np.uint8)
    border = _GAP // 2  # the gap colour also frames the grid, so panels stand out on white
    canvas[top - border : top + grid_h + border, left - border : left + grid_w + border] = _GAP_RGB
    for row, frames in enumerate(columns.values()):
        cells = composite_over(frames, background).repeat(scale, axis=1).repeat(scale, axis=2)
        y = top + row * (cell_h + _GAP)
        for t in range(num_frames):
            x = left + t * (cell_w + _GAP)
            canvas[y : y + cell_h, x : x + cell_w] = cells[t]

    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((_SHEET_MARGIN, _SHEET_MARGIN), _fit(title, font, canvas.shape[1] - 2 * _SHEET_MARGIN), fill=_TEXT_RGB, font=font)
    for t in range(num_frames):
        is_given = given_mask is not None and bool(given_mask[t] > 0.5)
        text = _fit(f"{t + 1}" + (" given" if is_given else ""), font, cell_w)
        x = left + t * (cell_w + _GAP) + (cell_w - font.getlength(text)) / 2
        draw.text((x, top - _LABEL_HEIGHT + 2), text, fill=_GIVEN_RGB if is_given else _TEXT_RGB, font=font)
    for row, name in enumerate(columns):
        y = top + row * (cell_h + _GAP) + (cell_h - _FONT_SIZE) / 2
        draw.text((_SHEET_MARGIN, y), _fit(name, font, label_w - 2 * _SHEET_MARGIN), fill=_TEXT_RGB, font=font)
    return np.asarray(image)


def contact_sheet(
    columns: Mapping[str, np.ndarray],
    path: str | Path,
    *,
    given_mask: np.ndarray | None = None,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
    title: str | None = None,
) -> Path:
    """The grid of :func:`compose_sheet` saved as PNG, PDF or SVG (the image embedded) by suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".png", ".pdf", ".svg"):
        raise ValueError(f"{path}: contact sheets are saved as .png, .pdf or .svg")
    image = Image.fromarray(compose_sheet(columns, given_mask=given_mask, background=background, title=title))
    buffer = io.BytesIO()
    image.save(buffer, format="PDF" if suffix == ".pdf" else "PNG", resolution=100.0)
    data = buffer.getvalue()
    if suffix == ".svg":
        data = _svg_wrapping(data, image.width, image.height)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)
    return path


def _svg_wrapping(png: bytes, width: int, height: int) -> bytes:
    """An SVG document showing one embedded PNG at its pixel size, for toolchains that want SVG."""
    href = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' viewBox='0 0 {width} {height}'>"
        f"<image width='{width}' height='{height}' href='{href}' style='image-rendering:pixelated'/></svg>"
    ).encode("ascii")
