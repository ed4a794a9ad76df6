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


def cmd_demo(args: argparse.Namespace) -> None:
    from rdtf.demo import run_demo

    run_demo(Path(args.workdir), smoke=args.smoke)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rdtf", description=__doc__)
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

    demo = commands.add_parser("demo", help="the main job: built-in data → reports/ on the embedded model")
    demo.add_argument("--workdir", default=".", help="where data/ and reports/ are written")
    demo.add_argument("--smoke", action="store_true", help="tiny sizes, for tests")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"rdtf {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
