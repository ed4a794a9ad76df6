"""Model components: tiny I2VGen-XL configurations, loading a base, and the kit's model folders.

A model is a set of diffusers / transformers components (:class:`Components`) plus a small
:class:`RDTFConfig` that says how to put them together: which text encoder family feeds
cross-attention, whether the UNet reads a condition-mask channel, the text context length.
Folders are diffusers-format (``model_index.json``, ``unet/``, ``vae/``, ...) plus
``rdtf_config.json``, safetensors only, so a stock I2VGen-XL checkpoint loads as is and a
fine-tuned one restores its exact architecture.

The encoders used by both sampling and training live here too (:func:`encode_text`,
:func:`encode_image_embeddings`, :func:`encode_frames`, :func:`decode_latents`), so the
two never disagree on how a caption, a sticker or a latent is computed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, I2VGenXLUNet, SchedulerMixin
from diffusers import __version__ as diffusers_version
from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoTokenizer,
    ChineseCLIPTextConfig,
    ChineseCLIPTextModel,
    CLIPImageProcessorPil,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rdtf.conditioning import CONDITION_FILLS, DIFFUSION_SPACES
from rdtf.masks import TASKS
from rdtf.tokenizer import build_byte_tokenizer, build_char_tokenizer, tokenize

RDTF_CONFIG_NAME = "rdtf_config.json"
#: rdtf_config.json fields that only steer sampling (not what any component computes)
SAMPLING_ONLY_CONFIG = ("sampler", "task_sampler")
TEXT_PROJECTION_DIR = "text_projection"
TEXT_ENCODER_KINDS = ("clip", "chinese_clip", "byte_clip")
#: The first convs of the two image-latent branches; with a mask channel they read 5 channels.
#: Sampler settings of the I2VGen-XL release, used where a model's config names none.
SAMPLER_DEFAULTS: dict[str, Any] = {
    "num_inference_steps": 25, "scheduler": "ddim", "text_guidance": 9.0, "image_guidance": 9.0, "strength": 1.0,
    "decode": "direct",
}
MASK_CHANNEL_MODULES = ("image_latents_proj_in.0", "image_latents_context_embedding.0")
DEFAULT_HUB_ID = "ali-vilab/i2vgen-xl"
_HUB_FILE_PATTERNS = ["model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors"]
_HUB_IGNORED = ["*.fp16.safetensors", "*.bin"]


class ModelNotFoundError(ValueError):
    """A model folder or hub id cannot be used: it is missing, incomplete or not downloaded."""


@dataclass(frozen=True)
class RDTFConfig:
    """How the components fit together; saved as ``rdtf_config.json`` next to them.

    ``text_encoder_kind``: ``clip`` (OpenCLIP text tower, penultimate layer + final layer norm,
    as stock I2VGen-XL), ``byte_clip`` (same tower with the offline byte-level tokenizer) or
    ``chinese_clip`` (a ChineseCLIP/BERT text tower whose last hidden states feed
    cross-attention). ``mask_channel``: the UNet's image-latent branches read the condition
    mask as an extra channel. ``num_frames``: the clip length the model was trained for.
    ``sampler``: the sampler settings this model is best used with (keys of
    :data:`SAMPLER_DEFAULTS`); what it leaves out falls back to those defaults.
    ``task_sampler``: per-task changes to ``sampler`` (e.g. ``{"i2v": {"strength": 0.8}}``):
    a task that must invent motion may want another start than one that must match given frames.
    ``condition_fill``: what the image latents carry at frames to generate (``position``, the
    stock plane, or ``interpolate``, the given latents interpolated in time; see
    :mod:`rdtf.conditioning`); ``interpolate`` needs the mask channel. ``diffusion_space``: what
    the UNet denoises, the clip's latents (``latent``, stock) or their difference from the
    ``interpolate`` fill (``residual``; see :mod:`rdtf.conditioning`).
    """

    text_encoder_kind: str = "clip"
    mask_channel: bool = False
    max_text_length: int = 77
    num_frames: int = 16
    sampler: dict[str, Any] = field(default_factory=dict)
    task_sampler: dict[str, dict[str, Any]] = field(default_factory=dict)
    condition_fill: str = "position"
    diffusion_space: str = "latent"

    def __post_init__(self) -> None:
        if self.diffusion_space not in DIFFUSION_SPACES:
            raise ValueError(f"diffusion_space={self.diffusion_space!r}: expected one of {', '.join(DIFFUSION_SPACES)}")
        if self.condition_fill not in CONDITION_FILLS:
            raise ValueError(f"condition_fill={self.condition_fill!r}: expected one of {', '.join(CONDITION_FILLS)}")
        if self.condition_fill != "position" and not self.mask_channel:
            raise ValueError(f"condition_fill={self.condition_fill!r} needs mask_channel=True (the UNet must tell a given frame from a fill)")
        if self.text_encoder_kind not in TEXT_ENCODER_KINDS:
            raise ValueError(
                f"text_encoder_kind={self.text_encoder_kind!r}: expected one of {', '.join(TEXT_ENCODER_KINDS)}"
            )
        if self.max_text_length < 3:
            raise ValueError(f"max_text_length={self.max_text_length}: must be >= 3")
        if self.num_frames < 1:
            raise ValueError(f"num_frames={self.num_frames}: must be >= 1")
        for name, settings in (("sampler", self.sampler), *((f"task_sampler.{t}", v) for t, v in self.task_sampler.items())):
            unknown = sorted(set(settings) - set(SAMPLER_DEFAULTS))
            if unknown:
                raise ValueError(f"{name}: unknown settings {unknown}; expected some of {sorted(SAMPLER_DEFAULTS)}")
        unknown_tasks = sorted(set(self.task_sampler) - set(TASKS))
        if unknown_tasks:
            raise ValueError(f"task_sampler: unknown tasks {unknown_tasks}; expected some of {', '.join(TASKS)}")

    @property
    def sampler_settings(self) -> dict[str, Any]:
        """The sampler settings to use when a caller names none: the model's, else the defaults."""
        return {**SAMPLER_DEFAULTS, **self.sampler}

    def sampler_settings_for(self, task: str | None) -> dict[str, Any]:
        """:attr:`sampler_settings` with ``task``'s own changes (none for ``task=None``)."""
        return {**self.sampler_settings, **self.task_sampler.get(task or "", {})}

    @classmethod
    def from_dict(cls, values: dict, source: str = RDTF_CONFIG_NAME) -> RDTFConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"{source}: unknown keys {sorted(unknown)}; expected some of {sorted(known)}")
        return cls(**values)


@dataclass
class Components:
    """Everything a sampler or a training loop needs; see :class:`RDTFConfig` for the glue."""

    unet: I2VGenXLUNet
    vae: AutoencoderKL
    text_encoder: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    image_encoder: CLIPVisionModelWithProjection
    feature_extractor: CLIPImageProcessorPil
    scheduler: SchedulerMixin
    config: RDTFConfig
    text_projection: nn.Linear | None = None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        """Pixel side the UNet's ``sample_size`` corresponds to."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def modules(self) -> dict[str, nn.Module]:
        found = {
            "unet": self.unet,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "image_encoder": self.image_encoder,
        }
        if self.text_projection is not None:
            found["text_projection"] = self.text_projection
        return found

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write a diffusers-format folder (+ ``rdtf_config.json``), built aside and renamed into place."""
        if getattr(self.unet, "peft_config", None):
            raise ValueError(
                "the UNet carries LoRA adapters: save them with rdtf.lora.save_lora, or fold them in with "
                "rdtf.lora.merge_lora before save_pretrained"
            )
        target = Path(path)
        if target.exists() and not target.is_dir():
            raise ValueError(f"{target}: exists and is not a folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".tmp-{target.name}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            self.unet.save_pretrained(staging / "unet", safe_serialization=True)
            self.vae.save_pretrained(staging / "vae", safe_serialization=True)
            self.text_encoder.save_pretrained(staging / "text_encoder")
            self.tokenizer.save_pretrained(staging / "tokenizer")
            self.image_encoder.save_pretrained(staging / "image_encoder")
            self.feature_extractor.save_pretrained(staging / "feature_extractor")
            self.scheduler.save_pretrained(staging / "scheduler")
            if self.text_projection is not None:
                (staging / TEXT_PROJECTION_DIR).mkdir()
                state = {k: v.detach().contiguous().cpu() for k, v in self.text_projection.state_dict().items()}
                save_file(state, staging / TEXT_PROJECTION_DIR / "model.safetensors")
            index = {
                "_class_name": "I2VGenXLPipeline",
                "_diffusers_version": diffusers_version,
                "unet": ["diffusers", type(self.unet).__name__],
                "vae": ["diffusers", type(self.vae).__name__],
                "text_encoder": ["transformers", type(self.text_encoder).__name__],
                "tokenizer": ["transformers", type(self.tokenizer).__name__],
                "image_encoder": ["transformers", type(self.image_encoder).__name__],
                "feature_extractor": ["transformers", "CLIPImageProcessor"],
                "scheduler": ["diffusers", type(self.scheduler).__name__],
            }
            (staging / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
            (staging / RDTF_CONFIG_NAME).write_text(
                json.dumps(dataclasses.asdict(self.config), indent=2), encoding="utf-8"
            )
            if target.exists():
                previous = target.parent / f".old-{target.name}-{os.getpid()}"
                os.replace(target, previous)
                os.replace(staging, target)
                shutil.rmtree(previous, ignore_errors=True)
            else:
                os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target


# --------------------------------------------------------------------------- mask channel


def has_mask_channel(unet: I2VGenXLUNet) -> bool:
    return unet.image_latents_proj_in[0].in_channels == unet.config.in_channels + 1


def add_mask_channel(unet: I2VGenXLUNet) -> None:
    """Let the UNet read the condition mask as one more ``image_latents`` channel, changing nothing yet.

    The first conv of ``image_latents_proj_in`` and of ``image_latents_context_embedding`` is
    replaced by a (latent channels + 1)-input conv holding the old weights plus a zero slice
    for the mask, so a pretrained model gives bit-identical outputs until the new slice is
    trained. The rest of the stock forward reads the channel count from the tensor
    (``image_latents.shape[1]``), so no other change is needed. (diffusers builds those two
    convs with 4 inputs whatever ``in_channels`` is; a model with more latent channels gets
    freshly initialised convs here, which is also what lets it run at all.)
    """
    if has_mask_channel(unet):
        raise ValueError("the UNet already has a mask channel")
    for name in MASK_CHANNEL_MODULES:
        branch_name, index = name.rsplit(".", 1)
        branch = getattr(unet, branch_name)
        old: nn.Conv2d = branch[int(index)]
        latent_channels = unet.config.in_channels
        new = nn.Conv2d(
            latent_channels + 1,
            old.out_channels,
            old.kernel_size,
            stride=old.stride,
            padding=old.padding,
            device=old.weight.device,
            dtype=old.weight.dtype,
        )
        if old.in_channels == latent_channels:
            with torch.no_grad():
                new.weight.zero_()
                if old.weight.device.type != "meta":
                    new.weight[:, :latent_channels] = old.weight
                    new.bias.copy_(old.bias)
        new.requires_grad_(old.weight.requires_grad)
        branch[int(index)] = new


# --------------------------------------------------------------------------- tiny models


def _inference_ready(components: Components) -> Components:
    """Eval mode, weights frozen: the kit trains adapters (rdtf.lora); unfreeze explicitly for full fine-tuning."""
    for module in components.modules().values():
        module.eval().requires_grad_(False)
    return components


def build_tiny_vae(channels: Sequence[int], sample_size: int = 64, latent_channels: int = 4) -> AutoencoderKL:
    """A toy-width ``AutoencoderKL`` downsampling ``2**(len(channels) - 1)`` times.

    More latent channels than the usual 4 keep far more detail at a small latent size (the
    UNet's cost hardly depends on them).

    Untrained: :func:`rdtf.autoencoder.train_autoencoder` trains one for a from-scratch model.
    """
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=tuple(channels),
        latent_channels=latent_channels,
        norm_num_groups=math.gcd(*channels, 8),  # up to 8 groups that divide every block's width
        sample_size=sample_size,
    )


def build_tiny_components(
    seed: int = 0,
    *,
    unet_channels: Sequence[int] = (4, 8),
    vae_channels: Sequence[int] = (8,),
    text_width: int = 8,
    cross_attention_dim: int | None = None,
    text_layers: int = 2,
    attention_head_dim: int = 4,
    image_size: int = 32,
    num_frames: int = 8,
    sample_size: int = 16,
    latent_channels: int = 4,
    prediction_type: str = "v_prediction",
    mask_channel: bool = True,
    text_encoder_kind: str = "byte_clip",
    max_text_length: int = 128,
    condition_fill: str = "position",
    diffusion_space: str = "latent",
) -> Components:
    """Randomly initialised components with the real architecture at toy width, built offline.

    Same seed, same weights. ``sample_size`` is the latent side (pixels = sample_size x
    2**(len(vae_channels)-1)). v-prediction models get the real base's zero-terminal-SNR
    schedule; epsilon models a plain one (zero SNR needs v-prediction).
    ``cross_attention_dim`` defaults to ``text_width``; when they differ a projection maps
    text hidden states into cross-attention. ``latent_channels`` other than 4 need the mask
    channel (see :func:`add_mask_channel`). ``attention_head_dim`` is the I2VGen-XL UNet's
    config value of that name (the width of each UNet attention head, and of each of the
    8 heads of its first temporal transformer).
    """
    if latent_channels != 4 and not mask_channel:
        raise ValueError(f"latent_channels={latent_channels}: only 4 works without the mask channel")
    if prediction_type not in ("v_prediction", "epsilon"):
        raise ValueError(f"prediction_type={prediction_type!r}: expected 'v_prediction' or 'epsilon'")
    if text_encoder_kind == "clip":
        raise ValueError(
            "text_encoder_kind='clip' needs the downloaded OpenCLIP tokenizer; tiny models use 'byte_clip'"
        )
    config = RDTFConfig(text_encoder_kind, mask_channel, max_text_length, num_frames,
                        condition_fill=condition_fill, diffusion_space=diffusion_space)
    context_dim = cross_attention_dim or text_width
    groups = min(unet_channels[0], 2)
    torch.manual_seed(seed)
    n_blocks = len(unet_channels)
    unet = I2VGenXLUNet(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=tuple(unet_channels),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock3D",) * (n_blocks - 1) + ("DownBlock3D",),
        up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * (n_blocks - 1),
        cross_attention_dim=context_dim,
        attention_head_dim=attention_head_dim,
        norm_num_groups=groups,
    )
    if mask_channel:
        add_mask_channel(unet)
    vae = build_tiny_vae(vae_channels, sample_size * 2 ** (len(vae_channels) - 1), latent_channels)
    if text_encoder_kind == "byte_clip":
        tokenizer = build_byte_tokenizer(max_text_length)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=text_width,
                intermediate_size=2 * text_width,
                num_attention_heads=2,
                num_hidden_layers=text_layers,
                max_position_embeddings=max_text_length,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                projection_dim=text_width,
            )
        )
    else:
        tokenizer = build_char_tokenizer(max_text_length)
        text_encoder = ChineseCLIPTextModel(
            ChineseCLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=text_width,
                intermediate_size=2 * text_width,
                num_attention_heads=2,
                num_hidden_layers=text_layers,
                max_position_embeddings=max_text_length,
                pad_token_id=tokenizer.pad_token_id,
            ),
            add_pooling_layer=False,
        )
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=8,
            intermediate_size=16,
            projection_dim=context_dim,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=max(1, image_size // 4),
        )
    )
    feature_extractor = CLIPImageProcessorPil(
        crop_size={"height": image_size, "width": image_size}, size={"shortest_edge": image_size}
    )
    zero_snr = prediction_type == "v_prediction"
    scheduler = DDIMScheduler(
        beta_schedule="squaredcos_cap_v2",
        clip_sample=False,
        prediction_type=prediction_type,
        rescale_betas_zero_snr=zero_snr,
        timestep_spacing="trailing" if zero_snr else "leading",
        set_alpha_to_one=True,
        steps_offset=1,
    )
    projection = nn.Linear(text_width, context_dim) if text_width != context_dim else None
    components = Components(
        unet, vae, text_encoder, tokenizer, image_encoder, feature_extractor, scheduler, config, projection
    )
    return _inference_ready(components)


def replace_text_encoder(
    components: Components,
    text_encoder: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    kind: str,
    *,
    max_text_length: int | None = None,
    seed: int = 0,
) -> Components:
    """Swap in another text tower (e.g. a downloaded ChineseCLIPTextModel) for fine-tuning.

    A linear projection (seeded, to be trained) is added when the tower's width differs
    from the UNet's cross-attention width.
    """
    length = max_text_length or min(int(tokenizer.model_max_length), text_encoder.config.max_position_embeddings)
    config = dataclasses.replace(components.config, text_encoder_kind=kind, max_text_length=length)
    tokenizer.model_max_length = length
    width = text_encoder.config.hidden_size
    context_dim = components.unet.config.cross_attention_dim
    projection = None
    if width != context_dim:
        torch.manual_seed(seed)
        projection = nn.Linear(width, context_dim).to(components.unet.dtype)
    return dataclasses.replace(
        components, text_encoder=text_encoder, tokenizer=tokenizer, config=config, text_projection=projection
    )


# --------------------------------------------------------------------------- loading


def _offline(local_files_only: bool) -> bool:
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return local_files_only or env or bool(hub_constants.HF_HUB_OFFLINE)


def resolve_model_path(path_or_hub_id: str | os.PathLike, *, local_files_only: bool = False) -> Path:
    """A local folder as is; a hub id from the local HF cache first, downloaded only when online."""
    text = str(path_or_hub_id)
    local = Path(text).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelNotFoundError(f"{local}: is a file; expected a diffusers-format model folder")
        return local
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ModelNotFoundError(
            f"{text}: no such folder. Pass a diffusers-format folder (model_index.json, unet/, vae/, ...) "
            f"or a hub id such as {DEFAULT_HUB_ID!r}"
        )
    patterns = dict(allow_patterns=_HUB_FILE_PATTERNS, ignore_patterns=_HUB_IGNORED)
    try:
        return Path(snapshot_download(text, local_files_only=True, **patterns))
    except Exception as cached_error:
        if _offline(local_files_only):
            raise ModelNotFoundError(
                f"{text}: not in the local Hugging Face cache ({hub_constants.HF_HUB_CACHE}) and downloads are off "
                f"(HF_HUB_OFFLINE / local_files_only). Get it on a machine with internet access with "
                f"`huggingface-cli download {text}` (or pass a local folder holding the model)"
            ) from cached_error
    try:
        return Path(snapshot_download(text, **patterns))
    except Exception as download_error:
        raise ModelNotFoundError(
            f"{text}: not cached locally and the download failed ({type(download_error).__name__}: "
            f"{download_error}). Check the id and your network, or run `huggingface-cli download {text}` "
            f"elsewhere and pass the folder"
        ) from download_error


def _missing_files(root: Path) -> list[str]:
    def has(folder: str, *names: str) -> bool:
        return any((root / folder / name).is_file() for name in names)

    diffusers_weights = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")
    transformers_weights = ("model.safetensors", "model.safetensors.index.json")
    required = {
        "unet/config.json": has("unet", "config.json"),
        "unet/diffusion_pytorch_model.safetensors": has("unet", *diffusers_weights),
        "vae/config.json": has("vae", "config.json"),
        "vae/diffusion_pytorch_model.safetensors": has("vae", *diffusers_weights),
        "text_encoder/config.json": has("text_encoder", "config.json"),
        "text_encoder/model.safetensors": has("text_encoder", *transformers_weights),
        "tokenizer/ (tokenizer.json, vocab.json or vocab.txt)": has(
            "tokenizer", "tokenizer.json", "vocab.json", "vocab.txt"
        ),
        "image_encoder/config.json": has("image_encoder", "config.json"),
        "image_encoder/model.safetensors": has("image_encoder", *transformers_weights),
        "feature_extractor/preprocessor_config.json": has("feature_extractor", "preprocessor_config.json"),
        "scheduler/scheduler_config.json": has("scheduler", "scheduler_config.json"),
    }
    return [name for name, present in required.items() if not present]


def _read_rdtf_config(root: Path, tokenizer_length: int) -> RDTFConfig:
    path = root / RDTF_CONFIG_NAME
    if not path.is_file():
        return RDTFConfig(max_text_length=min(tokenizer_length, 77))
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    return RDTFConfig.from_dict(values, str(path))


def _load_unet(folder: Path, mask_channel: bool, dtype: torch.dtype) -> I2VGenXLUNet:
    if not mask_channel:
        return I2VGenXLUNet.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True)
    # The stock config cannot describe the 5-channel convs, so build the architecture and assign the weights.
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    else:
        files = ["diffusion_pytorch_model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(folder / name, framework="pt") as weights:
            # copy: tensors straight from the file can be misaligned, which changes CPU kernels' rounding
            state.update({key: weights.get_tensor(key).to(dtype=dtype, copy=True) for key in weights.keys()})
    with torch.device("meta"):
        unet = I2VGenXLUNet.from_config(I2VGenXLUNet.load_config(folder))
        add_mask_channel(unet)
    try:
        unet.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise ValueError(f"{folder}: weights do not fit a UNet with a mask channel: {error}") from error
    return unet.eval()


def load_components(
    path_or_hub_id: str | os.PathLike = DEFAULT_HUB_ID,
    *,
    dtype: torch.dtype = torch.float32,
    local_files_only: bool = False,
) -> Components:
    """Load a stock I2VGen-XL (hub id or folder) or a folder written by :meth:`Components.save_pretrained`.

    Every missing piece is reported in one :class:`ModelNotFoundError` before any weights load.
    """
    root = resolve_model_path(path_or_hub_id, local_files_only=local_files_only)
    missing = _missing_files(root)
    if missing:
        raise ModelNotFoundError(
            f"{path_or_hub_id} ({root}) is not a complete model folder; missing: {', '.join(missing)}. "
            f"Re-download it (`huggingface-cli download {DEFAULT_HUB_ID}` for the stock base) or re-save it "
            f"with Components.save_pretrained"
        )
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    config = _read_rdtf_config(root, int(tokenizer.model_max_length))
    tokenizer.model_max_length = config.max_text_length
    text_class = ChineseCLIPTextModel if config.text_encoder_kind == "chinese_clip" else CLIPTextModel
    text_encoder = text_class.from_pretrained(root / "text_encoder", dtype=dtype, use_safetensors=True)
    projection = None
    projection_file = root / TEXT_PROJECTION_DIR / "model.safetensors"
    if projection_file.is_file():
        state = load_file(projection_file)
        out_dim, in_dim = state["weight"].shape
        projection = nn.Linear(in_dim, out_dim)
        projection.load_state_dict(state)
        projection = projection.to(dtype)
    scheduler_config = DDIMScheduler.load_config(root / "scheduler")
    scheduler_class = getattr(diffusers, scheduler_config.get("_class_name", "DDIMScheduler"), None)
    if scheduler_class is None:
        raise ValueError(f"{root / 'scheduler'}: unknown scheduler class {scheduler_config['_class_name']!r}")
    components = Components(
        unet=_load_unet(root / "unet", config.mask_channel, dtype),
        vae=AutoencoderKL.from_pretrained(root / "vae", torch_dtype=dtype, use_safetensors=True),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(
            root / "image_encoder", dtype=dtype, use_safetensors=True
        ),
        feature_extractor=CLIPImageProcessorPil.from_pretrained(root / "feature_extractor"),
        scheduler=scheduler_class.from_config(scheduler_config),
        config=config,
        text_projection=projection,
    )
    return _inference_ready(components)


# --------------------------------------------------------------------------- encoders


def _final_layer_norm(text_encoder: PreTrainedModel) -> nn.Module:
    """transformers 5 hangs ``final_layer_norm`` on CLIPTextModel itself; older ones under ``.text_model``."""
    norm = getattr(text_encoder, "final_layer_norm", None)
    return norm if norm is not None else text_encoder.text_model.final_layer_norm


def encode_text(components: Components, texts: Sequence[str]) -> torch.Tensor:
    """Cross-attention states ``(N, L, cross_attention_dim)`` for ``texts``, on the text encoder's device.

    CLIP towers: penultimate hidden layer through the final layer norm (stock I2VGen-XL);
    ChineseCLIP: last hidden layer with the padding masked. Then the projection, if any.
    """
    input_ids, attention_mask = tokenize(components.tokenizer, texts)
    encoder = components.text_encoder
    device = encoder.device
    if components.config.text_encoder_kind == "chinese_clip":
        states = encoder(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).last_hidden_state
    else:
        hidden = encoder(input_ids=input_ids.to(device), output_hidden_states=True).hidden_states
        states = _final_layer_norm(encoder)(hidden[-2])
    if components.text_projection is not None:
        states = components.text_projection(states.to(components.text_projection.weight.dtype))
    return states


def encode_image_embeddings(components: Components, images: np.ndarray) -> torch.Tensor:
    """CLIP image embeddings ``(N, 1, D)`` of uint8 RGB images ``(N, H, W, 3)``, as stock I2VGen-XL.

    Centre square crop, bilinear resize to the feature extractor's crop size, CLIP mean/std.
    """
    processor = components.feature_extractor
    size = (int(processor.crop_size["width"]), int(processor.crop_size["height"]))
    pixels = []
    for image in images:
        height, width = image.shape[:2]
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        square = Image.fromarray(image[top : top + side, left : left + side])
        pixels.append(np.asarray(square.resize(size, Image.BILINEAR), dtype=np.float32) / 255.0)
    batch = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2)
    mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    encoder = components.image_encoder
    batch = ((batch - mean) / std).to(encoder.device, encoder.dtype)
    return encoder(batch).image_embeds.unsqueeze(1)


def frames_to_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 RGB ``(N, H, W, 3)`` -> float ``(N, 3, H, W)`` in [-1, 1]."""
    return torch.from_numpy(frames.astype(np.float32) / 255.0).permute(0, 3, 1, 2) * 2.0 - 1.0


def encode_frames(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """Scaled latents ``(N, 4, h, w)`` of pixels ``(N, 3, H, W)`` in [-1, 1]: the posterior mean, so no RNG."""
    latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
    return latents * vae.config.scaling_factor


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Pixels ``(N, 3, H, W)`` in about [-1, 1] (float32) from scaled latents, ``chunk_size`` frames at a time."""
    latents = latents / vae.config.scaling_factor
    step = chunk_size or latents.shape[0]
    chunks = [
        vae.decode(latents[i : i + step].to(vae.device, vae.dtype)).sample.float()
        for i in range(0, latents.shape[0], step)
    ]
    return torch.cat(chunks)
