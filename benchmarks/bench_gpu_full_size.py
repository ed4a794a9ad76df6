"""The full-size I2VGen-XL architecture (random weights) on a GPU: sampling speed and memory, LoRA training memory.

Random weights cost the same time and memory as trained ones, so no download is needed.

1. Sampling (bf16, DDIM, two guidance scales batched as the pipeline does): seconds per clip and peak
   GPU memory for 8 frames at 256x256 and 16 frames at 512x512, with and without offload.
2. One LoRA training step (rank 16 on attention, fp32 base weights with bf16 autocast, every component on
   the GPU, as ``rdtf train`` runs it): peak GPU memory and seconds per step at batch 1, with and without
   gradient checkpointing. The goal from the training issue: 8x256x256 fits in 24 GB.

Rows run in that order and the table is rewritten after each, so a run cut short keeps what it measured;
rows that would start past ``--budget`` seconds are listed as skipped.
Writes benchmarks/results/gpu_full_size.md. Usage on a GPU machine:
``python benchmarks/bench_gpu_full_size.py [--steps 50] [--out FILE]``; ``--scale tiny`` is a CPU smoke run.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, I2VGenXLUNet
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

from rdtf.conditioning import conditioning_latents
from rdtf.lora import attach_lora
from rdtf.models import Components, add_mask_channel, build_tiny_components
from rdtf.pipeline import RDTFPipeline
from rdtf.train import enable_block_checkpointing

RESULTS = Path(__file__).parent / "results" / "gpu_full_size.md"
SIZES = ["8x256", "16x512"]  # frames x side: the two sizes the issues ask for


def full_size_components(scale: str) -> Components:
    """I2VGen-XL's UNet, OpenCLIP-ViT-H-sized text and image towers and the SD VAE, randomly initialised.

    Tokenizer, scheduler and glue come from the kit's tiny builder (the byte tokenizer, 128 positions);
    the real base's 49408-token vocabulary would add 50 M parameters to the text embedding, 2% of the total.
    ``scale="tiny"`` shrinks every width so the same code runs on a CPU in seconds.
    """
    full = scale == "full"
    glue = build_tiny_components(0, max_text_length=128, condition_fill="interpolate")
    unet = I2VGenXLUNet(
        sample_size=32,
        block_out_channels=(320, 640, 1280, 1280) if full else (32, 32, 64, 64),
        attention_head_dim=64 if full else 8,
        norm_num_groups=32 if full else 8,
        cross_attention_dim=1024 if full else 64,
    )
    add_mask_channel(unet)
    text_width = 1024 if full else 64
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(glue.tokenizer), hidden_size=text_width, intermediate_size=4 * text_width,
        num_hidden_layers=23 if full else 2, num_attention_heads=16 if full else 2, max_position_embeddings=128,
        hidden_act="gelu", projection_dim=text_width, bos_token_id=glue.tokenizer.bos_token_id,
        eos_token_id=glue.tokenizer.eos_token_id, pad_token_id=glue.tokenizer.pad_token_id,
    ))
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=1280 if full else 32, intermediate_size=5120 if full else 64, num_hidden_layers=32 if full else 2,
        num_attention_heads=16 if full else 2, image_size=224, patch_size=14, projection_dim=text_width,
        hidden_act="gelu",
    ))
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512) if full else (8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2 if full else 1, norm_num_groups=32 if full else 4, latent_channels=4, sample_size=512,
        scaling_factor=0.18215,
    )
    feature_extractor = type(glue.feature_extractor)(crop_size={"height": 224, "width": 224},
                                                      size={"shortest_edge": 224})
    components = dataclasses.replace(glue, unet=unet, vae=vae, text_encoder=text_encoder,
                                     image_encoder=image_encoder, feature_extractor=feature_extractor)
    for module in components.modules().values():
        module.eval().requires_grad_(False)
    return components


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def lora_step(unet: I2VGenXLUNet, hidden: int, frames: int, side: int, device: torch.device) -> dict:
    """Peak memory and time of training steps as ``rdtf.train`` runs them (loss on every frame, i2v mask)."""
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    latent_side = side // 8
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, frames, latent_side, latent_side, generator=generator).to(device)
    mask = torch.zeros(1, frames, device=device)
    mask[:, 0] = 1
    text = torch.randn(1, 128, hidden, generator=generator).to(device)
    image_embeds = torch.randn(1, 1, hidden, generator=generator).to(device)
    _reset_peak(device)
    times = []
    for _ in range(3):  # the first step allocates the optimizer state and tunes kernels; time the last two
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            prediction = unet(
                latents, torch.tensor([500], device=device), fps=torch.tensor([8.0], device=device),
                image_latents=conditioning_latents(latents, mask, True, "interpolate"),
                image_embeddings=image_embeds, encoder_hidden_states=text, return_dict=False,
            )[0]
            loss = F.mse_loss(prediction.float(), latents)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"peak_gb": _peak_gb(device), "seconds": float(np.mean(times[1:]))}


def sample(pipe: RDTFPipeline, frames: int, side: int, steps: int, device: torch.device) -> dict:
    image = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    options = {"image": image, "prompt": "a cat waving its paw", "num_frames": frames, "height": side, "width": side,
               "scheduler": "ddim", "text_guidance": 9.0, "image_guidance": 1.5, "strength": 1.0, "decode": "direct",
               "progress": False}
    pipe.generate(**options, num_inference_steps=2)  # warm-up: kernel selection, caches of the prompt and image
    _reset_peak(device)
    _sync(device)
    start = time.perf_counter()
    pipe.generate(**options, num_inference_steps=steps, seed=1)
    _sync(device)
    return {"peak_gb": _peak_gb(device), "seconds": time.perf_counter() - start}


def _write(path: Path, header: list[str], rows: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(header + rows + [""]), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--scale", choices=("full", "tiny"), default="full")
    parser.add_argument("--budget", type=float, default=float("inf"), help="seconds; later rows are skipped")
    parser.add_argument("--sizes", nargs="+", default=SIZES, help="FRAMESxSIDE, e.g. 8x256")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    sizes = [tuple(int(n) for n in size.split("x")) for size in args.sizes]
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and args.scale == "full":
        print("bench_gpu_full_size: no GPU here, skipped; the last GPU run's results are in "
              "benchmarks/results/gpu_full_size.md (--scale tiny runs a CPU smoke test)")
        return
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: seconds instead of a minute of CPU init
        components = full_size_components(args.scale)
    params = {name: sum(p.numel() for p in m.parameters()) / 1e6 for name, m in components.modules().items()}
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    header = [
        "# Full-size I2VGen-XL architecture on a GPU (random weights)",
        "",
        f"Command: `python benchmarks/bench_gpu_full_size.py --steps {args.steps}`" + (
            f" `--scale {args.scale}`" if args.scale != "full" else ""),
        "",
        f"Card: {card}; torch {torch.__version__}, Python {platform.python_version()}. Parameters (millions): "
        + ", ".join(f"{name} {count:.0f}" for name, count in params.items()) + ".",
        "",
        ("Sampling: bf16 weights, DDIM, text guidance 9 and image guidance 1.5 (three UNet branches in one batch), "
        "i2v from pure noise, the whole clip decoded in chunks of 8 frames; one warm-up call (2 steps) first. "
        "Offload keeps each component on the CPU until it runs. LoRA step: batch 1, rank 16 on attention, fp32 base "
        "with bf16 autocast, AdamW; every component on the GPU as in `rdtf train`; mean of steps 2-3."),
        "",
        "| run | frames x size | seconds | peak GPU memory (GiB) |",
        "| --- | --- | ---: | ---: |",
    ]
    rows: list[str] = []
    # sampling uses bf16 copies; training rows share one fp32 UNet with the adapter, checkpointing switched on last
    # (kept on the CPU until the training rows are done, so no row's peak counts the other's weights)
    sampling = dataclasses.replace(components, **{k: copy.deepcopy(m).to("cpu", torch.bfloat16)
                                                  for k, m in components.modules().items()})
    attach_lora(components.unet, rank=16, preset="attention")
    components.unet.train()
    runs = [("lora", frames, side, checkpointing) for checkpointing in (False, True) for frames, side in sizes]
    runs += [("sample", frames, side, offload) for offload in (False, True) for frames, side in sizes]
    pipes: dict[bool, RDTFPipeline] = {}
    for kind, frames, side, flag in runs:
        name = (f"LoRA training step{' + gradient checkpointing' if flag else ''}" if kind == "lora"
                else f"sampling, {args.steps} steps{', offload' if flag else ''}")
        if time.perf_counter() - started > args.budget:
            rows.append(f"| {name} | {frames} x {side}x{side} | skipped (time budget) | |")
            continue
        try:
            if kind == "lora":
                if flag and not getattr(components.unet, "_rdtf_checkpointing", False):
                    enable_block_checkpointing(components.unet)
                    components.unet._rdtf_checkpointing = True
                result = lora_step(components.unet, components.text_encoder.config.hidden_size, frames, side, device)
            else:
                if components is not None:  # training rows done: free the fp32 weights
                    components = None
                    gc.collect()
                    _reset_peak(device)
                if flag not in pipes:
                    pipes.clear()
                    pipes[flag] = RDTFPipeline(sampling, device=device, offload=flag)
                result = sample(pipes[flag], frames, side, args.steps, device)
            rows.append(f"| {name} | {frames} x {side}x{side} | {result['seconds']:.2f} | {result['peak_gb']:.1f} |")
        except torch.OutOfMemoryError:
            rows.append(f"| {name} | {frames} x {side}x{side} | out of memory | |")
        except Exception as error:  # noqa: BLE001 - one broken row must not lose the others' numbers
            rows.append(f"| {name} | {frames} x {side}x{side} | failed: {type(error).__name__}: {error} | |")
        _write(args.out, header, rows)
        print(rows[-1], f"({time.perf_counter() - started:.0f} s)", flush=True)
    _write(args.out, header, rows + ["", f"Whole run: {time.perf_counter() - started:.0f} s."])


if __name__ == "__main__":
    main()
