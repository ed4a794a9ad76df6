"""LoRA on the I2VGen-XL UNet: attach for training, save/load in diffusers' format, scale, merge.

``I2VGenXLUNet`` has no ``add_adapter``, so adapters go in with
``peft.inject_adapter_in_model``. Files are diffusers LoRA files
(``pytorch_lora_weights.safetensors``, ``unet.``-prefixed peft keys, the ``LoraConfig`` in
the ``lora_adapter_metadata`` header) so ``StableDiffusionLoraLoaderMixin.lora_state_dict``
reads them. Tensors trained whole next to the adapter (the mask-channel convs of a UNet
with a condition-mask channel) ride in the same file under ``rdtf.unet.<parameter name>``;
they are copied in as they are when loading (a LoRA scale does not apply to them) and
bring the mask channel with them if the base lacks it.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils import convert_unet_state_dict_to_peft
from diffusers.utils.peft_utils import get_peft_kwargs, recurse_remove_peft_layers
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file
from torch import nn

from rdtf.models import LATENT_CHANNELS, MASK_CHANNEL_MODULES, add_mask_channel, has_mask_channel

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
UNET_PREFIX = "unet."
EXTRA_PREFIX = "rdtf.unet."
_METADATA_KEY = "lora_adapter_metadata"
_PROJECTIONS = r"(to_q|to_k|to_v|to_out\.0)"
#: Where each preset puts adapters (peft full-match regexes over UNet module names).
#: temporal = every attention whose sequence runs over frames; spatial = the per-frame transformers.
LORA_PRESETS: dict[str, str] = {
    "attention": rf".*\.{_PROJECTIONS}",
    "temporal": rf"(transformer_in|image_latents_temporal_encoder|.*\.temp_attentions\.\d+)\.(.*\.)?{_PROJECTIONS}",
    "spatial": rf".*\.attentions\.\d+\.(.*\.)?{_PROJECTIONS}",
}
_CONFIG_FIELDS = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora")


def _unet_of(target: Any) -> nn.Module:
    """A pipeline's UNet, or the module itself."""
    return getattr(target, "unet", target)


def _lora_layers(unet: nn.Module) -> list[BaseTunerLayer]:
    return [module for module in unet.modules() if isinstance(module, BaseTunerLayer)]


def adapter_names(target: Any) -> list[str]:
    """Names of the adapters attached to ``target`` (a pipeline or a UNet), in attach order."""
    return list(getattr(_unet_of(target), "peft_config", {}) or {})


def attach_lora(
    unet: nn.Module,
    *,
    preset: str = "attention",
    target_modules: str | Sequence[str] | None = None,
    rank: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    adapter_name: str = "default",
    train_mask_channel: bool = True,
) -> list[nn.Parameter]:
    """Add a fresh (zero-effect) LoRA adapter for training; returns the parameters to optimise.

    ``preset`` picks the layers (see :data:`LORA_PRESETS`) unless ``target_modules`` (peft
    syntax) is given. The base weights are frozen; with ``train_mask_channel`` a UNet with a
    mask channel also trains its two mask-channel convs (saved whole by :func:`save_lora`).
    """
    if target_modules is None and preset not in LORA_PRESETS:
        raise ValueError(f"preset={preset!r}: expected one of {', '.join(LORA_PRESETS)}")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank={rank}: must be an integer >= 1")
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha={alpha}: must be a finite number > 0")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout}: must be in [0, 1)")
    if adapter_name in adapter_names(unet):
        raise ValueError(f"adapter_name={adapter_name!r}: already attached")
    pattern = LORA_PRESETS[preset] if target_modules is None else target_modules
    config = LoraConfig(
        r=rank, lora_alpha=alpha or rank, lora_dropout=dropout, target_modules=pattern, init_lora_weights=True
    )
    unet.requires_grad_(False)
    inject_adapter_in_model(config, unet, adapter_name=adapter_name)
    if train_mask_channel and has_mask_channel(unet):
        for name in MASK_CHANNEL_MODULES:
            unet.get_submodule(name).requires_grad_(True)
    return [p for p in unet.parameters() if p.requires_grad]


def _lora_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path if path.suffix == ".safetensors" else path / LORA_WEIGHT_NAME


def save_lora(
    unet: nn.Module,
    path: str | os.PathLike,
    *,
    adapter_name: str = "default",
    extra_modules: Sequence[str] | None = None,
) -> Path:
    """Write one adapter as a diffusers LoRA file (atomically); returns the file path.

    ``path`` is a ``.safetensors`` file or a folder (then ``pytorch_lora_weights.safetensors``
    in it). ``extra_modules`` are UNet submodules stored whole; by default the mask-channel
    convs when the UNet has them.
    """
    unet = _unet_of(unet)
    if adapter_name not in adapter_names(unet):
        raise ValueError(f"adapter_name={adapter_name!r}: not attached (have {adapter_names(unet)})")
    if extra_modules is None:
        extra_modules = MASK_CHANNEL_MODULES if has_mask_channel(unet) else ()
    tensors = {
        UNET_PREFIX + key: value.detach().cpu().contiguous()
        for key, value in get_peft_model_state_dict(unet, adapter_name=adapter_name).items()
    }
    for module_name in extra_modules:
        for name, parameter in unet.get_submodule(module_name).named_parameters():
            tensors[f"{EXTRA_PREFIX}{module_name}.{name}"] = parameter.detach().cpu().contiguous()
    config = unet.peft_config[adapter_name].to_dict()
    lora_metadata = {UNET_PREFIX + key: _jsonable(config[key]) for key in _CONFIG_FIELDS}
    metadata = {"format": "pt", _METADATA_KEY: json.dumps(lora_metadata, indent=2, sort_keys=True)}
    target = _lora_file(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, temporary, metadata=metadata)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return target


def _jsonable(value: Any) -> Any:
    return sorted(value) if isinstance(value, set) else value


def _lora_config(peft_state: dict[str, torch.Tensor], metadata: dict | None, alphas: dict | None) -> LoraConfig:
    if metadata:
        values = {key[len(UNET_PREFIX) :]: v for key, v in metadata.items() if key.startswith(UNET_PREFIX)}
        return LoraConfig(**values)
    ranks = {key: value.shape[1] for key, value in peft_state.items() if "lora_B" in key}
    return LoraConfig(**get_peft_kwargs(ranks, alphas, peft_state, is_unet=True))


def load_lora(
    target: Any,
    path: str | os.PathLike,
    *,
    scale: float = 1.0,
    adapter_name: str | None = None,
) -> str:
    """Load a LoRA file into a pipeline or UNet at ``scale``, alongside any already loaded; returns its name.

    All loaded adapters stay active with their own scales (change them with
    :func:`set_lora_scale`). Files from other diffusers-compatible trainers load too.
    """
    unet = _unet_of(target)
    file = _lora_file(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no LoRA file (expected {LORA_WEIGHT_NAME} or a .safetensors path)")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale={scale}: must be finite")
    existing = adapter_names(unet)
    name = adapter_name or f"lora_{len(existing)}"
    if name in existing:
        raise ValueError(f"adapter_name={name!r}: already loaded (loaded: {existing})")
    state, alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(
        str(file.parent), weight_name=file.name, local_files_only=True, return_lora_metadata=True
    )
    extras = {key[len(EXTRA_PREFIX) :]: v for key, v in state.items() if key.startswith(EXTRA_PREFIX)}
    unet_state = {key[len(UNET_PREFIX) :]: v for key, v in state.items() if key.startswith(UNET_PREFIX)}
    unknown = sorted(k for k in state if not k.startswith((EXTRA_PREFIX, UNET_PREFIX)))
    if unknown:
        raise ValueError(f"{file}: only UNet LoRAs are supported; unexpected keys such as {unknown[:3]}")
    if not unet_state:
        raise ValueError(f"{file}: holds no UNet LoRA weights")
    if alphas:
        alphas = {k[len(UNET_PREFIX) :]: v for k, v in alphas.items() if k.startswith(UNET_PREFIX)}
    peft_state = convert_unet_state_dict_to_peft(unet_state)
    config = _lora_config(peft_state, metadata, alphas)
    modules = dict(unet.named_modules())
    strangers = sorted({key.split(".lora_")[0] for key in peft_state} - set(modules))
    if strangers:
        raise ValueError(f"{file}: LoRA layers for modules this UNet lacks, e.g. {strangers[:3]}")
    _load_extras(unet, extras, file)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # several adapters is the point
        inject_adapter_in_model(config, unet, adapter_name=name)
    set_peft_model_state_dict(unet, peft_state, adapter_name=name)
    names = adapter_names(unet)
    for layer in _lora_layers(unet):
        layer.set_adapter(names, inference_mode=True)
        layer.set_scale(name, scale)
    return name


def _load_extras(unet: nn.Module, extras: dict[str, torch.Tensor], file: Path) -> None:
    """Copy whole trained tensors in, first giving the UNet the mask channel they were trained with."""
    widened = LATENT_CHANNELS + 1
    needs_mask = any(
        k.startswith(MASK_CHANNEL_MODULES) and v.ndim == 4 and v.shape[1] == widened for k, v in extras.items()
    )
    expected = {name: tuple(p.shape) for name, p in unet.named_parameters()}
    if needs_mask and not has_mask_channel(unet):
        for module_name in MASK_CHANNEL_MODULES:
            key = f"{module_name}.weight"
            expected[key] = (expected[key][0], widened, *expected[key][2:])
    for key, value in extras.items():
        if expected.get(key) != tuple(value.shape):
            raise ValueError(f"{file}: extra tensor {key!r} {tuple(value.shape)} does not fit this UNet")
    if needs_mask and not has_mask_channel(unet):
        add_mask_channel(unet)
    parameters = dict(unet.named_parameters())
    with torch.no_grad():
        for key, value in extras.items():
            parameters[key].copy_(value)


def set_lora_scale(target: Any, adapter_name: str, scale: float) -> None:
    """Change a loaded adapter's strength (0 switches it off) without reloading it."""
    unet = _unet_of(target)
    if adapter_name not in adapter_names(unet):
        raise ValueError(f"adapter_name={adapter_name!r}: not loaded (loaded: {adapter_names(unet)})")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale={scale}: must be finite")
    for layer in _lora_layers(unet):
        layer.set_scale(adapter_name, scale)


def lora_scales(target: Any) -> dict[str, float]:
    """The scale of each attached adapter, read back from its layers."""
    scales: dict[str, float] = {}
    for layer in _lora_layers(_unet_of(target)):
        for name, scaling in layer.scaling.items():
            rank = math.sqrt(layer.r[name]) if layer.use_rslora.get(name, False) else layer.r[name]
            scales.setdefault(name, scaling * rank / layer.lora_alpha[name])
    return scales


def merge_lora(target: Any, adapter_names_to_merge: Sequence[str] | None = None) -> None:
    """Fold adapters (default: all loaded, at their scales) into the UNet weights and remove every adapter layer."""
    unet = _unet_of(target)
    loaded = adapter_names(unet)
    if not loaded:
        raise ValueError("no LoRA adapters to merge")
    names = list(adapter_names_to_merge or loaded)
    missing = [n for n in names if n not in loaded]
    if missing:
        raise ValueError(f"adapters {missing} are not loaded (loaded: {loaded})")
    for layer in _lora_layers(unet):
        layer.merge(adapter_names=[n for n in names if n in layer.scaling])
    recurse_remove_peft_layers(unet)
    del unet.peft_config
    if hasattr(unet, "_hf_peft_config_loaded"):
        unet._hf_peft_config_loaded = False


def lora_targets(unet: nn.Module, preset: str) -> list[str]:
    """Module names a preset would adapt (for inspection and tests)."""
    if preset not in LORA_PRESETS:
        raise ValueError(f"preset={preset!r}: expected one of {', '.join(LORA_PRESETS)}")
    pattern = re.compile(LORA_PRESETS[preset])
    return [name for name, _ in unet.named_modules() if pattern.fullmatch(name)]
