"""LoRA on the I2VGen-XL UNet: attach for training, save/load in diffusers' format, scale, merge.

``I2VGenXLUNet`` has no ``add_adapter``, so adapters go in with
``peft.inject_adapter_in_model``. Files are diffusers LoRA files
(``pytorch_lora_weights.safetensors``, ``unet.``-prefixed peft keys, the ``LoraConfig`` in
the ``lora_adapter_metadata`` header) so ``StableDiffusionLoraLoaderMixin.lora_state_dict``
reads them. Tensors trained whole next to the adapter (the mask-channel convs of a UNet
with a condition-mask channel) ride in the same file under ``rdtf.unet.<parameter name>``
as deltas from the weights training started from (``rdtf_extras: delta`` in the header;
older files hold the trained tensors whole and are turned into deltas against the base on
load). Loaded, they become ``base + scale * delta`` with the adapter's own scale, so
:func:`set_lora_scale` and :func:`merge_lora` treat them like the low-rank part, and they
bring the mask channel (a zero slice, as :func:`rdtf.models.add_mask_channel`) with them
if the base lacks it.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils import convert_unet_state_dict_to_peft
from diffusers.utils.peft_utils import get_peft_kwargs, recurse_remove_peft_layers
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from rdtf.models import MASK_CHANNEL_MODULES, add_mask_channel, has_mask_channel

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
UNET_PREFIX = "unet."
EXTRA_PREFIX = "rdtf.unet."
_METADATA_KEY = "lora_adapter_metadata"
#: Header key saying how the extras are stored; files without it hold them whole.
EXTRAS_METADATA_KEY = "rdtf_extras"
_EXTRAS_ATTR = "_rdtf_lora_extras"
_PROJECTIONS = r"(to_q|to_k|to_v|to_out\.0)"
#: The convolutions of the UNet's blocks: each resnet's two 2-D convs and each temporal conv layer's
#: four 3-D convs (diffusers' TemporalConvLayer: GroupNorm, SiLU[, Dropout], Conv3d).
_BLOCK_CONVS = r"resnets\.\d+\.conv[12]|temp_convs\.\d+\.(conv1\.2|conv[234]\.3)"
#: Where each preset puts adapters (peft full-match regexes over UNet module names).
#: temporal = every attention whose sequence runs over frames; spatial = the per-frame transformers;
#: attention+conv adds the blocks' convolutions, which move content in space and time (a new motion).
LORA_PRESETS: dict[str, str] = {
    "attention": rf".*\.{_PROJECTIONS}",
    "attention+conv": rf".*\.({_PROJECTIONS}|{_BLOCK_CONVS})",
    "temporal": rf"(transformer_in|image_latents_temporal_encoder|.*\.temp_attentions\.\d+)\.(.*\.)?{_PROJECTIONS}",
    "spatial": rf".*\.attentions\.\d+\.(.*\.)?{_PROJECTIONS}",
}
_CONFIG_FIELDS = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora")


def _unet_of(target: Any) -> nn.Module:
    """A pipeline's UNet, or the module itself."""
    return getattr(target, "unet", target)


@dataclass
class _Extras:
    """What a UNet needs to keep its whole-tensor extras in step with its adapters (keys: parameter names).

    ``trained_from``: per adapter in training, the weights it started from (saved deltas are
    against them). ``base``: the weights before any loaded adapter touched them; ``deltas`` and
    ``scales``: per loaded adapter, so the extras can always be rebuilt as base + sum(scale * delta).
    """

    trained_from: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    base: dict[str, torch.Tensor] = field(default_factory=dict)
    deltas: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)


def _extras(unet: nn.Module) -> _Extras:
    if not hasattr(unet, _EXTRAS_ATTR):
        setattr(unet, _EXTRAS_ATTR, _Extras())
    return getattr(unet, _EXTRAS_ATTR)


def _cpu_copy(parameter: torch.Tensor) -> torch.Tensor:
    return parameter.detach().to("cpu", copy=True)


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
    mask channel also trains its two mask-channel convs (saved as deltas by :func:`save_lora`).
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
        start = _extras(unet).trained_from.setdefault(adapter_name, {})
        for module_name in MASK_CHANNEL_MODULES:
            module = unet.get_submodule(module_name)
            module.requires_grad_(True)
            start.update({f"{module_name}.{name}": _cpu_copy(p) for name, p in module.named_parameters()})
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
    in it). ``extra_modules`` are UNet submodules trained whole with the adapter, stored as
    deltas from the weights :func:`attach_lora` started from; by default all it trained
    (the mask-channel convs with ``train_mask_channel``).
    """
    unet = _unet_of(unet)
    if adapter_name not in adapter_names(unet):
        raise ValueError(f"adapter_name={adapter_name!r}: not attached (have {adapter_names(unet)})")
    start = _extras(unet).trained_from.get(adapter_name, {})
    if extra_modules is None:
        extra_modules = sorted({key.rsplit(".", 1)[0] for key in start})
    tensors = {
        UNET_PREFIX + key: value.detach().cpu().contiguous()
        for key, value in get_peft_model_state_dict(unet, adapter_name=adapter_name).items()
    }
    for module_name in extra_modules:
        for name, parameter in unet.get_submodule(module_name).named_parameters():
            key = f"{module_name}.{name}"
            if key not in start:
                raise ValueError(f"extra module {module_name!r}: not trained with adapter {adapter_name!r} by attach_lora")
            tensors[EXTRA_PREFIX + key] = (parameter.detach().cpu() - start[key]).contiguous()
    config = unet.peft_config[adapter_name].to_dict()
    lora_metadata = {UNET_PREFIX + key: _jsonable(config[key]) for key in _CONFIG_FIELDS}
    metadata = {
        "format": "pt",
        _METADATA_KEY: json.dumps(lora_metadata, indent=2, sort_keys=True),
        EXTRAS_METADATA_KEY: "delta",
    }
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
    needs_mask = _check_extras(unet, extras, file)
    with safe_open(file, "pt") as handle:
        as_deltas = (handle.metadata() or {}).get(EXTRAS_METADATA_KEY) == "delta"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # several adapters is the point
        inject_adapter_in_model(config, unet, adapter_name=name)
    set_peft_model_state_dict(unet, peft_state, adapter_name=name)
    names = adapter_names(unet)
    for layer in _lora_layers(unet):
        layer.set_adapter(names, inference_mode=True)
        layer.set_scale(name, scale)
    if extras:
        _add_extras(unet, name, extras, scale, as_deltas=as_deltas, needs_mask=needs_mask)
    return name


def _check_extras(unet: nn.Module, extras: dict[str, torch.Tensor], file: Path) -> bool:
    """Fail before touching the UNet if the extras do not fit it; returns whether they need a mask channel added."""
    widened = unet.config.in_channels + 1
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
    return needs_mask and not has_mask_channel(unet)


def _add_extras(
    unet: nn.Module, name: str, extras: dict[str, torch.Tensor], scale: float, *, as_deltas: bool, needs_mask: bool
) -> None:
    """Register one adapter's extras (whole tensors become deltas against the base) and apply them at ``scale``."""
    if needs_mask:
        add_mask_channel(unet)
    state = _extras(unet)
    parameters = dict(unet.named_parameters())
    for key in extras:
        state.base.setdefault(key, _cpu_copy(parameters[key]))
    deltas = {key: value.to(state.base[key].dtype) for key, value in extras.items()}
    state.deltas[name] = deltas if as_deltas else {key: value - state.base[key] for key, value in deltas.items()}
    state.scales[name] = scale
    _apply_extras(unet)


def _apply_extras(unet: nn.Module, adapters: Sequence[str] | None = None) -> None:
    """Set each loaded extra to base + sum(scale * delta) over ``adapters`` (default: all loaded)."""
    state = _extras(unet)
    parameters = dict(unet.named_parameters())
    with torch.no_grad():
        for key, base in state.base.items():
            value = base.clone()
            for name, deltas in state.deltas.items():
                if key in deltas and state.scales[name] and (adapters is None or name in adapters):
                    value += state.scales[name] * deltas[key]
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
    state = _extras(unet)
    if adapter_name in state.deltas:
        state.scales[adapter_name] = scale
        _apply_extras(unet)


def lora_scales(target: Any) -> dict[str, float]:
    """The scale of each attached adapter, read back from its layers."""
    scales: dict[str, float] = {}
    for layer in _lora_layers(_unet_of(target)):
        for name, scaling in layer.scaling.items():
            rank = math.sqrt(layer.r[name]) if layer.use_rslora.get(name, False) else layer.r[name]
            scales.setdefault(name, scaling * rank / layer.lora_alpha[name])
    return scales


def merge_lora(target: Any, adapter_names_to_merge: Sequence[str] | None = None) -> None:
    """Fold adapters (default: all loaded, at their scales; extras too) into the UNet weights and remove every adapter layer."""
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
    _apply_extras(unet, names)
    delattr(unet, _EXTRAS_ATTR)
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
