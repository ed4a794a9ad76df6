"""Score methods on a test split, task by task, against ground truth and baselines.

:func:`evaluate_methods` runs every method (a model, a LoRA, a baseline: any
``method(case) -> frames``) on every case, scores each prediction with
:func:`rdtf.metrics.clip_metrics` (plus LPIPS / CLIP / FVD when their backbones were
supplied), and aggregates per task and method as a mean with a seeded bootstrap
confidence interval. The baselines that make sense for each task are added unless
switched off, so every comparison shows them. :func:`rdtf.report.write_report` turns the
:class:`EvalResult` into tables, plots and side-by-side strips.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from rdtf.backbones import SPLIT_LEVEL_METRICS, Backbones, feature_distance
from rdtf.baselines import BASELINES, BASELINES_BY_TASK
from rdtf.cases import EvalCase, Method, NotApplicable, cases_for_tasks
from rdtf.io import Clip, composite_over
from rdtf.masks import TASK_USES_TEXT, TASKS
from rdtf.metrics import DEFAULT_BACKGROUND, analyse_clip, check_frames, clip_metrics

#: Every scalar a row can carry, in report order, and whether higher is better (None:
#: descriptive, no better direction — e.g. how much the clip moves).
METRICS: dict[str, bool | None] = {
    "psnr": True,
    "ssim": True,
    "iou": True,
    "lpips": False,
    "clip_image": True,
    "clip_text": True,
    "fvd": False,
    "motion_epe": False,
    "motion_direction_cos": True,
    "warp_error": False,
    "flow_magnitude": None,
    "sharpness": None,
    "psnr_given": True,
    "ssim_given": True,
    "iou_given": True,
    "warp_error_gt": None,
    "flow_magnitude_gt": None,
    "sharpness_gt": None,
    "clip_text_gt": None,
}
#: Columns of a row that identify it rather than score it.
ROW_KEYS: tuple[str, ...] = ("key", "task", "method", "mask", "num_given", "num_generated")


@dataclass
class Example:
    """A case and the frames each method produced for it, kept for strips and contact sheets."""

    case: EvalCase
    predictions: dict[str, np.ndarray]


@dataclass
class EvalResult:
    """Everything one evaluation produced.

    ``rows``: one dict per (case, method) with :data:`ROW_KEYS` and scalar metrics — the
    per-sticker table. ``per_frame``: one dict per (case, method) with the same
    :data:`ROW_KEYS`, ``given`` / ``real`` (lists of bool) and per-frame metric lists.
    ``aggregates``: one dict per (task, method, metric) with ``mean``, ``ci_low``,
    ``ci_high`` and ``n`` (clips with a value; FVD is one number over the split, so its
    CI is NaN). ``unavailable``: metric → why it was not computed. ``skipped``: (case,
    method) pairs a method declined with :class:`NotApplicable`. ``methods`` lists method
    names in column order (user methods first, then baselines).
    """

    rows: list[dict[str, Any]]
    per_frame: list[dict[str, Any]]
    aggregates: list[dict[str, Any]]
    methods: list[str]
    unavailable: dict[str, str] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    examples: list[Example] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        """Tasks present, in :data:`rdtf.masks.TASKS` order."""
        present = {row["task"] for row in self.rows}
        return [task for task in TASKS if task in present]

    @property
    def metrics(self) -> list[str]:
        """Metrics with at least one aggregate, in :data:`METRICS` order."""
        present = {entry["metric"] for entry in self.aggregates}
        return [metric for metric in METRICS if metric in present]

    def aggregate(self, task: str, method: str, metric: str) -> dict[str, Any] | None:
        """The aggregate entry of one (task, method, metric), or None if absent."""
        for entry in self.aggregates:
            if (entry["task"], entry["method"], entry["metric"]) == (task, method, metric):
                return entry
        return None


def bootstrap_ci(
    values: Sequence[float], *, resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (NaNs dropped), seeded.

    Quantiles take the nearest resampled mean, so infinite PSNRs give infinite bounds
    rather than NaN. One value gives a zero-width interval; none gives (NaN, NaN).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}: must be in (0, 1)")
    if resamples < 1:
        raise ValueError(f"resamples={resamples}: must be >= 1")
    data = np.asarray(values, dtype=np.float64)
    data = data[~np.isnan(data)]
    if len(data) == 0:
        return float("nan"), float("nan")
    if len(data) == 1:
        return float(data[0]), float(data[0])
    picks = np.random.default_rng(seed).integers(0, len(data), size=(resamples, len(data)))
    means = np.sort(data[picks].mean(axis=1))
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail], method="nearest")
    return float(low), float(high)


def aggregate_rows(
    rows: Iterable[Mapping[str, Any]], *, resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> list[dict[str, Any]]:
    """Mean and bootstrap CI of every metric per (task, method); NaN values (not applicable) are left out."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["task"], row["method"])].append(row)
    entries = []
    for (task, method), members in groups.items():
        for metric in METRICS:
            values = np.array([float(row[metric]) for row in members if metric in row], dtype=np.float64)
            values = values[~np.isnan(values)]
            if len(values) == 0:
                continue
            low, high = bootstrap_ci(values, resamples=resamples, confidence=confidence, seed=seed)
            entries.append(
                {"task": task, "method": method, "metric": metric, "mean": float(np.mean(values)), "ci_low": low, "ci_high": high, "n": len(values)}
            )
    return entries


def evaluate_methods(
    cases: Sequence[EvalCase],
    methods: Mapping[str, Method],
    *,
    baselines: bool = True,
    backbones: Backbones | None = None,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
    flow_method: str = "dis",
    keep_examples: int = 2,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    caption_language: str = "en",
    progress: bool = True,
) -> EvalResult:
    """Run every method on every case and score it (see the module docstring).

    ``methods`` maps a name to ``method(case) -> (F, H, W, 4) uint8``; with ``baselines``
    the task's baselines from :data:`rdtf.baselines.BASELINES_BY_TASK` run too.
    ``backbones`` (from :func:`rdtf.backbones.load_backbones`) adds LPIPS / CLIP / FVD;
    without it they are listed as unavailable. Predictions of the first
    ``keep_examples`` cases of each task are kept for pictures. ``caption_language`` ("en" or "zh")
    picks the caption CLIP scores against.
    """
    cases = list(cases)
    _check_inputs(cases, methods, baselines, caption_language)
    backbones = backbones or Backbones(unavailable=_NO_BACKBONES)
    plan = [(case, _methods_for(case.task, methods, baselines)) for case in cases]
    method_order = list(dict.fromkeys([*methods, *(name for _, chosen in plan for name in chosen)]))

    rows: list[dict[str, Any]] = []
    per_frame: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    examples: list[Example] = []
    features: dict[tuple[str, str], list[np.ndarray]] = defaultdict(list)
    kept_per_task: dict[str, int] = defaultdict(int)
    with tqdm(total=sum(len(chosen) for _, chosen in plan), desc="evaluate", disable=not progress) as bar:
        for case, chosen in plan:
            keep = kept_per_task[case.task] < keep_examples
            gt_analysis = analyse_clip(case.frames, case.loss_mask, background, flow_method)
            real = case.loss_mask > 0.5
            generated = real & (case.condition_mask < 0.5)
            if backbones.i3d is not None:
                features[(case.task, _GROUND_TRUTH)].append(backbones.video_features(gt_analysis.rgb[real]))
            kept: dict[str, np.ndarray] = {}
            for name, method in chosen.items():
                try:
                    pred = _check_prediction(method(case), case, name)
                except NotApplicable as reason:
                    skipped.append({"key": case.key, "task": case.task, "method": name, "reason": str(reason)})
                else:
                    scores = clip_metrics(
                        pred, case.frames, case.condition_mask, case.loss_mask, background,
                        flow_method=flow_method, gt_analysis=gt_analysis,
                    )
                    pred_rgb = composite_over(pred, background)
                    caption = case.caption_zh if caption_language == "zh" else case.caption_en
                    extra = backbones.clip_scores(pred_rgb[generated], gt_analysis.rgb[generated], caption)
                    if backbones.i3d is not None:
                        features[(case.task, name)].append(backbones.video_features(pred_rgb[real]))
                    rows.append({**_row_keys(case, name), **scores.scalars, **extra})
                    per_frame.append(
                        {
                            **_row_keys(case, name),
                            "given": scores.given.tolist(),
                            "real": real.tolist(),
                            **{metric: values.tolist() for metric, values in scores.per_frame.items()},
                        }
                    )
                    if keep:
                        kept[name] = pred
                bar.update(1)
            if keep:
                examples.append(Example(case, kept))
                kept_per_task[case.task] += 1

    aggregates = aggregate_rows(rows, resamples=resamples, confidence=confidence, seed=seed)
    aggregates.extend(_fvd_entries(features))
    return EvalResult(
        rows=rows,
        per_frame=per_frame,
        aggregates=aggregates,
        methods=method_order,
        unavailable=dict(backbones.unavailable),
        skipped=skipped,
        examples=examples,
        settings={
            "background": list(background),
            "flow_method": flow_method,
            "bootstrap_resamples": resamples,
            "confidence": confidence,
            "seed": seed,
            "caption_language": caption_language,
            "num_cases": len(cases),
        },
    )


_GROUND_TRUTH = "\0ground truth"
_NO_BACKBONES = {
    metric: "no backbones given (pass backbones=rdtf.backbones.load_backbones(...))"
    for metric in ("lpips", "clip_image", "clip_text", "clip_text_gt", *SPLIT_LEVEL_METRICS)
}


def _check_inputs(cases: list[EvalCase], methods: Mapping[str, Method], baselines: bool, caption_language: str) -> None:
    if not cases:
        raise ValueError("cases: nothing to evaluate (empty)")
    for index, case in enumerate(cases):
        if not isinstance(case, EvalCase):
            raise ValueError(f"cases[{index}]: expected an EvalCase, got {type(case).__name__}")
    seen: set[tuple[str, str]] = set()
    for case in cases:
        if (case.key, case.task) in seen:
            raise ValueError(f"cases: ({case.key!r}, {case.task!r}) appears twice; keys must be unique per task")
        seen.add((case.key, case.task))
    if not methods and not baselines:
        raise ValueError("methods: none given and baselines=False; nothing to run")
    for name, method in methods.items():
        if not callable(method):
            raise ValueError(f"methods[{name!r}]: expected a callable method(case) -> frames")
        if baselines and name in BASELINES:
            raise ValueError(f"methods[{name!r}]: the name is taken by a baseline; rename it or pass baselines=False")
    if caption_language not in ("en", "zh"):
        raise ValueError(f"caption_language={caption_language!r}: expected 'en' or 'zh'")


def _methods_for(task: str, methods: Mapping[str, Method], baselines: bool) -> dict[str, Method]:
    chosen = dict(methods)
    if baselines:
        chosen.update({name: BASELINES[name] for name in BASELINES_BY_TASK[task]})
    return chosen


def _row_keys(case: EvalCase, method: str) -> dict[str, Any]:
    """The identifying columns (:data:`ROW_KEYS`) of one (case, method) row."""
    return {
        "key": case.key,
        "task": case.task,
        "method": method,
        "mask": case.mask_string,
        "num_given": int(np.count_nonzero(case.condition_mask)),
        "num_generated": int(np.count_nonzero((case.loss_mask > 0.5) & (case.condition_mask < 0.5))),
    }


def _check_prediction(pred: Any, case: EvalCase, name: str) -> np.ndarray:
    where = f"method {name!r} on case {case.key!r} ({case.task})"
    if isinstance(pred, Clip):
        pred = pred.frames
    if not isinstance(pred, np.ndarray):
        raise ValueError(f"{where}: returned {type(pred).__name__}, expected (F, H, W, 4) uint8 frames")
    pred = check_frames(pred, where)
    if pred.shape != case.frames.shape:
        raise ValueError(f"{where}: returned shape {pred.shape}, the ground truth is {case.frames.shape}")
    return pred


def _fvd_entries(features: dict[tuple[str, str], list[np.ndarray]]) -> list[dict[str, Any]]:
    entries = []
    for (task, method), predicted in features.items():
        if method == _GROUND_TRUTH:
            continue
        distance = feature_distance(np.stack(predicted), np.stack(features[(task, _GROUND_TRUTH)]))
        if not np.isnan(distance):
            entries.append(
                {"task": task, "method": method, "metric": "fvd", "mean": distance, "ci_low": float("nan"), "ci_high": float("nan"), "n": len(predicted)}
            )
    return entries


def pipeline_method(
    pipeline: Callable[..., Any], *, caption_language: str = "en", samples: int = 1, **call_kwargs: Any
) -> Method:
    """Wrap an :class:`rdtf.pipeline.RDTFPipeline` (or a callable with its keywords) as a method.

    Calls ``pipeline(frames=..., condition_mask=..., task=..., prompt=..., fps=...,
    **call_kwargs)`` with the case's ground truth (only its given frames are used), its
    condition mask as a torch tensor, and its caption for tasks that read text ("" for the
    others), at the ground truth's size unless ``call_kwargs`` says otherwise; accepts a
    :class:`rdtf.io.Clip` or an array back. Put the sampler settings
    (``seed``, ``num_inference_steps``, guidance, ``progress=False``) in ``call_kwargs``.

    ``samples`` > 1 returns the mean of that many samples (seeds ``seed``, ``seed + 1``, ...):
    the model's estimate of the expected clip, the prediction with the least squared error
    when the ground truth is uncertain. Next to one sample it splits the model's error in two:
    what the mean still loses is the model's bias, what one sample loses on top is its spread.
    """
    if caption_language not in ("en", "zh"):
        raise ValueError(f"caption_language={caption_language!r}: expected 'en' or 'zh'")
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples={samples!r}: must be an integer >= 1")
    first_seed = call_kwargs.get("seed", 0)

    def sample(case: EvalCase, **overrides: Any) -> np.ndarray:
        caption = case.caption_zh if caption_language == "zh" else case.caption_en
        output = pipeline(
            frames=case.frames,
            condition_mask=torch.from_numpy(case.condition_mask),
            task=case.task,
            prompt=caption if TASK_USES_TEXT[case.task] else "",
            fps=case.fps,
            **{"height": case.frames.shape[1], "width": case.frames.shape[2], **call_kwargs, **overrides},
        )
        return output.frames if isinstance(output, Clip) else np.asarray(output)

    def method(case: EvalCase) -> np.ndarray:
        if samples == 1:
            return sample(case)
        stacked = np.stack([sample(case, seed=first_seed + i).astype(np.float32) for i in range(samples)])
        return np.clip(np.rint(stacked.mean(axis=0)), 0, 255).astype(np.uint8)

    return method


def pipeline_methods(name: str, pipeline: Callable[..., Any], *, mean_of: int = 1, **call_kwargs: Any
                     ) -> dict[str, Method]:
    """``name``: one sample of ``pipeline`` (:func:`pipeline_method`); with ``mean_of`` > 1 also
    ``name-meanN``, its mean of that many samples, so the report shows the model's spread beside it."""
    methods = {name: pipeline_method(pipeline, **call_kwargs)}
    if mean_of > 1:
        methods[f"{name}-mean{mean_of}"] = pipeline_method(pipeline, samples=mean_of, **call_kwargs)
    return methods


def sweep_methods(make_method: Callable[[float], Method], values: Iterable[float], parameter: str) -> dict[str, Method]:
    """Methods named ``"{parameter}={value}"`` for a sweep (denoising steps, guidance scale, ...).

    :func:`rdtf.plots.plot_metric_vs_parameter` reads the values back from these names.
    """
    if not parameter or "=" in parameter:
        raise ValueError(f"parameter={parameter!r}: expected a non-empty name without '='")
    return {f"{parameter}={value:g}": make_method(value) for value in values}


def frames_from_item(item: Mapping[str, Any]) -> np.ndarray:
    """A :mod:`rdtf.data` sample (``video`` (3, F, H, W) in [-1, 1], optional ``alpha``) as RGBA uint8.

    RGBA datasets store colour composited on white; it is un-composited here so metrics
    see the sticker's own colours and transparency.
    """
    video = torch.as_tensor(item["video"]).float()
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"item {item.get('key')!r}: video must be (3, F, H, W), got {tuple(video.shape)}")
    rgb = ((video.clamp(-1, 1) + 1.0) / 2.0).permute(1, 2, 3, 0).numpy()
    if "alpha" in item:
        alpha = torch.as_tensor(item["alpha"]).float()[0].clamp(0, 1).numpy()[..., None]
        colour = np.divide(rgb - (1.0 - alpha), alpha, out=np.zeros_like(rgb), where=alpha > 1e-6)
        rgba = np.concatenate([np.clip(colour, 0, 1), alpha], axis=-1)
    else:
        rgba = np.concatenate([rgb, np.ones_like(rgb[..., :1])], axis=-1)
    return np.round(rgba * 255.0).astype(np.uint8)


def cases_from_items(items: Iterable[Mapping[str, Any]], tasks: Iterable[str] = TASKS) -> list[EvalCase]:
    """One case per task for every dataset sample (e.g. a ``StickerDataset`` test split)."""
    tasks = list(tasks)
    cases = []
    for item in items:
        cases.extend(
            cases_for_tasks(
                str(item["key"]),
                frames_from_item(item),
                tasks,
                loss_mask=np.asarray(item["loss_mask"], dtype=np.float32),
                caption_en=str(item.get("caption_en", "")),
                caption_zh=str(item.get("caption_zh", "")),
                fps=float(item.get("fps", 8.0)),
            )
        )
    return cases
