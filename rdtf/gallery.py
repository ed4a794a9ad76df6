"""The README's showcase gallery, regenerated from a model the way a model card shows samples.

:func:`build_gallery` picks a few clips of a prepared dataset, runs the model on three tasks
(i2v, it2v, 2x interpolation) and writes the stills, the ground truth and the generated
GIFs next to ``gallery.md``, three tables that say which model, split, seed and sampler
made them. The README shows the same tables between two markers, so every picture a
reader sees is one command (``rdtf gallery``) away from being reproduced or refreshed.
"""

from __future__ import annotations

import html
import io
import os
import shlex
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any
from urllib.parse import quote

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from rdtf.data import StickerDataset
from rdtf.evaluate import frames_from_item
from rdtf.io import Clip, write_atomic, write_clip
from rdtf.pipeline import RDTFPipeline, check_sampler_settings

MARKER_START = "<!-- gallery:start -->"
MARKER_END = "<!-- gallery:end -->"
GALLERY_FILE = "gallery.md"
GALLERY_TASKS = {"sticker + description": "it2v", "static sticker → animated": "i2v", "2× interpolation": "interpolation"}
#: Shown width in pixels: stickers are small, and a table of 32-64 px GIFs is hard to read.
DISPLAY_WIDTH = 128
#: Interpolation keeps every 2nd frame and needs two kept frames with one to fill between them.
MIN_REAL_FRAMES = 3


@dataclass(frozen=True)
class _Shown:
    """One gallery clip: its captions, which one was the it2v prompt, and the files it got."""

    key: str
    caption_en: str
    caption_zh: str
    prompt_language: str  # "en" or "zh"
    files: dict[str, Path]


def _file_names(out: Path, key: str) -> dict[str, Path]:
    """Per-table folders, as in the seed README: names derive from the dataset key only."""
    return {
        "still": out / "still" / f"{key}.png",
        "i2v": out / "i2v" / f"{key}.gif",
        "it2v_gt": out / "it2v" / f"{key}_gt.gif",
        "it2v_pred": out / "it2v" / f"{key}_pred.gif",
        "interp_low": out / "interpolation" / f"{key}_low.gif",
        "interp_pred": out / "interpolation" / f"{key}_pred.gif",
        "interp_gt": out / "interpolation" / f"{key}_gt.gif",
    }


def build_gallery(
    model: str | os.PathLike,
    data: str | os.PathLike,
    out_dir: str | os.PathLike = "assets/gallery",
    *,
    readme: str | os.PathLike | None = "README.md",
    split: str = "test",
    count: int = 6,
    seed: int = 0,
    exclude_motions: Sequence[str] = ("spin",),
    num_inference_steps: int | None = None,
    scheduler: str | None = None,
    text_guidance: float | None = None,
    image_guidance: float | None = None,
    strength: float | None = None,
    decode: str | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> Path:
    """Generate the gallery into ``out_dir`` and return the ``gallery.md`` written there.

    ``count`` clips of ``split`` are picked from ``seed`` (a seeded shuffle, then each next
    clip the one whose emoji and motion repeat least), skipping motions in
    ``exclude_motions`` (by default the motion held out of base training) and clips with
    fewer than 3 real frames. Every clip appears in all three tables; half of the it2v rows
    are prompted with the English caption and half with the Chinese one. Sampling uses
    ``seed`` and the given sampler settings (None: the model's recommended ones for each task). With ``readme``, the text between
    ``<!-- gallery:start -->`` and ``<!-- gallery:end -->`` there is replaced by the same
    tables with paths relative to the README, and nothing else in it changes. All inputs
    are checked before the model loads; every file is written atomically.
    """
    if isinstance(exclude_motions, str):
        exclude_motions = (exclude_motions,)
    _check_settings(count, num_inference_steps, scheduler, text_guidance, image_guidance, strength, decode)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir={str(out)!r}: is a file, expected a folder")
    readme_path = None if readme is None else Path(readme)
    if readme_path is not None:
        _split_at_markers(readme_path)  # fail now, not after the generations
    dataset = StickerDataset(data, split=split)
    picked = _pick(dataset, count, seed, exclude_motions, source=f"split={split!r} of {data}")
    pipeline = RDTFPipeline.from_pretrained(model, device=device)
    chosen = dict(num_inference_steps=num_inference_steps, scheduler=scheduler, text_guidance=text_guidance,
                  image_guidance=image_guidance, strength=strength, decode=decode)
    given = {k: v for k, v in chosen.items() if v is not None}  # the rest: the model's, per task
    sampler: dict[str, Any] = {**given, "seed": seed, "progress": False}
    shown = []
    with tqdm(total=3 * len(picked), desc="gallery", unit="sample", disable=not progress) as bar:
        for number, index in enumerate(picked):
            item = dataset[index]
            bar.set_postfix_str(item["key"])
            shown.append(_render_clip(pipeline, item, out, "en" if number % 2 == 0 else "zh", sampler, bar))

    # each table's settings (the model may recommend some per task), named where they differ from it2v's
    used = {label: {**pipeline.sampler_settings_for(task), **given} for label, task in GALLERY_TASKS.items()}
    it2v = used.pop("sticker + description")
    settings = f"seed {seed}; " + _describe(it2v) + "".join(
        f"; {label}: {_describe(options)}" for label, options in used.items() if options != it2v)
    flags = []  # only the settings given: the rest come from the model's config, as above
    for flag, value in (("steps", num_inference_steps), ("scheduler", scheduler), ("text-guidance", text_guidance),
                        ("image-guidance", image_guidance), ("strength", strength), ("decode", decode)):
        if value is not None:
            flags += [f"--{flag}", f"{value:g}" if isinstance(value, float) else str(value)]
    command = shlex.join(
        ["rdtf", "gallery", "--base", str(model), "--data", str(data), "--out", str(out)]
        + (["--no-readme"] if readme_path is None else ["--readme", str(readme_path)])
        + ["--split", split, "--count", str(count), "--seed", str(seed), *flags]
        + ["--exclude-motions", *exclude_motions]
    )
    provenance = (
        f"Generated by model `{model}` on the `{split}` split of `{data}` ({settings}). "
        f"Regenerate with `{command}`."
    )
    gallery = out / GALLERY_FILE
    write_atomic(gallery, _markdown(shown, out, provenance).encode())
    if readme_path is not None:
        head, tail = _split_at_markers(readme_path)  # read again: the README may have changed meanwhile
        block = _markdown(shown, readme_path.parent, provenance)
        write_atomic(readme_path, f"{head}\n{block}\n{tail}".encode())
    return gallery


def _describe(sampler: dict[str, Any]) -> str:
    steps = sampler["num_inference_steps"]
    return (f"{steps} {sampler['scheduler']} step{'s' if steps != 1 else ''}, text guidance {sampler['text_guidance']:g}, "
            f"image guidance {sampler['image_guidance']:g}, start strength {sampler['strength']:g}, "
            f"{sampler['decode']} decode")


def _check_settings(
    count: int, steps: int | None, scheduler: str | None, text_guidance: float | None, image_guidance: float | None,
    strength: float | None, decode: str | None,
) -> None:
    """Checks of the given settings (None: the model's, checked when it loads)."""
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count={count!r}: must be an integer >= 1")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"num_inference_steps={steps!r}: must be an integer >= 1")
    check_sampler_settings(scheduler=scheduler, text_guidance=text_guidance, image_guidance=image_guidance,
                           strength=strength, decode=decode)


def _split_at_markers(path: Path) -> tuple[str, str]:
    """The README up to and including the start marker, and from the end marker on."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"readme={str(path)!r}: not UTF-8 text ({error.reason})") from None
    start, end = text.find(MARKER_START), text.find(MARKER_END)
    if text.count(MARKER_START) != 1 or text.count(MARKER_END) != 1 or end < start:
        raise ValueError(
            f"readme={str(path)!r}: needs exactly one {MARKER_START} followed by one {MARKER_END}; "
            "the gallery replaces only the text between them"
        )
    return text[: start + len(MARKER_START)], text[end:]


def _pick(dataset: StickerDataset, count: int, seed: int, exclude_motions: Sequence[str], source: str) -> list[int]:
    """Dataset indices of ``count`` eligible clips: seeded shuffle, then fewest repeated emoji + motions first."""
    rows = dataset.rows

    def emoji(i: int) -> str:
        return rows[i].get("emoji", rows[i]["key"])  # user datasets without the field: every clip its own

    def motion(i: int) -> str | None:
        return rows[i].get("motion")

    def eligible(i: int) -> bool:
        real = sum(rows[i]["loss_mask"][: dataset.num_frames])
        return motion(i) not in exclude_motions and real >= MIN_REAL_FRAMES

    candidates = [i for i in range(len(rows)) if eligible(i)]
    if len(candidates) < count:
        raise ValueError(
            f"count={count}: only {len(candidates)} of the {len(rows)} clips in {source} are eligible "
            f"(motion not in {list(exclude_motions)}, at least {MIN_REAL_FRAMES} real frames)"
        )
    order = [candidates[i] for i in np.random.default_rng(seed).permutation(len(candidates))]
    emoji_seen: Counter[str] = Counter()
    motion_seen: Counter[str | None] = Counter()
    picked = []
    for _ in range(count):
        best = min(order, key=lambda i: emoji_seen[emoji(i)] + motion_seen[motion(i)])  # ties: shuffle order
        order.remove(best)
        picked.append(best)
        emoji_seen[emoji(best)] += 1
        motion_seen[motion(best)] += 1
    return picked


def _render_clip(
    pipeline: RDTFPipeline, item: dict[str, Any], out: Path, language: str, sampler: dict[str, Any], bar: tqdm
) -> _Shown:
    """Write one clip's still, ground truth and three generations (i2v, it2v, interpolation)."""
    frames = frames_from_item(item)[item["loss_mask"].numpy() > 0]
    fps = float(item["fps"])
    files = _file_names(out, item["key"])
    still = frames[0]
    _write_png(still, files["still"])

    pipeline(image=still, task="i2v", fps=fps, output_path=files["i2v"], **sampler)
    bar.update()

    captions = {"en": item["caption_en"], "zh": item["caption_zh"]}
    if not captions[language]:  # a dataset with one language only: prompt with the one it has
        language = "zh" if language == "en" else "en"
    write_clip(Clip.from_fps(frames, fps), files["it2v_gt"])
    pipeline(
        image=still, prompt=captions[language], task="it2v", num_frames=len(frames), fps=fps,
        output_path=files["it2v_pred"], **sampler,
    )
    bar.update()

    # An odd length keeps both ends among every 2nd frame, so the interpolation spans the whole truth.
    truth = frames[: len(frames) - 1 + len(frames) % 2]
    low = Clip.from_fps(truth[::2], fps / 2)
    write_clip(low, files["interp_low"])
    write_clip(Clip.from_fps(truth, fps), files["interp_gt"])
    write_clip(pipeline.interpolate(low, 2, **sampler), files["interp_pred"])
    bar.update()
    return _Shown(item["key"], captions["en"], captions["zh"], language, files)


def _write_png(frame: np.ndarray, path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(frame, "RGBA").save(buffer, "PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buffer.getvalue())


def _markdown(shown: Sequence[_Shown], base: Path, provenance: str) -> str:
    """The three tables, with image paths relative to ``base`` (the folder of the file that shows them)."""
    base = base.resolve()

    def img(clip: _Shown, role: str) -> str:
        relative = PurePath(os.path.relpath(clip.files[role].resolve(), base)).as_posix()
        return f'<img src="{html.escape(quote(relative))}" width="{DISPLAY_WIDTH}" alt="{clip.key} {role}">'

    def row(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    def caption(clip: _Shown) -> str:
        parts = []
        for language, label, text in (("en", "English", clip.caption_en), ("zh", "中文", clip.caption_zh)):
            text = html.escape(text).replace("|", "\\|").replace("\n", " ")
            parts.append(f"**{label} (prompt):** {text}" if language == clip.prompt_language else f"{label}: {text}")
        return "<br>".join(parts)

    lines = [provenance, "", "### Animating a static sticker (i2v)", ""]
    lines += [row(["static sticker", "animated (i2v)"] * 2), row(["---"] * 4)]
    for start in range(0, len(shown), 2):
        pair = shown[start : start + 2]
        cells = [cell for clip in pair for cell in (img(clip, "still"), img(clip, "i2v"))]
        lines.append(row(cells + [" "] * (4 - len(cells))))
    lines += ["", "### Static sticker + description (it2v)", ""]
    lines += [row(["description", "static sticker", "ground truth", "generated (it2v)"]), row(["---"] * 4)]
    lines += [row([caption(c), img(c, "still"), img(c, "it2v_gt"), img(c, "it2v_pred")]) for c in shown]
    lines += ["", "### Frame interpolation (2x frame rate)", ""]
    lines += [row(["low fps (every 2nd frame)", "interpolated", "ground truth"]), row(["---"] * 3)]
    lines += [row([img(c, "interp_low"), img(c, "interp_pred"), img(c, "interp_gt")]) for c in shown]
    return "\n".join(lines) + "\n"
