"""The built-in sticker set, prepared: the dataset most tests train, sample or score on."""

from __future__ import annotations

from pathlib import Path

from rdtf.data import prepare_dataset
from rdtf.synthetic import build_sticker_set


def built_in_dataset(root: Path, *, count: int, size: int, seed: int) -> Path:
    """``root/stickers`` (synthesised from ``seed``) prepared into ``root/data`` (8 frames); returns the latter."""
    build_sticker_set(root / "stickers", count=count, size=size, seed=seed, progress=False)
    prepare_dataset(root / "stickers", root / "data", num_frames=8, size=size, progress=False)
    return root / "data"
