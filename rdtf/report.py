"""The evaluation report: Markdown and HTML pages, raw CSV / JSON, plots and strips.

:func:`write_report` lays out one folder a notebook can display and CI can keep::

    report.html     self-contained (pictures embedded), open anywhere or show in Jupyter
    report.md       the same text with relative picture links
    results.json    settings, aggregates, per-sticker rows, per-frame values, unavailable
    rows.csv        one row per (sticker, task, method)
    aggregates.csv  one row per (task, method, metric): mean, CI, n
    figures/        metric-by-task bars, per-frame curves, sweeps (PNG)
    strips/         one side-by-side GIF per kept example
    sheets/         one contact sheet PNG per kept example

Both pages are rendered from one list of blocks, so they always say the same thing.
Every file is written atomically. In JSON, NaN (not applicable) is ``null`` and infinite
PSNR is the string ``"inf"``.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rdtf.evaluate import METRICS, ROW_KEYS, EvalResult
from rdtf.io import write_atomic
from rdtf.plots import plot_metric_by_task, plot_metric_vs_parameter, plot_per_frame, sweep_values
from rdtf.strips import case_columns, contact_sheet, side_by_side_gif

#: Metrics shown in the summary tables and bar plots when present.
SUMMARY_METRICS: tuple[str, ...] = (
    "psnr", "ssim", "iou", "lpips", "clip_image", "clip_text", "fvd", "motion_epe", "warp_error", "psnr_given",
)
REPORT_HTML, REPORT_MD, RESULTS_JSON, ROWS_CSV, AGGREGATES_CSV = (
    "report.html", "report.md", "results.json", "rows.csv", "aggregates.csv",
)


@dataclass(frozen=True)
class _Heading:
    level: int
    text: str


@dataclass(frozen=True)
class _Text:
    text: str


@dataclass(frozen=True)
class _Table:
    header: list[str]
    rows: list[list[str]]
    bold: frozenset[tuple[int, int]] = frozenset()


@dataclass(frozen=True)
class _Picture:
    path: str  # relative to the report folder
    caption: str


def json_safe(value: Any) -> Any:
    """``value`` with NaN → None and ±inf → ``"inf"`` / ``"-inf"``, recursively (strict JSON)."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def result_to_dict(result: EvalResult, title: str = "") -> dict[str, Any]:
    """Everything numeric in ``result`` as strict-JSON-ready data (frames are not included)."""
    return json_safe(
        {
            "title": title,
            "settings": result.settings,
            "methods": result.methods,
            "tasks": result.tasks,
            "unavailable": result.unavailable,
            "skipped": result.skipped,
            "aggregates": result.aggregates,
            "rows": result.rows,
            "per_frame": result.per_frame,
        }
    )


def _number(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return f"{value:.4g}"


def _summary_table(result: EvalResult, task: str, metrics: Sequence[str]) -> _Table:
    """Methods × metrics for one task: ``mean [low, high]`` with the best mean in bold."""
    methods = [m for m in result.methods if any(result.aggregate(task, m, metric) for metric in metrics)]
    rows, bold = [], set()
    for column, metric in enumerate(metrics, start=1):
        direction = METRICS[metric]
        means = {m: e["mean"] for m in methods if (e := result.aggregate(task, m, metric)) and not math.isnan(e["mean"])}
        if direction is not None and len(means) > 1:
            best = (max if direction else min)(means.values())
            bold.update((row, column) for row, m in enumerate(methods) if means.get(m) == best)
    for method in methods:
        cells = [method]
        for metric in metrics:
            entry = result.aggregate(task, method, metric)
            if entry is None:
                cells.append("–")
            elif math.isnan(entry["ci_low"]):
                cells.append(_number(entry["mean"]))
            else:
                cells.append(f"{_number(entry['mean'])} [{_number(entry['ci_low'])}, {_number(entry['ci_high'])}]")
        rows.append(cells)
    header = ["method"] + [f"{metric} {'↑' if METRICS[metric] else '↓' if METRICS[metric] is False else ''}".strip() for metric in metrics]
    return _Table(header, rows, frozenset(bold))


def _per_sticker_table(result: EvalResult, task: str) -> _Table:
    """Stickers × methods for one task, each cell ``PSNR / SSIM`` over the generated frames."""
    rows_by_key: dict[str, dict[str, dict[str, Any]]] = {}
    for row in result.rows:
        if row["task"] == task:
            rows_by_key.setdefault(row["key"], {})[row["method"]] = row
    methods = [m for m in result.methods if any(m in by_method for by_method in rows_by_key.values())]
    table_rows = []
    for key, by_method in rows_by_key.items():
        cells = [key, next(iter(by_method.values()))["mask"]]
        for method in methods:
            row = by_method.get(method)
            cells.append("–" if row is None else f"{_number(row['psnr'])} / {_number(row['ssim'])}")
        table_rows.append(cells)
    return _Table(["sticker", "mask", *[f"{m} (PSNR / SSIM)" for m in methods]], table_rows)


def _file_stem(*parts: str) -> str:
    """A safe, unique file name stem for a sticker key (keys may hold any characters)."""
    text = "_".join(parts)
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:60] or "case"
    return f"{readable}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:8]}"


def write_report(
    result: EvalResult,
    out_dir: str | Path,
    *,
    title: str = "RDTF evaluation",
    strips: bool = True,
    plots: bool = True,
    metrics: Sequence[str] = SUMMARY_METRICS,
) -> Path:
    """Write the report folder (see the module docstring) and return the path of ``report.html``."""
    unknown = [metric for metric in metrics if metric not in METRICS]
    if unknown:
        raise ValueError(f"metrics: unknown {unknown}; known: {', '.join(METRICS)}")
    if not result.rows:
        raise ValueError("result: no scored rows to report (every method was skipped?)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shown = [metric for metric in metrics if metric in result.metrics]

    write_atomic(out / RESULTS_JSON, json.dumps(result_to_dict(result, title), ensure_ascii=False, indent=1).encode("utf-8"))
    write_atomic(out / ROWS_CSV, _csv([*ROW_KEYS, *(m for m in METRICS if any(m in row for row in result.rows))], result.rows))
    write_atomic(out / AGGREGATES_CSV, _csv(["task", "method", "metric", "mean", "ci_low", "ci_high", "n"], result.aggregates))

    settings = result.settings
    blocks: list[Any] = [
        _Heading(1, title),
        _Text(
            f"{settings.get('num_cases', len(result.rows))} cases; methods: {', '.join(result.methods)}. "
            f"Frames composited over RGB {tuple(settings.get('background', ()))}; scores cover generated frames "
            f"(given frames under *_given); intervals are {settings.get('confidence', 0.95):.0%} bootstrap CIs "
            f"({settings.get('bootstrap_resamples')} resamples, seed {settings.get('seed')}). Bold: best per column."
        ),
        _Heading(2, "Summary by task"),
    ]
    for task in result.tasks:
        blocks += [_Heading(3, task), _summary_table(result, task, shown)]
    if result.unavailable:
        blocks += [_Heading(2, "Unavailable metrics"), _Table(["metric", "reason"], [[k, v] for k, v in result.unavailable.items()])]
    if result.skipped:
        blocks += [
            _Heading(2, "Skipped (method not applicable)"),
            _Table(["sticker", "task", "method", "reason"], [[s["key"], s["task"], s["method"], s["reason"]] for s in result.skipped]),
        ]
    if plots:
        blocks += [_Heading(2, "Plots"), *_write_plots(result, out, shown)]
    if strips and result.examples:
        blocks += [_Heading(2, "Examples"), *_write_examples(result, out)]
    blocks.append(_Heading(2, "Per sticker"))
    for task in result.tasks:
        blocks += [_Heading(3, task), _per_sticker_table(result, task)]

    write_atomic(out / REPORT_MD, _markdown(blocks).encode("utf-8"))
    write_atomic(out / REPORT_HTML, _html(blocks, title, out).encode("utf-8"))
    return out / REPORT_HTML


def _write_plots(result: EvalResult, out: Path, metrics: Sequence[str]) -> list[_Picture]:
    pictures = []
    for metric in metrics:
        path = plot_metric_by_task(result, metric, out / "figures" / f"by_task_{metric}.png")
        pictures.append(_Picture(path.relative_to(out).as_posix(), f"{metric} by task and method"))
    path = plot_per_frame(result, out / "figures" / "per_frame_psnr.png")
    pictures.append(_Picture(path.relative_to(out).as_posix(), "PSNR per frame"))
    parameters = {method.split("=", 1)[0] for method in result.methods if "=" in method}
    for parameter in sorted(parameters):
        if len(sweep_values(result, parameter)) >= 2:
            path = plot_metric_vs_parameter(result, "psnr", parameter, out / "figures" / f"psnr_vs_{_file_stem(parameter)}.png")
            pictures.append(_Picture(path.relative_to(out).as_posix(), f"PSNR vs {parameter}"))
    return pictures


def _write_examples(result: EvalResult, out: Path) -> list[Any]:
    blocks: list[Any] = []
    for example in result.examples:
        case = example.case
        columns = case_columns(case, example.predictions)
        stem = _file_stem(case.key, case.task)
        gif = side_by_side_gif(columns, out / "strips" / f"{stem}.gif", case.fps, given_mask=case.condition_mask)
        sheet = contact_sheet(
            columns, out / "sheets" / f"{stem}.png", given_mask=case.condition_mask, title=f"{case.key} · {case.task} · {case.mask_string}"
        )
        caption = case.caption_en or case.caption_zh
        blocks += [
            _Heading(3, f"{case.key} · {case.task} · mask {case.mask_string}"),
            *([_Text(caption)] if caption else []),
            _Picture(gif.relative_to(out).as_posix(), f"{case.key} {case.task} (animated)"),
            _Picture(sheet.relative_to(out).as_posix(), f"{case.key} {case.task} (frames)"),
        ]
    return blocks


def _csv(columns: Sequence[str], records: Sequence[dict[str, Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({key: _csv_value(record.get(key)) for key in columns})
    return buffer.getvalue().encode("utf-8")


def _csv_value(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return ""
    return value


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown(blocks: Sequence[Any]) -> str:
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, _Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, _Text):
            lines += [block.text, ""]
        elif isinstance(block, _Picture):
            lines += [f"![{block.caption}]({block.path})", ""]
        elif isinstance(block, _Table):
            lines.append("| " + " | ".join(_markdown_cell(cell) for cell in block.header) + " |")
            lines.append("|" + "---|" * len(block.header))
            for r, row in enumerate(block.rows):
                cells = [f"**{_markdown_cell(c)}**" if (r, i) in block.bold else _markdown_cell(c) for i, c in enumerate(row)]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


_MIME = {".png": "image/png", ".gif": "image/gif", ".svg": "image/svg+xml"}
_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1400px}"
    "table{border-collapse:collapse;margin:.5em 0 1em;font-size:13px}"
    "th,td{border:1px solid #ccc;padding:3px 7px;text-align:left}th{background:#f3f3f3}"
    "figure{margin:.5em 0 1em}figcaption{font-size:12px;color:#555}img{image-rendering:pixelated;max-width:100%}"
)


def _html(blocks: Sequence[Any], title: str, out: Path) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"]
    for block in blocks:
        if isinstance(block, _Heading):
            parts.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, _Text):
            parts.append(f"<p>{html.escape(block.text)}</p>")
        elif isinstance(block, _Picture):
            data = base64.b64encode((out / block.path).read_bytes()).decode("ascii")
            mime = _MIME[Path(block.path).suffix.lower()]
            parts.append(
                f"<figure><img src='data:{mime};base64,{data}' alt='{html.escape(block.caption)}'>"
                f"<figcaption>{html.escape(block.caption)}</figcaption></figure>"
            )
        elif isinstance(block, _Table):
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in block.header) + "</tr>")
            for r, row in enumerate(block.rows):
                cells = [f"<td><b>{html.escape(c)}</b></td>" if (r, i) in block.bold else f"<td>{html.escape(c)}</td>" for i, c in enumerate(row)]
                parts.append("<tr>" + "".join(cells) + "</tr>")
            parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
