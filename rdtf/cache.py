"""Precompute cache: what the frozen encoders say about each training clip, encoded once.

Training never changes the VAE, the text encoder or the image encoder, so their outputs
for a clip are the same every epoch. :func:`encode_items` computes them (the one
encoding path, also used on the fly); :func:`build_cache` writes them to safetensors
shards under a folder named by a fingerprint of the data, the encoders' weights and the
clip size, so a change in any of them makes a fresh cache instead of a stale one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from rdtf.data import MANIFEST_FILE, SETTINGS_FILE, StickerDataset
from rdtf.models import (
    RDTF_CONFIG_NAME,
    SAMPLING_ONLY_CONFIG,
    Components,
    encode_frames,
    encode_image_embeddings,
    encode_text,
)

CACHE_FORMAT = "rdtf-encoder-cache-1"
ITEMS_PER_SHARD = 256
ENCODER_DIRS = ("vae", "text_encoder", "image_encoder", "text_projection", "tokenizer", "feature_extractor")
#: Files larger than this are fingerprinted by size + head + tail instead of full content.
FULL_HASH_LIMIT = 256 * 2**20


@torch.no_grad()
def encode_items(components: Components, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Encoder outputs for dataset items (see :class:`rdtf.data.StickerDataset`), batched.

    Returns ``latents (B, 4, F, h, w)``, ``text_en`` / ``text_zh`` ``(B, L, D)`` and
    ``frame_embeds (B, F, D)``: the CLIP image embedding of every frame, since any frame
    may be the first given one of a task.
    """
    video = torch.stack([item["video"] for item in items])  # (B, 3, F, H, W) in [-1, 1]
    batch, _, frames, height, width = video.shape
    flat = video.permute(0, 2, 1, 3, 4).reshape(batch * frames, 3, height, width)
    latents = encode_frames(components.vae, flat).float()
    latents = latents.reshape(batch, frames, *latents.shape[1:]).permute(0, 2, 1, 3, 4)
    rgb = ((flat.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    frame_embeds = encode_image_embeddings(components, rgb).float().reshape(batch, frames, -1)
    return {
        "latents": latents.cpu(),
        "text_en": encode_text(components, [item["caption_en"] for item in items]).float().cpu(),
        "text_zh": encode_text(components, [item["caption_zh"] for item in items]).float().cpu(),
        "frame_embeds": frame_embeds.cpu(),
    }


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256(f"{path.stat().st_size}".encode())
    with open(path, "rb") as handle:
        if path.stat().st_size <= FULL_HASH_LIMIT:
            for chunk in iter(lambda: handle.read(2**20), b""):
                digest.update(chunk)
        else:
            digest.update(handle.read(16 * 2**20))
            handle.seek(-16 * 2**20, os.SEEK_END)
            digest.update(handle.read())
    return digest.hexdigest()


def encoder_fingerprint(model_root: str | Path) -> str:
    """Hash of every encoder file of a model folder and of how they are used.

    Not the UNet (training changes only that), nor the recommended sampler settings in
    ``rdtf_config.json``: a new recommendation must not throw away a cache of the same encodings.
    """
    root = Path(model_root)
    digest = hashlib.sha256()
    for folder in ENCODER_DIRS:
        for path in sorted((root / folder).rglob("*")) if (root / folder).is_dir() else []:
            if path.is_file():
                digest.update(f"{path.relative_to(root)}:{_file_digest(path)}".encode())
    config_file = root / RDTF_CONFIG_NAME
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        encoding = {key: value for key, value in config.items() if key not in SAMPLING_ONLY_CONFIG}
        digest.update(json.dumps(encoding, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def cache_key(dataset: StickerDataset, model_fingerprint: str) -> str:
    """Names the cache of ``dataset`` (its rows, frame count and size) under one set of encoders."""
    digest = hashlib.sha256(model_fingerprint.encode())
    digest.update((dataset.root / SETTINGS_FILE).read_bytes())
    digest.update((dataset.root / MANIFEST_FILE).read_bytes())
    digest.update(json.dumps([row["key"] for row in dataset.rows]).encode())
    digest.update(f"frames={dataset.num_frames}".encode())
    return digest.hexdigest()[:16]


def build_cache(
    components: Components,
    dataset: StickerDataset,
    cache_root: str | Path,
    model_fingerprint: str,
    *,
    batch_size: int = 16,
    progress: bool = True,
) -> Path:
    """Encode every clip of ``dataset`` once; returns the cache folder (reused when it exists)."""
    folder = Path(cache_root) / cache_key(dataset, model_fingerprint)
    if (folder / "index.json").is_file():
        return folder
    staging = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        shard: dict[str, torch.Tensor] = {}
        shard_names: list[str] = []
        count = len(dataset)
        for start in tqdm(range(0, count, batch_size), desc="caching encoder outputs", disable=not progress):
            encoded = encode_items(components, [dataset[i] for i in range(start, min(start + batch_size, count))])
            for offset in range(len(encoded["latents"])):
                shard.update({f"{start + offset}.{name}": value[offset].contiguous() for name, value in encoded.items()})
                if (start + offset + 1) % ITEMS_PER_SHARD == 0 or start + offset + 1 == count:
                    shard_names.append(f"shard-{len(shard_names):05d}.safetensors")
                    save_file(shard, staging / shard_names[-1])
                    shard = {}
        empty = encode_text(components, [""]).float().cpu()[0]
        save_file({"empty_text": empty.contiguous()}, staging / "empty_text.safetensors")
        index = {"format": CACHE_FORMAT, "items": count, "items_per_shard": ITEMS_PER_SHARD, "shards": shard_names}
        (staging / "index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
        try:
            os.replace(staging, folder)
        except OSError:
            if not (folder / "index.json").is_file():
                raise
            shutil.rmtree(staging)  # another run built the same encodings meanwhile: use theirs
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


class CachedClips(Dataset):
    """``dataset`` items with the cached encoder outputs in place of the pixels (kept with ``with_video``)."""

    def __init__(self, dataset: StickerDataset, folder: str | Path, with_video: bool = False) -> None:
        self.dataset, self.folder, self.with_video = dataset, Path(folder), with_video
        self.index = json.loads((self.folder / "index.json").read_text(encoding="utf-8"))
        if self.index.get("format") != CACHE_FORMAT or self.index["items"] != len(dataset):
            raise ValueError(f"{self.folder}: cache does not match the dataset ({len(dataset)} clips); delete it")
        self._open: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": {}}  # file handles do not travel to DataLoader workers

    def empty_text(self) -> torch.Tensor:
        with safe_open(self.folder / "empty_text.safetensors", framework="pt") as handle:
            return handle.get_tensor("empty_text")

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard = self.index["shards"][index // self.index["items_per_shard"]]
        if shard not in self._open:  # one handle per shard and per DataLoader worker
            self._open[shard] = safe_open(self.folder / shard, framework="pt")
        handle = self._open[shard]
        row = self.dataset.rows[index]
        item = {name: handle.get_tensor(f"{index}.{name}") for name in ("latents", "text_en", "text_zh", "frame_embeds")}
        loss_mask = np.asarray(row["loss_mask"][: self.dataset.num_frames], dtype=np.float32)
        item.update(loss_mask=torch.from_numpy(loss_mask), fps=float(row["fps"]), key=row["key"],
                    caption_en=row["caption_en"], caption_zh=row["caption_zh"])
        if self.with_video:
            item["video"] = self.dataset[index]["video"]
        return item
