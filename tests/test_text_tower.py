"""Text-tower pretraining: the tower learns to tell motions apart, deterministically, and touches nothing else."""

from __future__ import annotations

import json

import pytest
import torch
from built_in import built_in_dataset

from rdtf.data import StickerDataset
from rdtf.models import build_tiny_components, encode_text
from rdtf.text_tower import TEXT_TOWER_FIELDS, pretrain_text_tower


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> StickerDataset:
    return StickerDataset(built_in_dataset(tmp_path_factory.mktemp("tower"), count=60, size=32, seed=0), split=None)


def _motion_separation(components, dataset: StickerDataset) -> float:
    """Mean last-token distance between captions of different motions over that between same-motion ones.

    "Same motion": every field the tower learns to name (speed, direction, ...) is equal; only the subject differs.
    """
    with torch.no_grad():
        states = encode_text(components, [row["caption_en"] for row in dataset.rows])[:, -1]
    distances = torch.cdist(states, states)
    motions = [tuple(row[name] for name in TEXT_TOWER_FIELDS) for row in dataset.rows]
    same = torch.tensor([[a == b for b in motions] for a in motions]) & ~torch.eye(len(motions), dtype=torch.bool)
    different = ~same & ~torch.eye(len(motions), dtype=torch.bool)
    return float(distances[different].mean() / distances[same].mean())


def test_pretraining_makes_the_tower_name_every_field_and_group_captions_by_motion(captions):
    components = build_tiny_components(seed=0, text_width=16)
    unet_before = {name: value.clone() for name, value in components.unet.state_dict().items()}
    separation_before = _motion_separation(components, captions)
    metrics = pretrain_text_tower(components, captions, captions, steps=400, batch_size=32, progress=False)
    for language in ("caption_en", "caption_zh"):
        assert metrics["val_accuracy"][language]["all_fields"] >= 0.9, metrics["val_accuracy"]
    assert metrics["fields"] == list(TEXT_TOWER_FIELDS) and metrics["train_captions"] == 2 * len(captions)
    assert _motion_separation(components, captions) > 2 * separation_before
    assert all(torch.equal(value, unet_before[name]) for name, value in components.unet.state_dict().items())
    assert not any(p.requires_grad for p in components.text_encoder.parameters())
    json.dumps(metrics)  # what the recipe saves next to the weights


def test_pretraining_is_deterministic(captions):
    towers = []
    for _ in range(2):
        components = build_tiny_components(seed=0)
        pretrain_text_tower(components, captions, captions, steps=3, batch_size=8, seed=5, progress=False)
        towers.append(components.text_encoder.state_dict())
    assert all(torch.equal(towers[0][name], towers[1][name]) for name in towers[0])
    assert not torch.equal(towers[0]["embeddings.token_embedding.weight"],
                           build_tiny_components(seed=0).text_encoder.state_dict()["embeddings.token_embedding.weight"])


def test_bad_settings_and_rows_without_the_fields_are_refused(captions):
    components = build_tiny_components(seed=0)
    with pytest.raises(ValueError, match="steps=0"):
        pretrain_text_tower(components, captions, captions, steps=0, progress=False)
    with pytest.raises(ValueError, match="no field.*'mood'"):
        pretrain_text_tower(components, captions, captions, fields=("motion", "mood"), steps=1, progress=False)
