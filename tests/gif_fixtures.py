"""Byte-level builders for test GIFs and APNGs, independent of rdtf.io.

The GIF builder has its own LZW encoder, so the files the tests decode are not produced by
the code under test; it can write every feature the decoder must handle: disposal 0-3,
per-frame transparency, local palettes, sub-rectangles at offsets, interlacing, missing
graphic control extensions.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np


@dataclass
class GifFrame:
    indices: np.ndarray  # (h, w) palette indices
    left: int = 0
    top: int = 0
    palette: np.ndarray | None = None  # local colour table (2**k, 3) uint8
    disposal: int = 0
    transparency: int | None = None
    delay_cs: int | None = 10  # None: no graphic control extension at all
    interlaced: bool = False


def lzw_compress(data: bytes, min_code_size: int) -> bytes:
    """Variable-width GIF LZW, LSB-first bit packing (the classic encoder)."""
    clear, end = 1 << min_code_size, (1 << min_code_size) + 1
    out = bytearray()
    bit_buffer = bit_count = 0

    def emit(code: int, width: int) -> None:
        nonlocal bit_buffer, bit_count
        bit_buffer |= code << bit_count
        bit_count += width
        while bit_count >= 8:
            out.append(bit_buffer & 0xFF)
            bit_buffer >>= 8
            bit_count -= 8

    def fresh_table() -> dict[bytes, int]:
        return {bytes([i]): i for i in range(clear)}

    table, next_code, width = fresh_table(), end + 1, min_code_size + 1
    emit(clear, width)
    prefix = b""
    for value in data:
        extended = prefix + bytes([value])
        if extended in table:
            prefix = extended
            continue
        emit(table[prefix], width)
        if next_code < 4096:
            table[extended] = next_code
            next_code += 1
            if next_code > (1 << width) and width < 12:
                width += 1
        else:
            emit(clear, width)
            table, next_code, width = fresh_table(), end + 1, min_code_size + 1
        prefix = bytes([value])
    if prefix:
        emit(table[prefix], width)
    emit(end, width)
    if bit_count:
        out.append(bit_buffer & 0xFF)
    return bytes(out)


def sub_blocks(data: bytes) -> bytes:
    chunks = [bytes([len(data[i : i + 255])]) + data[i : i + 255] for i in range(0, len(data), 255)]
    return b"".join(chunks) + b"\x00"


def _table_bits(palette: np.ndarray) -> int:
    bits = max(1, int(np.ceil(np.log2(len(palette)))))
    assert len(palette) == 1 << bits, "colour tables must have 2**k entries"
    return bits


def _interlace_rows(indices: np.ndarray) -> np.ndarray:
    order = [*range(0, len(indices), 8), *range(4, len(indices), 8), *range(2, len(indices), 4)]
    order += list(range(1, len(indices), 2))
    return indices[order]


def build_gif(
    width: int, height: int, frames: list[GifFrame], global_palette: np.ndarray | None = None, loop: bool = True
) -> bytes:
    flags = 0
    parts = []
    if global_palette is not None:
        flags = 0x80 | 0x70 | (_table_bits(global_palette) - 1)
    parts.append(b"GIF89a" + struct.pack("<HHBBB", width, height, flags, 0, 0))
    if global_palette is not None:
        parts.append(np.asarray(global_palette, np.uint8).tobytes())
    if loop:
        parts.append(b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00")
    for frame in frames:
        if frame.delay_cs is not None:
            packed = (frame.disposal << 2) | (frame.transparency is not None)
            parts.append(struct.pack("<BBBBHBB", 0x21, 0xF9, 4, packed, frame.delay_cs, frame.transparency or 0, 0))
        h, w = frame.indices.shape
        packed = 0x40 if frame.interlaced else 0
        if frame.palette is not None:
            packed |= 0x80 | (_table_bits(frame.palette) - 1)
        parts.append(struct.pack("<BHHHHB", 0x2C, frame.left, frame.top, w, h, packed))
        if frame.palette is not None:
            parts.append(np.asarray(frame.palette, np.uint8).tobytes())
        rows = _interlace_rows(frame.indices) if frame.interlaced else frame.indices
        min_code_size = max(2, int(rows.max()).bit_length())
        parts.append(bytes([min_code_size]) + sub_blocks(lzw_compress(rows.astype(np.uint8).tobytes(), min_code_size)))
    parts.append(b";")
    return b"".join(parts)


@dataclass
class GifStructure:
    """What a GIF file declares, read without decoding pixels."""

    width: int
    height: int
    global_palette_size: int
    loop: int | None
    local_palettes: int
    disposals: list[int]
    delays_cs: list[int]
    transparency: list[int | None]


def gif_structure(data: bytes) -> GifStructure:
    width, height, flags = struct.unpack_from("<HHB", data, 6)
    pos = 13
    global_size = 2 << (flags & 7) if flags & 0x80 else 0
    pos += 3 * global_size
    loop = None
    local = 0
    disposals, delays, transparency = [], [], []
    while data[pos] != 0x3B:
        if data[pos] == 0x21:
            label = data[pos + 1]
            if label == 0xF9:
                packed, delay, index = struct.unpack_from("<BHB", data, pos + 3)
                disposals.append((packed >> 2) & 7)
                delays.append(delay)
                transparency.append(index if packed & 1 else None)
            if label == 0xFF and data[pos + 3 : pos + 14] == b"NETSCAPE2.0":
                loop = struct.unpack_from("<H", data, pos + 16)[0]
            pos += 2
        else:
            packed = data[pos + 9]
            pos += 10
            if packed & 0x80:
                local += 1
                pos += 3 * (2 << (packed & 7))
            pos += 1
        while data[pos]:
            pos += data[pos] + 1
        pos += 1
    return GifStructure(width, height, global_size, loop, local, disposals, delays, transparency)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@dataclass
class ApngFrame:
    rgba: np.ndarray  # (h, w, 4) uint8
    left: int = 0
    top: int = 0
    delay_ms: int = 100
    dispose_op: int = 0  # 0 none, 1 background, 2 previous
    blend_op: int = 0  # 0 source, 1 over


def build_apng(width: int, height: int, frames: list[ApngFrame]) -> bytes:
    """An APNG whose first frame is also the default image (unfiltered scanlines)."""

    def image_data(rgba: np.ndarray) -> bytes:
        raw = b"".join(b"\x00" + row.tobytes() for row in np.asarray(rgba, np.uint8))
        return zlib.compress(raw)

    parts = [b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0))]
    parts.append(_png_chunk(b"acTL", struct.pack(">II", len(frames), 0)))
    sequence = 0
    for number, frame in enumerate(frames):
        h, w = frame.rgba.shape[:2]
        control = struct.pack(
            ">IIIIIHHBB", sequence, w, h, frame.left, frame.top, frame.delay_ms, 1000, frame.dispose_op, frame.blend_op
        )
        parts.append(_png_chunk(b"fcTL", control))
        sequence += 1
        if number == 0:
            parts.append(_png_chunk(b"IDAT", image_data(frame.rgba)))
        else:
            parts.append(_png_chunk(b"fdAT", struct.pack(">I", sequence) + image_data(frame.rgba)))
            sequence += 1
    parts.append(_png_chunk(b"IEND", b""))
    return b"".join(parts)
