"""Training checkpoints that survive a SIGKILL or a full disk, with nothing unpickled.

A checkpoint is a folder ``step-00001234/`` holding ``tensors.safetensors`` (model or
adapter weights, optimizer moments: every tensor, flattened under prefixed names) and
``state.json`` (everything else: step, config, curriculum state, the optimizer's
non-tensor structure). No RNG state is stored: the training loop seeds each step from
``(seed, rank, step)``. It is built in a hidden temp folder and renamed into place in one
step, so a crash mid-write leaves the previous checkpoints untouched and loadable; only
folders with both files count when looking for the latest one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STEP_PREFIX = "step-"
TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"


def save_checkpoint(
    root: str | Path,
    step: int,
    tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep_last: int = 3,
) -> Path:
    """Write ``root/step-{step:08d}`` atomically and prune all but the ``keep_last`` newest."""
    if keep_last < 1:
        raise ValueError(f"keep_last={keep_last}: keep at least one checkpoint")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{STEP_PREFIX}{step:08d}"
    staging = root / f".tmp-{STEP_PREFIX}{step:08d}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, staging / TENSORS_FILE)
        with open(staging / STATE_FILE, "w", encoding="utf-8") as handle:
            json.dump(state, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        path
        for path in root.iterdir()
        if path.name.startswith(STEP_PREFIX) and (path / TENSORS_FILE).is_file() and (path / STATE_FILE).is_file()
    ]
    return sorted(found, key=lambda path: int(path.name[len(STEP_PREFIX) :]))


def latest_checkpoint(root: str | Path) -> Path | None:
    checkpoints = list_checkpoints(root)
    return checkpoints[-1] if checkpoints else None


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    if not (path / TENSORS_FILE).is_file() or not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (needs {TENSORS_FILE} and {STATE_FILE})")
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    return load_file(path / TENSORS_FILE), state


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{name}": tensor for name, tensor in tensors.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    start = len(prefix) + 1
    return {name[start:]: tensor for name, tensor in tensors.items() if name.startswith(prefix + ".")}


def optimizer_to_flat(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and a JSON skeleton."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton_state: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state_dict["state"].items():
        entry: dict[str, Any] = {}
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param_id}.{key}"] = value
                entry[key] = {"tensor": True}
            else:
                entry[key] = value
        skeleton_state[str(param_id)] = entry
    return tensors, {"state": skeleton_state, "param_groups": state_dict["param_groups"]}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], skeleton: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for param_id, entry in skeleton["state"].items():
        state[int(param_id)] = {
            key: tensors[f"{param_id}.{key}"] if isinstance(value, dict) and value.get("tensor") else value
            for key, value in entry.items()
        }
    return {"state": state, "param_groups": skeleton["param_groups"]}


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of everything random in one step of one process: resuming needs no RNG state."""
    digest = hashlib.sha256(f"{seed}/{rank}/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
