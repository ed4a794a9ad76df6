"""Checkpoints: atomic, pruned, exact round-trips of weights and optimizer state."""

from __future__ import annotations

import errno

import pytest
import torch

from rdtf import checkpoint as ckpt


def _trained_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).pow(2).mean().backward()
        optimizer.step()
    return model, optimizer


def test_round_trip_continues_training_identically(tmp_path):
    model, optimizer = _trained_optimizer()
    opt_tensors, opt_skeleton = ckpt.optimizer_to_flat(optimizer.state_dict())
    tensors = {**ckpt.prefixed("model", model.state_dict()), **ckpt.prefixed("optim", opt_tensors)}
    path = ckpt.save_checkpoint(tmp_path, 3, tensors, {"optimizer": opt_skeleton, "step": 3})

    loaded, state = ckpt.load_checkpoint(path)
    clone = torch.nn.Linear(4, 3)
    clone.load_state_dict(ckpt.unprefixed("model", loaded))
    clone_opt = torch.optim.AdamW(clone.parameters(), lr=1e-2)
    clone_opt.load_state_dict(ckpt.optimizer_from_flat(ckpt.unprefixed("optim", loaded), state["optimizer"]))

    batch = torch.randn(5, 4)
    for net, opt in ((model, optimizer), (clone, clone_opt)):
        opt.zero_grad()
        net(batch).pow(2).mean().backward()
        opt.step()
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


def test_keeps_only_the_newest(tmp_path):
    for step in range(1, 6):
        ckpt.save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))}, {"step": step}, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]
    tensors, state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert state["step"] == 5 and tensors["w"].tolist() == [5.0, 5.0]


def test_interrupted_write_leaves_previous_checkpoint(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {"step": 1})
    # What a SIGKILL mid-write leaves behind: a staging folder, and a step folder without state.json.
    (tmp_path / ".tmp-step-00000002-999").mkdir()
    (tmp_path / "step-00000002").mkdir()
    (tmp_path / "step-00000002" / ckpt.TENSORS_FILE).write_bytes(b"partial")
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step-00000001"
    assert ckpt.load_checkpoint(latest)[1]["step"] == 1


def test_disk_full_keeps_previous_and_cleans_up(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {"step": 1})

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(OSError, match="No space"):
        ckpt.save_checkpoint(tmp_path, 2, {"w": torch.zeros(2)}, {"step": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))[1]["step"] == 1


def test_incomplete_checkpoint_is_refused_with_its_path(tmp_path):
    (tmp_path / "step-00000007").mkdir()
    with pytest.raises(FileNotFoundError, match="step-00000007: not a complete checkpoint"):
        ckpt.load_checkpoint(tmp_path / "step-00000007")
