"""`rdtf ...`: the command-line face of the kit. Each subcommand is a thin call into a module."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _color(text: str) -> tuple[int, int, int] | None:
    """``"255,255,255"`` → (255, 255, 255); ``"none"`` keeps alpha."""
    if text.lower() in ("none", "transparent"):
        return None
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(0 <= v <= 255 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected R,G,B with values 0-255, or 'none'")
    return values  # type: ignore[return-value]


def cmd_synth(args: argparse.Namespace) -> None:
    from rdtf.synthetic import build_sticker_set

    out = build_sticker_set(
        args.out, count=args.count, size=args.size, seed=args.seed,
        holdout_motion=None if args.holdout_motion == "none" else args.holdout_motion,
    )
    print(f"built-in sticker set written to {out}")


def cmd_prepare(args: argparse.Namespace) -> None:
    from rdtf.data import prepare_dataset

    report = prepare_dataset(
        args.source, args.out, captions=args.captions, num_frames=args.frames, size=args.size,
        background=args.background, selection=args.selection, workers=args.workers, shard_size=args.shard_size,
    )
    print(report.summary())


def cmd_export(args: argparse.Namespace) -> None:
    from rdtf.export import export_sticker
    from rdtf.io import read_clip

    report = export_sticker(read_clip(args.input), args.output, args.preset)
    print(report.summary())


def _lora_spec(text: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` → (path, scale)."""
    path, _, scale = text.rpartition(":") if ":" in text else (text, "", "1")
    try:
        return path, float(scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected PATH or PATH:SCALE with a number as SCALE") from None


def _pipeline(args: argparse.Namespace):
    import torch

    from rdtf.lora import load_lora
    from rdtf.pipeline import RDTFPipeline

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    pipeline = RDTFPipeline.from_pretrained(args.base, dtype=dtype, device=args.device, offload=args.offload)
    for path, scale in args.lora:
        load_lora(pipeline, path, scale=scale)
    return pipeline


def _sampler_options(args: argparse.Namespace) -> dict:
    return dict(
        prompt=args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
        text_guidance=args.text_guidance, image_guidance=args.image_guidance, scheduler=args.scheduler,
        strength=args.strength, decode=args.decode, seed=args.seed, progress=not args.quiet,
    )


def cmd_sample(args: argparse.Namespace) -> None:
    from rdtf.io import read_clip

    options = _sampler_options(args)
    source = read_clip(args.image) if args.image else None
    if source is not None and source.num_frames > 1 and args.mask is None:
        raise ValueError(f"{args.image}: has {source.num_frames} frames; pass --mask to say which ones are given")
    given = {}
    if source is not None:
        given = {"image": source.frames[0]} if source.num_frames == 1 else {"frames": source.frames}
    pipeline = _pipeline(args)
    clip = pipeline(
        **given, task=args.task, condition_mask=args.mask, num_frames=args.frames, height=args.height,
        width=args.width, fps=args.fps, output_path=args.output, **options,
    )
    print(f"{clip.num_frames} frames at {clip.fps:.1f} fps written to {args.output}")


def cmd_interpolate(args: argparse.Namespace) -> None:
    from rdtf.io import read_clip, write_clip

    clip = read_clip(args.input)
    dense = _pipeline(args).interpolate(clip, args.factor, **_sampler_options(args))
    write_clip(dense, args.output)
    print(f"{clip.num_frames} frames at {clip.fps:.1f} fps -> {dense.num_frames} frames at {dense.fps:.1f} fps: {args.output}")


def cmd_train(args: argparse.Namespace) -> None:
    from rdtf.train import TrainConfig, train

    overrides = _dataclass_overrides(args, TrainConfig)
    config = TrainConfig.from_yaml(args.config, **overrides) if args.config else TrainConfig(**overrides)
    out = train(config)
    print(f"training output in {out}")


def cmd_train_vae(args: argparse.Namespace) -> None:
    from rdtf.autoencoder import METRICS_NAME, AutoencoderConfig, train_autoencoder

    config = AutoencoderConfig(
        data=str(args.data), output_dir=str(args.output_dir), channels=args.channels,
        latent_channels=args.latent_channels, steps=args.steps,
        batch_size=args.batch_size, learning_rate=args.learning_rate, gradient_weight=args.gradient_weight,
        seed=args.seed, progress=not args.quiet,
    )
    folder = train_autoencoder(config)
    print(f"VAE written to {folder}; metrics in {Path(args.output_dir) / METRICS_NAME}")


def cmd_build_tiny(args: argparse.Namespace) -> None:
    from rdtf.tiny import TinyRecipe, build_tiny_model

    recipe = TinyRecipe(**_dataclass_overrides(args, TinyRecipe))
    model, lora = build_tiny_model(recipe, args.work_dir, args.out, progress=not args.quiet, stop_after=args.stop_after,
                                   from_model=args.from_model)
    if args.stop_after:
        print(f"stopped after the {args.stop_after} stage; the work folder is {args.work_dir}")
    else:
        print(f"model in {model}, held-out-motion LoRA in {lora}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from rdtf.backbones import load_backbones
    from rdtf.data import StickerDataset
    from rdtf.evaluate import cases_from_items, evaluate_methods, pipeline_methods
    from rdtf.lora import load_lora
    from rdtf.pipeline import RDTFPipeline
    from rdtf.report import write_report

    if args.mean_of < 1:
        raise ValueError(f"--mean-of {args.mean_of}: must be at least 1 (1: one sample per model only)")
    dataset = StickerDataset(args.data, split=args.split or None)
    items = [dataset[i] for i in range(min(len(dataset), args.limit or len(dataset)))]
    cases = cases_from_items(items, args.tasks)
    backbones = load_backbones(clip_path=args.clip_path, i3d_path=args.i3d_path, lpips_net=args.lpips_net)
    methods = {}
    for spec in args.model:
        name, _, model = spec.partition("=") if "=" in spec else (Path(spec).name, "", spec)
        base, *loras = model.split("+")
        pipeline = RDTFPipeline.from_pretrained(base)
        for path, scale in map(_lora_spec, loras):
            load_lora(pipeline, path, scale=scale)
        methods.update(pipeline_methods(name, pipeline, mean_of=args.mean_of, seed=args.seed,
                                        num_inference_steps=args.steps, progress=False))
    result = evaluate_methods(cases, methods, baselines=not args.no_baselines, backbones=backbones)
    report = write_report(result, args.out)
    print(f"report: {report}")


def cmd_bars(args: argparse.Namespace) -> None:
    from rdtf.bars import BarSettings, measure_quality_bars, write_quality_bars

    settings = BarSettings(**_dataclass_overrides(args, BarSettings))
    results = measure_quality_bars(args.base, args.data, lora=args.lora, settings=settings, progress=not args.quiet)
    path = write_quality_bars(results, args.out)
    print(f"{results['passed']} of {results['total']} quality bars met: {path}")


def cmd_gallery(args: argparse.Namespace) -> None:
    from rdtf.gallery import build_gallery

    readme = None if args.no_readme else args.readme
    markdown = build_gallery(
        args.base, args.data, args.out, readme=readme, split=args.split, count=args.count, seed=args.seed,
        exclude_motions=args.exclude_motions, num_inference_steps=args.steps, scheduler=args.scheduler,
        text_guidance=args.text_guidance, image_guidance=args.image_guidance, strength=args.strength,
        decode=args.decode, device=args.device, progress=not args.quiet,
    )
    print(f"gallery written to {markdown}" + (f"; {readme} updated between its gallery markers" if readme else ""))


def cmd_demo(args: argparse.Namespace) -> None:
    from rdtf.demo import run_demo

    run_demo(Path(args.workdir), smoke=args.smoke)


def _add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default="assets/rdtf-tiny", help="model folder or hub id (ali-vilab/i2vgen-xl)")
    parser.add_argument("--lora", type=_lora_spec, action="append", default=[], metavar="PATH[:SCALE]")
    parser.add_argument("--prompt", default="")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's recommended settings)")
    parser.add_argument("--text-guidance", type=float, help="default: the model's recommended settings")
    parser.add_argument("--image-guidance", type=float, help="default: the model's recommended settings")
    parser.add_argument("--scheduler", choices=["ddim", "dpm++", "euler"], help="default: the model's recommended one")
    parser.add_argument("--strength", type=float,
                        help="1 = start from pure noise; lower = from the given frames, partly noised "
                             "(default: the model's recommended settings)")
    parser.add_argument("--decode", choices=["direct", "residual"],
                        help="residual: decode only the model's change on top of the given frames "
                             "(default: the model's recommended settings)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--offload", action="store_true", help="keep idle components on the CPU (small GPUs)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_dataclass_arguments(parser: argparse.ArgumentParser, config_class: type) -> None:
    """One flag per field of a config dataclass (``--max-steps``, ``--lora-rank``, ...), default None = keep."""
    import dataclasses

    for spec in dataclasses.fields(config_class):
        flag = "--" + spec.name.replace("_", "-")
        kind = str(spec.type)
        if kind == "bool":
            parser.add_argument(flag, dest=spec.name, action=argparse.BooleanOptionalAction, default=None)
        elif kind.startswith("list"):
            item = {"list[int]": int, "list[float]": float}.get(kind, str)
            parser.add_argument(flag, dest=spec.name, type=item, nargs="*", default=None)
        else:
            number = int if kind.startswith("int") else float if kind.startswith("float") else str
            parser.add_argument(flag, dest=spec.name, type=number, default=None)


def _dataclass_overrides(args: argparse.Namespace, config_class: type) -> dict:
    import dataclasses

    fields = {spec.name for spec in dataclasses.fields(config_class)}
    return {name: value for name, value in vars(args).items() if name in fields and value is not None}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole CLI; with ``command`` named, only that subcommand's config flags are built.

    Those flags come from dataclasses in modules that import torch and diffusers, so
    ``rdtf --help`` and light commands (synth, prepare, export) skip them and start fast.
    """
    parser = argparse.ArgumentParser(prog="rdtf", description=__doc__)

    def wanted(name: str) -> bool:
        return command is None or command == name

    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth", help="build the built-in sticker set (OpenMoji art, known motions)")
    synth.add_argument("out", type=Path)
    synth.add_argument("--count", type=int, default=600)
    synth.add_argument("--size", type=int, default=64)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--holdout-motion", default="spin", help="motion kept out of base training ('none' for none)")
    synth.set_defaults(func=cmd_synth)

    prepare = commands.add_parser("prepare", help="turn a folder of stickers + captions into a training dataset")
    prepare.add_argument("source", type=Path)
    prepare.add_argument("out", type=Path)
    prepare.add_argument("--captions", type=Path, help="CSV or JSONL (default: SOURCE/captions.jsonl or .csv)")
    prepare.add_argument("--frames", type=int, default=8)
    prepare.add_argument("--size", type=int, default=64)
    prepare.add_argument("--background", type=_color, default=(255, 255, 255), help="R,G,B or 'none' to keep alpha")
    prepare.add_argument("--selection", default="uniform", choices=["uniform", "max_change", "cluster"])
    prepare.add_argument("--workers", type=int, default=1)
    prepare.add_argument("--shard-size", type=int, help="also write WebDataset-style tar shards of this many stickers")
    prepare.set_defaults(func=cmd_prepare)

    export = commands.add_parser("export", help="convert a sticker to a platform preset within its limits")
    export.add_argument("input", type=Path)
    export.add_argument("output", type=Path)
    export.add_argument("--preset", required=True, choices=["whatsapp", "telegram"])
    export.set_defaults(func=cmd_export)

    sample = commands.add_parser("sample", help="generate a sticker for any task (i2v, it2v, t2v, interpolation, ...)")
    sample.add_argument("--image", type=Path, help="a still (i2v/it2v) or a clip whose --mask frames are given")
    sample.add_argument("--task", choices=["i2v", "it2v", "t2v", "interpolation", "predict_forward", "predict_backward"])
    sample.add_argument("--mask", help="explicit condition mask, e.g. 10101010 (overrides the task's default)")
    sample.add_argument("--frames", type=int, default=None)
    sample.add_argument("--height", type=int, default=None)
    sample.add_argument("--width", type=int, default=None)
    sample.add_argument("--fps", type=float, default=8.0)
    sample.add_argument("--output", "-o", type=Path, required=True, help=".gif .webp .png .mp4 .webm")
    _add_sampler_arguments(sample)
    sample.set_defaults(func=cmd_sample)

    interpolate = commands.add_parser("interpolate", help="raise a low-fps sticker's frame rate 2x/3x/4x")
    interpolate.add_argument("input", type=Path)
    interpolate.add_argument("output", type=Path)
    interpolate.add_argument("--factor", type=int, default=2, choices=[2, 3, 4])
    _add_sampler_arguments(interpolate)
    interpolate.set_defaults(func=cmd_interpolate)

    train = commands.add_parser("train", help="LoRA fine-tuning or from-scratch training (accelerate launch for GPUs)")
    train.add_argument("--config", type=Path, help="YAML file of TrainConfig fields (flags override it)")
    if wanted("train"):
        from rdtf.train import TrainConfig

        _add_dataclass_arguments(train, TrainConfig)
    train.set_defaults(func=cmd_train)

    vae = commands.add_parser("train-vae", help="train the tiny VAE of a from-scratch model on a dataset's frames")
    vae.add_argument("--data", type=Path, required=True, help="a prepared dataset (its train split is used)")
    vae.add_argument("--output-dir", type=Path, default=Path("runs/vae"))
    vae.add_argument("--channels", type=int, nargs="+", default=[32, 64, 64])
    vae.add_argument("--latent-channels", type=int, default=4)
    vae.add_argument("--steps", type=int, default=2000)
    vae.add_argument("--batch-size", type=int, default=32)
    vae.add_argument("--learning-rate", type=float, default=1e-3)
    vae.add_argument("--gradient-weight", type=float, default=1.0, help="weight of the image-gradient L1 term")
    vae.add_argument("--seed", type=int, default=0)
    vae.add_argument("--quiet", action="store_true", help="no progress bar")
    vae.set_defaults(func=cmd_train_vae)

    tiny = commands.add_parser("build-tiny", help="reproduce the embedded rdtf-tiny model and its LoRA from a seed")
    tiny.add_argument("--work-dir", type=Path, default=Path("runs/rdtf-tiny"), help="stages and checkpoints (resumable)")
    tiny.add_argument("--out", type=Path, default=Path("assets/rdtf-tiny"), help="the shipped model folder")
    tiny.add_argument("--quiet", action="store_true", help="no progress bars")
    tiny.add_argument("--stop-after", choices=("data", "vae", "init", "base", "lora", "sweep"),
                      help="run the stages up to this one only (rerun without it to continue)")
    tiny.add_argument("--from-model", type=Path,
                      help="start a new work folder from a model this recipe shipped (e.g. assets/rdtf-tiny): its "
                           "record stands in for its stages, so an appended refine phase trains on from its weights")
    if wanted("build-tiny"):
        from rdtf.tiny import TinyRecipe

        _add_dataclass_arguments(tiny, TinyRecipe)
    tiny.set_defaults(func=cmd_build_tiny)

    evaluate = commands.add_parser("evaluate", help="score models and baselines against ground truth; HTML report")
    evaluate.add_argument("--data", required=True, type=Path, help="a prepared dataset")
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--model", action="append", default=[], metavar="[NAME=]BASE[+LORA[:SCALE]...]",
                          help="a model to score, with optional LoRAs; repeat to compare (e.g. base vs base+LoRA)")
    evaluate.add_argument("--tasks", nargs="+", default=["i2v", "it2v", "interpolation", "predict_forward"])
    evaluate.add_argument("--steps", type=int, help="denoising steps (default: each model's recommended settings)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--limit", type=int, help="evaluate only the first N clips")
    evaluate.add_argument("--mean-of", type=int, default=1, metavar="N",
                          help="also score each model's mean of N samples (seeds SEED..SEED+N-1), NAME-meanN")
    evaluate.add_argument("--out", type=Path, default=Path("reports/evaluation"))
    evaluate.add_argument("--no-baselines", action="store_true")
    evaluate.add_argument("--clip-path", type=Path, help="local CLIP model folder (enables CLIP scores)")
    evaluate.add_argument("--i3d-path", type=Path, help="local I3D TorchScript file (enables FVD)")
    evaluate.add_argument("--lpips-net", default=None, help="LPIPS trunk if the lpips package and weights are installed")
    evaluate.set_defaults(func=cmd_evaluate)

    bars = commands.add_parser("bars", help="a model card's quality bars on held-out clips (vs baselines, LoRA, steps)")
    bars.add_argument("--base", default="assets/rdtf-tiny", help="model folder")
    bars.add_argument("--lora", type=Path, help="the held-out-motion LoRA (adds the LoRA bars)")
    bars.add_argument("--data", type=Path, default=Path("runs/rdtf-tiny/data"), help="a prepared built-in dataset")
    bars.add_argument("--out", type=Path, default=Path("reports/bars"), help="quality_bars.json and .md go here")
    bars.add_argument("--quiet", action="store_true", help="no progress bars")
    if wanted("bars"):
        from rdtf.bars import BarSettings

        _add_dataclass_arguments(bars, BarSettings)
    bars.set_defaults(func=cmd_bars)

    gallery = commands.add_parser("gallery", help="regenerate the README's sample gallery (i2v, it2v, interpolation)")
    gallery.add_argument("--base", default="assets/rdtf-tiny", help="model folder or hub id (ali-vilab/i2vgen-xl)")
    gallery.add_argument("--data", type=Path, default=Path("runs/rdtf-tiny/data"),
                         help="a prepared dataset (default: the one `rdtf build-tiny` prepares)")
    gallery.add_argument("--out", type=Path, default=Path("assets/gallery"), help="where the pictures and gallery.md go")
    gallery.add_argument("--readme", type=Path, default=Path("README.md"), help="its gallery markers get the tables")
    gallery.add_argument("--no-readme", action="store_true", help="write only OUT/gallery.md")
    gallery.add_argument("--split", default="test")
    gallery.add_argument("--count", type=int, default=6, help="clips shown in each table")
    gallery.add_argument("--seed", type=int, default=0, help="picks the clips and seeds the sampler")
    gallery.add_argument("--exclude-motions", nargs="*", default=["spin"], metavar="MOTION",
                         help="motions never shown (default: the one held out of base training)")
    gallery.add_argument("--steps", type=int, help="default: the model's recommended settings")
    gallery.add_argument("--scheduler", choices=["ddim", "dpm++", "euler"], help="default: the model's recommended one")
    gallery.add_argument("--text-guidance", type=float, help="default: the model's recommended settings")
    gallery.add_argument("--image-guidance", type=float, help="default: the model's recommended settings")
    gallery.add_argument("--strength", type=float, help="default: the model's recommended settings")
    gallery.add_argument("--decode", choices=["direct", "residual"], help="default: the model's recommended one")
    gallery.add_argument("--device", default="cpu")
    gallery.add_argument("--quiet", action="store_true", help="no progress bar")
    gallery.set_defaults(func=cmd_gallery)

    demo = commands.add_parser("demo", help="the main job: built-in data → reports/ on the embedded model")
    demo.add_argument("--workdir", default=".", help="where data/ and reports/ are written")
    demo.add_argument("--smoke", action="store_true", help="tiny sizes, for tests")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((token for token in argv if not token.startswith("-")), "")
    args = build_parser(command).parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"rdtf {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
