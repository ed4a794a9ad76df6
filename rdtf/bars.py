"""Quality bars of a model card: does a model beat the baselines on clips it never saw?

:func:`measure_quality_bars` scores a model (and optionally its held-out-motion LoRA) on a
prepared dataset's held-out split with :func:`rdtf.evaluate.evaluate_methods`, plus three
checks a plain per-clip table cannot make:

* text control: one image, several motion captions; the clip made from each caption must
  be closer to that caption's ground truth than to the others'. The other motions' ground
  truths come from :mod:`rdtf.synthetic` (same emoji, background, speed and fps; every
  motion starts from the rest pose, so the image is the same), so this needs a built-in set;
* LoRA: the held-out motion with and without the LoRA, and every other motion too;
* step count: DPM-Solver++ at growing step counts against DDIM at 50 steps.

Every bar is a row ``{"bar", "measured", "target", "passed", "detail"}``; :func:`write_quality_bars`
writes them (JSON + Markdown) next to the settings that produced them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from rdtf.cases import EvalCase
from rdtf.data import StickerDataset
from rdtf.evaluate import bootstrap_ci, cases_from_items, evaluate_methods, pipeline_method
from rdtf.io import composite_over, write_atomic
from rdtf.lora import load_lora, set_lora_scale
from rdtf.masks import interpolation_mask
from rdtf.metrics import frame_mse, psnr_from_mse
from rdtf.pipeline import RDTFPipeline
from rdtf.synthetic import MOTION_KINDS, StickerSpec, is_learnable, render_motion

BARS_NAME = "quality_bars"
WHITE = (255, 255, 255)


@dataclass
class BarSettings:
    """What the bars are measured on and with; saved with the results."""

    split: str = "test"  # "" = every split
    holdout_motion: str = "spin"
    clips: int | None = 40  # clips per task for the task bars (None: the whole split)
    # sampler; None: the model's recommended settings (rdtf_config.json)
    num_inference_steps: int | None = None
    scheduler: str | None = None
    text_guidance: float | None = None
    image_guidance: float | None = None
    strength: float | None = None
    decode: str | None = None
    text_control_images: int = 12
    text_control_motions: int = 4
    lora_clips: int = 24  # per side: held-out-motion clips and other clips
    step_counts: list[int] = field(default_factory=lambda: [5, 10, 15, 20, 25])
    step_reference: int = 50  # DDIM steps the DPM-Solver++ curve is compared with
    step_clips: int = 12
    seed: int = 0

    def sampler(self, **overrides: Any) -> dict[str, Any]:
        options = dict(
            num_inference_steps=self.num_inference_steps, scheduler=self.scheduler, text_guidance=self.text_guidance,
            image_guidance=self.image_guidance, strength=self.strength, decode=self.decode,
            seed=self.seed, progress=False,
        )
        return {**options, **overrides}


def _bar(name: str, measured: float, target: str, passed: bool, detail: str = "") -> dict[str, Any]:
    return {"bar": name, "measured": round(float(measured), 3), "target": target, "passed": bool(passed), "detail": detail}


def _mean(result, task: str, method: str, metric: str = "psnr") -> float:
    entry = result.aggregate(task, method, metric)
    return float("nan") if entry is None else entry["mean"]


def _rows(result, task: str, method: str) -> list[dict[str, Any]]:
    return [row for row in result.rows if row["task"] == task and row["method"] == method]


def _pick(count: int | None, total: int, seed: int) -> list[int]:
    order = np.random.default_rng(seed).permutation(total)
    return sorted(order[: total if count is None else min(count, total)].tolist())


def _items(dataset: StickerDataset, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [dataset[i] for i in indices]


def task_bars(pipe: RDTFPipeline, dataset: StickerDataset, settings: BarSettings, progress: bool) -> tuple[list, Any]:
    """it2v, i2v, interpolation 2x/4x and prediction against their baselines.

    4x gives every 4th real frame (``10001000`` on 8 frames: frames after the last given
    one are extrapolated, by the model and the baselines alike).
    """
    items = _items(dataset, _pick(settings.clips, len(dataset), settings.seed))
    cases = cases_from_items(items, ["i2v", "it2v", "interpolation", "predict_forward", "predict_backward"])
    four_x = [
        dataclasses.replace(case, condition_mask=_stride_mask(case, 4))
        for case in cases
        if case.task == "interpolation" and int(case.loss_mask.sum()) >= 5
    ]
    method = {"model": pipeline_method(pipe, **settings.sampler())}
    result = evaluate_methods(cases, method, keep_examples=0, seed=settings.seed, progress=progress)
    result_4x = evaluate_methods(four_x, method, keep_examples=0, seed=settings.seed, progress=progress)
    bars = []

    for metric, unit in (("psnr", " dB"), ("ssim", "")):
        model, base = _mean(result, "it2v", "model", metric), _mean(result, "it2v", "repeat_given", metric)
        margin = 1.0 if metric == "psnr" else 0.0
        bars.append(_bar(f"it2v {metric.upper()} vs the static sticker", model - base,
                         f">= +{margin:g}{unit}", model - base >= margin, f"model {model:.3f}, static {base:.3f}"))

    i2v = _rows(result, "i2v", "model")
    motion = i2v_motion(i2v)
    bars.append(_bar("i2v moves like a sticker (flow magnitude in the ground truth's 10-90th percentiles)",
                     motion["moving"], ">= 0.8 of clips", motion["moving"] >= 0.8,
                     f"range {motion['low']:.3f}-{motion['high']:.3f} px/frame; median clip moves "
                     f"{motion['flow_ratio']:.2f}x the ground truth's"))
    median = motion["sharpness"]
    bars.append(_bar("i2v sharpness (gradient energy / ground truth's, median clip)", median, "0.8-1.2",
                     0.8 <= median <= 1.2, f"{motion['sharp_share']:.2f} of clips within 20%"))
    kept = min(row["psnr_given"] for row in i2v)
    bars.append(_bar("i2v keeps the given frame (worst clip PSNR)", min(kept, 99.0), ">= 40 dB", kept >= 40.0))

    for scored, label in ((result, "2x"), (result_4x, "4x")):
        model = _mean(scored, "interpolation", "model")
        crossfade, flow = _mean(scored, "interpolation", "crossfade"), _mean(scored, "interpolation", "flow")
        bars.append(_bar(f"interpolation {label} vs cross-fade", model - crossfade, ">= +1 dB", model - crossfade >= 1.0,
                         f"model {model:.2f}, cross-fade {crossfade:.2f} dB"))
        bars.append(_bar(f"interpolation {label} vs optical flow", model - flow, ">= 0 dB", model - flow >= 0.0,
                         f"model {model:.2f}, flow {flow:.2f} dB"))
    for task in ("predict_forward", "predict_backward"):
        model, repeat = _mean(result, task, "model"), _mean(result, task, "repeat_given")
        bars.append(_bar(f"{task.replace('_', ' ')} vs repeating the nearest frame", model - repeat, "> 0 dB",
                         model - repeat > 0.0, f"model {model:.2f}, repeat {repeat:.2f} dB"))
    return bars, result


def i2v_motion(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Does i2v move like the ground truth and stay as sharp? (evaluation rows of one method's i2v clips)

    ``moving``: share of clips whose flow magnitude is inside the ground truth clips' 10th-90th
    percentile range (``low``-``high``); ``flow_ratio``: the clips' median flow magnitude over the
    ground truth's (how much they move, where ``moving`` only says whether); ``sharpness``: median
    ratio of gradient energy to the ground truth's; ``sharp_share``: share of clips within 20% of it.
    """
    truth = [row["flow_magnitude_gt"] for row in rows]
    low, high = np.percentile(truth, [10, 90])
    ratios = np.array([row["sharpness"] / row["sharpness_gt"] for row in rows if row["sharpness_gt"] > 0])
    return {"moving": float(np.mean([low <= row["flow_magnitude"] <= high for row in rows])),
            "low": float(low), "high": float(high),
            "flow_ratio": float(np.median([row["flow_magnitude"] for row in rows]) / max(np.median(truth), 1e-6)),
            "sharpness": float(np.median(ratios)), "sharp_share": float(np.mean(np.abs(ratios - 1) <= 0.2))}


def _stride_mask(case: EvalCase, stride: int) -> np.ndarray:
    mask = np.zeros_like(case.condition_mask)
    real = np.flatnonzero(case.loss_mask > 0.5)
    mask[real] = interpolation_mask(len(real), stride).numpy()
    return mask


def _generated_psnr(pred_rgb: np.ndarray, gt_rgb: np.ndarray) -> float:
    """PSNR over every frame but the first (the given one)."""
    return psnr_from_mse(float(frame_mse(pred_rgb[1:], gt_rgb[1:]).mean()))


def motion_variants(row: dict[str, Any], motions: Sequence[str], size: int, num_frames: int) -> dict[str, tuple]:
    """The sticker of a built-in ``row`` under other motions: ``motion -> (caption_en, caption_zh, rgb frames)``."""
    spec = StickerSpec.from_record({**row, "num_frames": num_frames}, size=size)
    variants = {}
    for motion in motions:
        if motion == spec.motion:
            variant = spec
        else:
            amplitude = spec.amplitude if MOTION_KINDS[motion].base_amplitude is not None else "normal"
            variant = dataclasses.replace(spec, motion=motion, direction=None, amplitude=amplitude)
        frames = composite_over(render_motion(variant, num_frames, float(row["fps"])).frames, WHITE)
        variants[motion] = (variant.caption_en, variant.caption_zh, frames)
    return variants


TextControlPlan = tuple[dict[str, Any], dict[str, tuple]]  # (row, motion -> (caption_en, caption_zh, frames))
LANGUAGES = (("English", 0), ("Chinese", 1))  # language -> the caption's place in a motion variant


def text_control_plans(dataset: StickerDataset, images: int, motions: int, holdout_motion: str,
                       seed: int) -> list[TextControlPlan]:
    """``images`` whole clips of a built-in split, each with the ground truth of ``motions`` motions (its own first).

    The other motions are ones the sticker could also show at its speed and frame rate (the
    held-out one excepted), drawn with ``seed``.
    """
    rng = np.random.default_rng(seed)
    size, frames = int(dataset.settings["size"]), dataset.num_frames

    def other_motions(row: dict[str, Any]) -> list[str]:
        return [m for m in MOTION_KINDS if m not in (row["motion"], holdout_motion)
                and is_learnable(m, row["speed"], frames, float(row["fps"]))]

    eligible = [i for i, row in enumerate(dataset.rows) if int(row.get("num_real", frames)) == frames
                and len(other_motions(row)) >= motions - 1]
    if not eligible:
        raise ValueError(f"text control: no whole clip in the split can take {motions - 1} "
                         "other motions at its speed; lower text_control_motions")
    plans = []
    for index in (eligible[i] for i in _pick(images, len(eligible), seed)):
        row = dataset.rows[index]
        picked = [row["motion"], *rng.choice(other_motions(row), motions - 1, replace=False).tolist()]
        plans.append((row, motion_variants(row, picked, size, frames)))
    return plans


def text_control_hits(pipe: RDTFPipeline, plans: Sequence[TextControlPlan], sampler: dict[str, Any],
                      languages: Sequence[int], bar: tqdm | None = None) -> tuple[int, int]:
    """(hits, trials): each plan's image under each of its captions, in ``languages[i % len(languages)]`` for plan i
    (0 English, 1 Chinese); a hit is a clip nearest (PSNR) its own caption's ground truth."""
    hits = 0
    for index, (row, variants) in enumerate(plans):
        column = languages[index % len(languages)]
        image = next(iter(variants.values()))[2][0]
        for motion, variant in variants.items():
            clip = pipe.generate(image=image, prompt=variant[column], task="it2v", num_frames=len(variant[2]),
                                 height=image.shape[0], width=image.shape[1], fps=float(row["fps"]), **sampler)
            rgb = np.round(clip * 255).astype(np.uint8)
            scores = {other: _generated_psnr(rgb, v[2]) for other, v in variants.items()}
            hits += max(scores, key=scores.get) == motion
            if bar is not None:
                bar.update(1)
    return hits, sum(len(variants) for _, variants in plans)


def text_control_bars(pipe: RDTFPipeline, dataset: StickerDataset, settings: BarSettings, progress: bool) -> list:
    """Same image, different motion captions: is each clip nearest its own caption's ground truth?"""
    plans = text_control_plans(dataset, settings.text_control_images, settings.text_control_motions,
                               settings.holdout_motion, settings.seed)
    bars = []
    with tqdm(total=2 * sum(len(v) for _, v in plans), desc="text control", disable=not progress) as bar:
        for language, column in LANGUAGES:
            hits, total = text_control_hits(pipe, plans, settings.sampler(), [column], bar)
            share = hits / total
            bars.append(_bar(f"it2v text control, {language} captions (own caption's ground truth is the closest)",
                             share, ">= 0.8 of clips", share >= 0.8,
                             f"{hits}/{total}; {settings.text_control_motions} motions per image, chance "
                             f"{1 / settings.text_control_motions:.2f}"))
    return bars


def lora_bars(pipe: RDTFPipeline, lora: str | os.PathLike, dataset: StickerDataset, settings: BarSettings,
              progress: bool) -> list:
    """it2v on the held-out motion and on the others, base vs base + LoRA (same seeds).

    The details give the 95% bootstrap interval of the per-clip change: with a few dozen
    clips, a gain a hair over its bar is not a gain clearly over it.
    """
    held = [i for i, row in enumerate(dataset.rows) if row["motion"] == settings.holdout_motion]
    rest = [i for i, row in enumerate(dataset.rows) if row["motion"] != settings.holdout_motion]
    groups = {
        "held-out": cases_from_items(_items(dataset, [held[i] for i in _pick(settings.lora_clips, len(held), 1)]), ["it2v"]),
        "other": cases_from_items(_items(dataset, [rest[i] for i in _pick(settings.lora_clips, len(rest), 2)]), ["it2v"]),
    }
    psnr: dict[tuple[str, str], dict[str, float]] = {}
    name = load_lora(pipe, lora, scale=0.0)
    for scale, label in ((0.0, "base"), (1.0, "lora")):
        set_lora_scale(pipe, name, scale)
        for group, cases in groups.items():
            result = evaluate_methods(cases, {label: pipeline_method(pipe, **settings.sampler())}, baselines=False,
                                      keep_examples=0, progress=progress)
            psnr[(group, label)] = {row["key"]: row["psnr"] for row in _rows(result, "it2v", label)}

    def change(group: str) -> tuple[float, str]:
        base, tuned = psnr[(group, "base")], psnr[(group, "lora")]
        differences = [tuned[key] - base[key] for key in base if key in tuned]
        low, high = bootstrap_ci(differences, seed=settings.seed)
        detail = (f"base {np.mean(list(base.values())):.2f}, LoRA {np.mean(list(tuned.values())):.2f} dB; "
                  f"95% interval of the change {low:+.2f} to {high:+.2f} dB over {len(differences)} clips")
        return float(np.mean(differences)), detail

    gain, gain_detail = change("held-out")
    other, other_detail = change("other")
    return [
        _bar(f"LoRA on the held-out motion ({settings.holdout_motion}), it2v PSNR gain", gain, ">= +1 dB", gain >= 1.0,
             gain_detail),
        _bar("LoRA on the other motions, it2v PSNR change", other, ">= -0.5 dB", other >= -0.5, other_detail),
    ]


def step_bars(pipe: RDTFPipeline, dataset: StickerDataset, settings: BarSettings, progress: bool) -> tuple[list, dict]:
    """DPM-Solver++ PSNR per step count against DDIM-50 on it2v; the smallest count within 0.2 dB."""
    cases = cases_from_items(_items(dataset, _pick(settings.step_clips, len(dataset), 3)), ["it2v"])
    methods = {f"ddim-{settings.step_reference}": pipeline_method(
        pipe, **settings.sampler(scheduler="ddim", num_inference_steps=settings.step_reference))}
    for steps in settings.step_counts:
        methods[f"dpm++-{steps}"] = pipeline_method(pipe, **settings.sampler(scheduler="dpm++", num_inference_steps=steps))
    result = evaluate_methods(cases, methods, baselines=False, keep_examples=0, progress=progress)
    curve = {name: round(_mean(result, "it2v", name), 3) for name in methods}
    reference = curve[f"ddim-{settings.step_reference}"]
    reached = [s for s in settings.step_counts if curve[f"dpm++-{s}"] >= reference - 0.2]
    smallest = min(reached) if reached else math.inf
    bar = _bar(f"DPM-Solver++ steps to reach DDIM-{settings.step_reference} it2v PSNR (within 0.2 dB)",
               smallest if reached else -1, "<= 15", smallest <= 15,
               "curve: " + ", ".join(f"{k} {v:.2f}" for k, v in curve.items()))
    return [bar], curve


def measure_quality_bars(
    model: str | os.PathLike,
    data: str | os.PathLike,
    *,
    lora: str | os.PathLike | None = None,
    settings: BarSettings | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Every bar of the model card (LoRA bars only with ``lora``); see the module docstring."""
    settings = settings or BarSettings()
    if lora is not None and not Path(lora).exists():
        raise FileNotFoundError(f"lora {lora}: no such file or folder")
    split = settings.split or None
    base_motions = StickerDataset(data, split=split, predicate=lambda r: r["motion"] != settings.holdout_motion)
    everything = StickerDataset(data, split=split)
    if lora is not None and not any(row["motion"] == settings.holdout_motion for row in everything.rows):
        raise ValueError(f"{data}: the {settings.split!r} split has no {settings.holdout_motion!r} clips for the LoRA bars")
    torch.manual_seed(settings.seed)
    pipe = RDTFPipeline.from_pretrained(model)
    # settings left at None: the model's recommended ones, per task (the pipeline resolves them)
    chosen = {name: getattr(settings, name) for name in pipe.sampler_settings if getattr(settings, name) is not None}
    task_changes = {task: {k: v for k, v in changes.items() if k not in chosen}
                    for task, changes in pipe.components.config.task_sampler.items()}
    bars, result = task_bars(pipe, base_motions, settings, progress)
    bars += text_control_bars(pipe, base_motions, settings, progress)
    step, curve = step_bars(pipe, base_motions, settings, progress)
    bars += step
    if lora is not None:
        bars += lora_bars(pipe, lora, everything, settings, progress)
    return {
        "model": str(model),
        "lora": None if lora is None else str(lora),
        "data": str(data),
        "settings": dataclasses.asdict(settings),
        "sampler": {**pipe.sampler_settings, **chosen},
        "task_sampler": {task: changes for task, changes in task_changes.items() if changes},
        "bars": bars,
        "passed": sum(bar["passed"] for bar in bars),
        "total": len(bars),
        "step_curve": curve,
        "aggregates": [a for a in result.aggregates if a["metric"] in ("psnr", "ssim", "flow_magnitude", "sharpness")],
    }


def write_quality_bars(results: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """``quality_bars.json`` and a Markdown table ``quality_bars.md``; returns the Markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / f"{BARS_NAME}.json", json.dumps(results, indent=2, ensure_ascii=False).encode("utf-8"))
    lines = [
        f"# Quality bars: {results['passed']} of {results['total']} met",
        "",
        f"Model `{results['model']}`" + (f" + LoRA `{results['lora']}`" if results["lora"] else "")
        + f", data `{results['data']}` split `{results['settings']['split']}`; sampler "
        + ", ".join(f"{k}={v}" for k, v in {**results["sampler"], "seed": results["settings"]["seed"]}.items())
        + "".join(f"; for {task}: " + ", ".join(f"{k}={v}" for k, v in changes.items())
                  for task, changes in results["task_sampler"].items()) + ".",
        "",
        "| bar | measured | target | met | detail |",
        "| --- | ---: | --- | :---: | --- |",
    ]
    for bar in results["bars"]:
        lines.append(f"| {bar['bar']} | {bar['measured']:g} | {bar['target']} | {'yes' if bar['passed'] else 'no'} | "
                     f"{bar['detail']} |")
    path = out / f"{BARS_NAME}.md"
    write_atomic(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return path
