"""Evaluation end to end: methods and baselines on a small split, aggregation, reports, pictures."""

from __future__ import annotations

import csv
import json
import socket

import numpy as np
import pytest
import torch

from rdtf.backbones import load_backbones
from rdtf.cases import EvalCase, NotApplicable, cases_for_tasks
from rdtf.evaluate import (
    aggregate_rows,
    bootstrap_ci,
    cases_from_items,
    evaluate_methods,
    frames_from_item,
    pipeline_method,
    sweep_methods,
)
from rdtf.io import Clip, read_clip
from rdtf.plots import plot_metric_by_task, plot_metric_vs_parameter, plot_per_frame
from rdtf.report import REPORT_HTML, REPORT_MD, RESULTS_JSON, ROWS_CSV, write_report
from rdtf.strips import MIN_COLUMN_WIDTH, compose_sheet, compose_strip, contact_sheet, input_frames, side_by_side_gif


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def sprite_clip(num_frames: int = 8, step: int = 2, size: int = 32, colour=(255, 140, 0), phase: int = 0) -> np.ndarray:
    """A striped disc on a transparent background moving right ``step`` px per frame."""
    yy, xx = np.mgrid[0:size, 0:size]
    frames = np.zeros((num_frames, size, size, 4), np.uint8)
    for t in range(num_frames):
        cx, cy = 8 + phase + step * t, size // 2
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= 36
        frames[t][inside] = (*colour, 255)
        frames[t][inside & ((xx - cx) % 3 == 0)] = (30, 30, 90, 255)
    return frames


def oracle(case: EvalCase) -> np.ndarray:
    return case.frames.copy()


def blank(case: EvalCase) -> np.ndarray:
    return np.zeros_like(case.frames)


@pytest.fixture(scope="module")
def split() -> list[EvalCase]:
    cases = []
    for index in range(3):
        frames = sprite_clip(step=1 + index, colour=(255, 60 * index, 0))
        cases += cases_for_tasks(f"sticker{index}", frames, ["i2v", "interpolation", "t2v"], caption_en=f"a ball rolls {index}")
    return cases


@pytest.fixture(scope="module")
def result(split):
    return evaluate_methods(split, {"oracle": oracle, "blank": blank}, keep_examples=1, resamples=200, progress=False)


def test_every_method_and_the_tasks_baselines_are_scored(result, split):
    methods_by_task = {}
    for row in result.rows:
        methods_by_task.setdefault(row["task"], set()).add(row["method"])
    assert methods_by_task == {
        "i2v": {"oracle", "blank", "repeat_given"},
        "interpolation": {"oracle", "blank", "repeat_given", "crossfade", "flow"},
        "t2v": {"oracle", "blank"},
    }
    assert result.methods == ["oracle", "blank", "repeat_given", "crossfade", "flow"]
    assert len(result.rows) == len(result.per_frame) == 3 * (3 + 5 + 2)
    assert result.tasks == ["i2v", "t2v", "interpolation"]
    oracle_rows = [row for row in result.rows if row["method"] == "oracle"]
    assert all(row["ssim"] == 1.0 and row["iou"] == 1.0 and row["motion_epe"] == 0.0 for row in oracle_rows)
    assert all(row["psnr"] == float("inf") for row in oracle_rows)
    assert all(np.isnan(row["psnr_given"]) == (row["task"] == "t2v") for row in oracle_rows)
    interp = [row for row in result.rows if row["task"] == "interpolation" and row["method"] == "flow"]
    assert all(row["mask"] == "10101010" and row["num_given"] == 4 and row["num_generated"] == 4 for row in interp)
    assert set(result.unavailable) == {"lpips", "clip_image", "clip_text", "clip_text_gt", "fvd"}
    assert not any("lpips" in row for row in result.rows)
    assert [(e.case.key, e.case.task) for e in result.examples] == [("sticker0", t) for t in ("i2v", "interpolation", "t2v")]
    assert list(result.examples[1].predictions) == ["oracle", "blank", "repeat_given", "crossfade", "flow"]


def test_aggregates_are_means_with_bootstrap_intervals(result):
    entry = result.aggregate("interpolation", "crossfade", "ssim")
    values = [row["ssim"] for row in result.rows if row["task"] == "interpolation" and row["method"] == "crossfade"]
    assert entry["n"] == 3 and entry["mean"] == pytest.approx(np.mean(values))
    assert entry["ci_low"] <= entry["mean"] <= entry["ci_high"]
    oracle = result.aggregate("i2v", "oracle", "psnr")
    assert oracle["mean"] == oracle["ci_low"] == oracle["ci_high"] == float("inf")
    assert result.aggregate("interpolation", "blank", "ssim")["mean"] < entry["mean"]
    assert result.aggregate("t2v", "repeat_given", "psnr") is None


def test_bootstrap_is_seeded_and_sane():
    values = np.random.default_rng(0).normal(10.0, 2.0, 40)
    first = bootstrap_ci(values, seed=3)
    assert first == bootstrap_ci(values, seed=3)
    assert first != bootstrap_ci(values, seed=4)
    assert first[0] < values.mean() < first[1]
    assert first[1] - first[0] == pytest.approx(2 * 1.96 * 2.0 / np.sqrt(40), rel=0.35)
    assert bootstrap_ci([5.0, float("nan")]) == (5.0, 5.0)
    assert np.isnan(bootstrap_ci([float("nan")])[0])
    low, high = bootstrap_ci([20.0, float("inf")], resamples=50)
    assert low == 20.0 and high == float("inf")
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci(values, confidence=1.5)


def test_aggregate_rows_skips_not_applicable_values():
    rows = [
        {"task": "i2v", "method": "m", "psnr": 20.0, "iou": float("nan")},
        {"task": "i2v", "method": "m", "psnr": 30.0, "iou": float("nan")},
    ]
    entries = {entry["metric"]: entry for entry in aggregate_rows(rows, resamples=50)}
    assert set(entries) == {"psnr"} and entries["psnr"]["mean"] == 25.0 and entries["psnr"]["n"] == 2


def test_methods_may_decline_a_case(split):
    def needs_text(case: EvalCase) -> np.ndarray:
        if not case.caption_en or case.task == "i2v":
            raise NotApplicable("no text to follow")
        return case.frames.copy()

    result = evaluate_methods(split[:3], {"text_only": needs_text}, baselines=False, progress=False)
    assert [(s["task"], s["method"]) for s in result.skipped] == [("i2v", "text_only")]
    assert {row["task"] for row in result.rows} == {"interpolation", "t2v"}


def test_bad_methods_and_cases_are_reported_by_name(split):
    def wrong_size(case: EvalCase) -> np.ndarray:
        return case.frames[:, :16]

    with pytest.raises(ValueError, match=r"method 'wrong_size' on case 'sticker0' \(i2v\): returned shape"):
        evaluate_methods(split[:1], {"wrong_size": wrong_size}, progress=False)
    with pytest.raises(ValueError, match="appears twice"):
        evaluate_methods([split[0], split[0]], {"oracle": oracle}, progress=False)
    with pytest.raises(ValueError, match="taken by a baseline"):
        evaluate_methods(split[:1], {"flow": oracle}, progress=False)
    with pytest.raises(ValueError, match="empty"):
        evaluate_methods([], {"oracle": oracle}, progress=False)
    with pytest.raises(ValueError, match="case 'x': task 'dance'"):
        EvalCase("x", "dance", sprite_clip(), np.zeros(8))
    with pytest.raises(ValueError, match="condition_mask gives padding frames"):
        EvalCase("x", "i2v", sprite_clip(), np.eye(8)[7], loss_mask=np.r_[np.ones(7), 0])


def test_cases_for_tasks_lay_masks_over_real_frames_only():
    frames = sprite_clip()
    real = np.array([1, 1, 1, 1, 1, 1, 0, 0], np.float32)
    cases = {c.task: c for c in cases_for_tasks("short", frames, loss_mask=real, caption_zh="一个球")}
    assert cases["i2v"].mask_string == "10000000"
    assert cases["interpolation"].mask_string == "10101000"
    assert cases["predict_forward"].mask_string == "11100000"
    assert cases["predict_backward"].mask_string == "00011100"
    assert cases["t2v"].mask_string == "00000000"
    assert cases["it2v"].caption_zh == "一个球"
    with pytest.raises(ValueError, match="needs at least 2 real frames"):
        cases_for_tasks("one", frames, ["interpolation"], loss_mask=np.eye(8)[0])


def test_padding_frames_are_not_scored():
    frames = sprite_clip()
    real = np.array([1, 1, 1, 1, 1, 1, 0, 0], np.float32)
    (case,) = cases_for_tasks("short", frames, ["interpolation"], loss_mask=real)

    def oracle_with_garbage_padding(c: EvalCase) -> np.ndarray:
        out = c.frames.copy()
        out[6:] = 99
        return out

    result = evaluate_methods([case], {"o": oracle_with_garbage_padding}, baselines=False, progress=False)
    assert result.rows[0]["psnr"] == float("inf")
    assert np.isnan(result.per_frame[0]["psnr"][7])


def test_dataset_items_become_rgba_cases():
    frames = sprite_clip(num_frames=4)
    rgba = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 255.0
    alpha = rgba[3:4]
    item = {
        "video": (rgba[:3] * alpha + (1 - alpha)) * 2 - 1,  # what rdtf.data gives: composited on white
        "alpha": alpha,
        "loss_mask": torch.ones(4),
        "fps": 10.0,
        "caption_en": "a ball",
        "caption_zh": "一个球",
        "key": "k",
    }
    restored = frames_from_item(item)
    assert restored.dtype == np.uint8 and restored.shape == frames.shape
    assert np.abs(restored.astype(int) - frames.astype(int)).max() <= 1
    cases = cases_from_items([item], tasks=["i2v", "predict_forward"])
    assert [c.task for c in cases] == ["i2v", "predict_forward"] and cases[0].fps == 10.0


def test_pipeline_method_passes_mask_and_caption_only_to_text_tasks(split):
    calls = []

    def pipeline(*, frames, condition_mask, task, prompt, fps, num_inference_steps, height, width):
        assert (height, width) == frames.shape[1:3]  # generated at the ground truth's size
        calls.append((condition_mask.tolist(), task, prompt, fps, num_inference_steps))
        return Clip.from_fps(frames.copy(), fps)

    method = pipeline_method(pipeline, num_inference_steps=3)
    i2v, interpolation = split[0], split[1]
    np.testing.assert_array_equal(method(i2v), i2v.frames)
    method(interpolation)
    assert calls[0] == (i2v.condition_mask.tolist(), "i2v", "", 8.0, 3)
    assert calls[1] == (interpolation.condition_mask.tolist(), "interpolation", "a ball rolls 0", 8.0, 3)


def test_the_mean_of_samples_averages_one_sample_per_seed(split):
    def pipeline(*, frames, seed, **_):  # a "model" whose sample is its seed, everywhere
        return np.full_like(frames, 10 * seed)

    case = split[0]
    assert int(pipeline_method(pipeline, seed=3)(case).max()) == 30
    mean = pipeline_method(pipeline, samples=4, seed=3)(case)  # seeds 3, 4, 5, 6
    assert mean.dtype == np.uint8 and mean.shape == case.frames.shape and np.all(mean == 45)
    with pytest.raises(ValueError, match="samples=0"):
        pipeline_method(pipeline, samples=0)


def test_fvd_is_computed_per_task_and_method_with_a_local_i3d(tmp_path, split):
    class ChannelStats(torch.nn.Module):
        def forward(self, videos: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False) -> torch.Tensor:
            return torch.cat([videos.mean(dim=(2, 3, 4)), videos.std(dim=(2, 3, 4))], dim=1)

    torch.jit.script(ChannelStats()).save(str(tmp_path / "i3d.pt"))
    backbones = load_backbones(i3d_path=tmp_path / "i3d.pt", lpips_net=None)
    interpolation = [c for c in split if c.task == "interpolation"]
    result = evaluate_methods(interpolation, {"oracle": oracle}, backbones=backbones, resamples=50, progress=False)
    assert "fvd" not in result.unavailable
    assert result.aggregate("interpolation", "oracle", "fvd")["mean"] == pytest.approx(0.0, abs=1e-6)
    assert result.aggregate("interpolation", "crossfade", "fvd")["mean"] > 1e-3
    assert np.isnan(result.aggregate("interpolation", "oracle", "fvd")["ci_low"])


# ----------------------------------------------------------------------------- pictures and reports


def test_side_by_side_gif_plays_all_columns_in_sync(tmp_path, split):
    case = split[1]
    columns = {"input": input_frames(case), "ground truth": case.frames, "a very long method name indeed": np.zeros_like(case.frames)}
    path = side_by_side_gif(columns, tmp_path / "strip.gif", fps=8, given_mask=case.condition_mask)
    clip = read_clip(path)
    scale = -(-MIN_COLUMN_WIDTH // 32)
    assert clip.num_frames == 8
    assert clip.width == 3 * 32 * scale + 2 * 4
    # The input column shows given frames and grey where the method had to generate.
    strip = compose_strip(columns, given_mask=case.condition_mask)
    assert (strip[..., 3] == 255).all()
    cell = strip[:, 18 : 18 + 32 * scale, : 32 * scale, :3]
    assert (cell[1] == 170).all() and not (cell[0] == 170).all()
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


def test_pictures_reject_mismatched_columns(tmp_path):
    with pytest.raises(ValueError, match="differs"):
        compose_strip({"a": sprite_clip(), "b": sprite_clip(num_frames=4)})
    with pytest.raises(ValueError, match="given_mask: expected 8"):
        compose_strip({"a": sprite_clip()}, given_mask=np.ones(3))
    with pytest.raises(ValueError, match=".png, .pdf or .svg"):
        contact_sheet({"a": sprite_clip()}, tmp_path / "sheet.jpg")


def test_contact_sheet_and_plots_are_written(tmp_path, result):
    case = result.examples[0].case
    for suffix in (".png", ".pdf"):
        path = contact_sheet({"ground truth": case.frames}, tmp_path / f"sheet{suffix}", given_mask=case.condition_mask)
        assert path.stat().st_size > 1000
    assert plot_metric_by_task(result, "psnr", tmp_path / "bars.png").read_bytes()[:4] == b"\x89PNG"
    assert plot_per_frame(result, tmp_path / "frames.png", metric="ssim").stat().st_size > 1000
    with pytest.raises(ValueError, match="metric 'lpips'"):
        plot_metric_by_task(result, "lpips", tmp_path / "x.png")


def test_contact_sheet_shows_every_frame_once_with_row_and_frame_labels(tmp_path):
    names, num_frames = ["input", "ground truth", "a very long method name indeed"], 5
    colours = {(row, t): (40 * t + 20, 60 * row + 30, 7) for row in range(len(names)) for t in range(num_frames)}
    columns = {}
    for row, name in enumerate(names):
        frames = np.full((num_frames, 16, 16, 4), 255, np.uint8)
        for t in range(num_frames):
            frames[t, ..., :3] = colours[row, t]
        columns[name] = frames
    given = np.array([1, 0, 0, 0, 1], np.float32)
    sheet = compose_sheet(columns, given_mask=given, title="sticker0 · interpolation")
    assert compose_sheet(columns, given_mask=given).shape[0] < sheet.shape[0]  # the title has its own line

    cell = 16 * -(-MIN_COLUMN_WIDTH // 16)
    boxes = {}
    for key, colour in colours.items():
        ys, xs = np.nonzero((sheet == colour).all(axis=-1))
        assert len(ys) == cell * cell and np.ptp(ys) == np.ptp(xs) == cell - 1  # one whole, enlarged panel
        boxes[key] = (ys.min(), xs.min())
    for row in range(len(names)):  # rows top to bottom, frames left to right
        assert [boxes[row, t][0] for t in range(num_frames)] == [boxes[row, 0][0]] * num_frames
        assert sorted(boxes[row, t][1] for t in range(num_frames)) == [boxes[row, t][1] for t in range(num_frames)]
    assert sorted(boxes[r, 0][0] for r in range(len(names))) == [boxes[r, 0][0] for r in range(len(names))]

    top, left = boxes[0, 0]
    rgb = sheet.astype(int)
    blue = (rgb[..., 2] - rgb[..., 0] > 80) & (rgb[..., 1] < 200)
    dark = rgb.sum(axis=-1) < 300
    for t in range(num_frames):  # the frame numbers, in blue over the given frames
        header = (slice(top - 18, top), slice(boxes[0, t][1], boxes[0, t][1] + cell))
        assert dark[header].any() or blue[header].any()
        assert blue[header].any() == bool(given[t])
    for row in range(len(names)):  # each row is named left of its first panel
        assert dark[boxes[row, 0][0] : boxes[row, 0][0] + cell, :left].any()

    svg = contact_sheet(columns, tmp_path / "sheet.svg", given_mask=given).read_text(encoding="ascii")
    assert svg.startswith("<svg") and f"width='{sheet.shape[1]}'" in svg and "data:image/png;base64," in svg


def test_sweeps_plot_a_metric_against_the_parameter(tmp_path, split):
    def blur_by(amount: float):
        def method(case: EvalCase) -> np.ndarray:
            out = case.frames.astype(np.float32)
            out = (1 - amount) * out + amount * out.mean(axis=(1, 2), keepdims=True)
            return np.round(out).astype(np.uint8)

        return method

    methods = sweep_methods(blur_by, [0.0, 0.5, 1.0], "guidance")
    assert list(methods) == ["guidance=0", "guidance=0.5", "guidance=1"]
    result = evaluate_methods(split[:2], methods, baselines=False, resamples=50, progress=False)
    assert plot_metric_vs_parameter(result, "psnr", "guidance", tmp_path / "sweep.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="at least two methods named 'steps="):
        plot_metric_vs_parameter(result, "psnr", "steps", tmp_path / "none.png")
    report = write_report(result, tmp_path / "report", strips=False)
    assert any(p.name.startswith("psnr_vs_guidance") for p in (report.parent / "figures").iterdir())


def test_write_report_folder(tmp_path, result):
    path = write_report(result, tmp_path / "out", title="Tiny split")
    out = path.parent
    assert path.name == REPORT_HTML
    data = json.loads((out / RESULTS_JSON).read_text(encoding="utf-8"), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert data["title"] == "Tiny split" and data["methods"] == result.methods
    assert len(data["rows"]) == len(result.rows)
    assert data["unavailable"]["fvd"].startswith("no backbones given")
    oracle_row = next(row for row in data["rows"] if row["method"] == "oracle" and row["task"] == "i2v")
    assert oracle_row["psnr"] == "inf"
    with open(out / ROWS_CSV, newline="", encoding="utf-8") as handle:
        assert len(list(csv.DictReader(handle))) == len(result.rows)
    markdown = (out / REPORT_MD).read_text(encoding="utf-8")
    for text in ("# Tiny split", "## Summary by task", "### interpolation", "## Unavailable metrics", "## Per sticker", "sticker2", "**"):
        assert text in markdown
    html = path.read_text(encoding="utf-8")
    assert html.count("data:image/gif;base64,") == len(result.examples)
    assert "data:image/png;base64," in html and "<table>" in html
    for picture in markdown.split("](")[1:]:
        assert (out / picture.split(")")[0]).is_file()
    assert len(list((out / "strips").glob("*.gif"))) == len(result.examples) == 3
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]
    # Writing again replaces the files in place.
    assert write_report(result, out, title="Tiny split", strips=False, plots=False) == path
    with pytest.raises(ValueError, match="metrics: unknown"):
        write_report(result, out, metrics=["psnr", "beauty"])
