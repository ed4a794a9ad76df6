"""The sampling UI and its pure functions, on a tiny random model and a tiny built-in set.

The UI is driven as a person would, without a browser: set widget values, call the
handlers (what a click calls), look at the status line, the result image and the files.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from built_in import built_in_dataset
from PIL import Image

from rdtf.data import StickerDataset
from rdtf.evaluate import cases_from_items, evaluate_methods
from rdtf.io import Clip, write_clip
from rdtf.lora import adapter_names, attach_lora, lora_scales, save_lora
from rdtf.models import build_tiny_components
from rdtf.pipeline import RDTFPipeline, fit_frames
from rdtf.widgets import (
    EXPORT_FORMATS,
    SampleRequest,
    StickerStudio,
    UploadError,
    apply_lora,
    comparison_clip,
    decode_upload,
    find_loras,
    generate_sticker,
    gif_bytes,
    given_frames,
    interpolation_timing,
    read_training_log,
    sample_clip,
    sample_gallery_html,
    save_sticker,
    summary_markdown,
    task_inputs,
    training_log_figure,
)

SIZE = 16


def tiny_components():
    return build_tiny_components(seed=0, sample_size=SIZE, image_size=SIZE)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A prepared 24-sticker set at 16 px and a LoRA file with random (non-zero) weights."""
    root = tmp_path_factory.mktemp("widgets")
    built_in_dataset(root, count=24, size=SIZE, seed=0)
    unet = tiny_components().unet
    attach_lora(unet, rank=2)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    save_lora(unet, root / "runs" / "tiny-lora", extra_modules=())
    return root


@pytest.fixture(scope="module")
def pipe() -> RDTFPipeline:
    return RDTFPipeline(tiny_components())


@pytest.fixture(scope="module")
def dataset(workspace) -> StickerDataset:
    return StickerDataset(workspace / "data", split="test")


@pytest.fixture()
def studio(pipe, dataset, workspace, tmp_path) -> StickerStudio:
    apply_lora(pipe, None)  # every test starts from the base model
    ui = StickerStudio(
        pipe, dataset=dataset, loras=find_loras(workspace / "runs"), export_dir=tmp_path / "out", progress=False
    )
    ui.steps.value = 2
    return ui


def png_bytes(rgba: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgba).save(buffer, format="PNG")
    return buffer.getvalue()


def upload_entry(name: str, content: bytes) -> dict:
    """One FileUpload value entry as the browser sends it."""
    return {
        "name": name,
        "type": "",
        "size": len(content),
        "content": memoryview(content),
        "last_modified": datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc),
    }


def gif_frames(data: bytes) -> list[Image.Image]:
    image = Image.open(io.BytesIO(data))
    assert image.format == "GIF"
    frames = []
    for index in range(image.n_frames):
        image.seek(index)
        frames.append(image.convert("RGB"))
    return frames


def still(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 4), dtype=np.uint8)


# --------------------------------------------------------------------------- the pure path


@pytest.mark.parametrize("task", ["i2v", "it2v", "t2v", "predict_forward", "predict_backward"])
def test_each_task_generates_the_requested_frames_and_keeps_what_it_was_given(pipe, dataset, task):
    reference = sample_clip(dataset, 0)
    source, _ = task_inputs(task, reference)
    request = SampleRequest(
        task=task, source=source, prompt="a face bouncing", num_frames=6, fps=5.0, num_inference_steps=2
    )
    clip = generate_sticker(pipe, request)
    assert clip.frames.shape == (6, SIZE, SIZE, 4) and abs(clip.fps - 5.0) < 0.01
    fitted = fit_frames(reference.frames, SIZE, SIZE)
    if task in ("i2v", "it2v"):
        np.testing.assert_array_equal(clip.frames[0, ..., :3], fitted[0])
    if task == "predict_forward":
        np.testing.assert_array_equal(clip.frames[:3, ..., :3], fitted[:3])
    if task == "predict_backward":
        np.testing.assert_array_equal(clip.frames[3:, ..., :3], fitted[-3:])


def test_interpolation_raises_the_frame_rate_of_the_source(pipe, dataset):
    reference = sample_clip(dataset, 0)
    source, truth = task_inputs("interpolation", reference, 2)
    assert source.num_frames == (reference.num_frames + 1) // 2 and truth.num_frames == 2 * source.num_frames - 1
    clip = generate_sticker(pipe, SampleRequest(task="interpolation", source=source, num_inference_steps=2))
    assert clip.num_frames == truth.num_frames and abs(clip.fps - reference.fps) < 0.1
    np.testing.assert_array_equal(clip.frames[::2, ..., :3], fit_frames(source.frames, SIZE, SIZE))


def test_given_frames_marks_what_the_model_was_given():
    thirds = SampleRequest(task="interpolation", interpolation_factor=3)
    assert given_frames(thirds, 7).tolist() == [1, 0, 0, 1, 0, 0, 1]
    assert given_frames(SampleRequest(task="predict_backward"), 6).tolist() == [0, 0, 0, 1, 1, 1]
    assert given_frames(SampleRequest(task="i2v"), 4).tolist() == [1, 0, 0, 0]
    assert given_frames(SampleRequest(task="t2v"), 3).tolist() == [0, 0, 0]


def test_same_request_same_clip_and_the_seed_changes_it(pipe):
    request = SampleRequest(task="i2v", source=Clip.from_fps(still()[None], 1.0), num_inference_steps=2, seed=3)
    first = generate_sticker(pipe, request).frames
    np.testing.assert_array_equal(first, generate_sticker(pipe, request).frames)
    other = SampleRequest(task="i2v", source=request.source, num_inference_steps=2, seed=4)
    assert not np.array_equal(first, generate_sticker(pipe, other).frames)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(task="zoom"), "task='zoom'"),
        (dict(task="i2v"), "needs a source image"),
        (dict(task="t2v", prompt="  "), "needs a prompt"),
        (dict(task="interpolation", source="still"), "at least 2 frames"),
        (dict(task="interpolation", source="clip", interpolation_factor=5), "interpolation_factor=5"),
        (dict(task="predict_forward", source="still", num_frames=8), "has only 1"),
        (dict(task="t2v", prompt="hi", num_frames=1), "num_frames=1"),
        (dict(task="t2v", prompt="hi", scheduler="plms"), "scheduler='plms'"),
        (dict(task="t2v", prompt="hi", strength=0.0), "strength=0.0"),
        (dict(task="t2v", prompt="hi", decode="raw"), "decode='raw'"),
        (dict(task="t2v", prompt="hi", lora="/nowhere/lora"), "no LoRA file"),
    ],
)
def test_bad_requests_fail_before_any_model_work(fields, message):
    sources = {"still": Clip.from_fps(still()[None], 1.0), "clip": Clip.from_fps(np.stack([still(1), still(2)]), 4.0)}
    if isinstance(fields.get("source"), str):
        fields = {**fields, "source": sources[fields["source"]]}
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        generate_sticker(None, SampleRequest(**fields))  # no pipeline: the checks come first


def test_a_lora_is_loaded_once_and_switching_it_off_restores_the_base(pipe, workspace):
    lora = workspace / "runs" / "tiny-lora"
    request = SampleRequest(task="it2v", source=Clip.from_fps(still()[None], 1.0), prompt="spin", num_inference_steps=2)
    apply_lora(pipe, None)
    base = generate_sticker(pipe, request).frames
    with_lora = generate_sticker(pipe, dataclasses.replace(request, lora=str(lora))).frames
    assert not np.array_equal(base, with_lora)
    halfway = generate_sticker(pipe, dataclasses.replace(request, lora=str(lora), lora_scale=0.5)).frames
    assert not np.array_equal(halfway, with_lora)
    assert len(adapter_names(pipe)) == 1
    np.testing.assert_array_equal(generate_sticker(pipe, request).frames, base)
    assert set(lora_scales(pipe).values()) == {0.0}


def test_decode_upload_reads_stills_and_animations_and_refuses_bad_files(tmp_path):
    rgba = still()
    assert decode_upload(upload_entry("cat.png", png_bytes(rgba))).frames.shape == (1, SIZE, SIZE, 4)
    buffer = io.BytesIO()
    Image.fromarray(rgba[..., :3]).save(buffer, format="JPEG")
    assert decode_upload(upload_entry("cat.jpg", buffer.getvalue())).num_frames == 1
    animation = write_clip(Clip.from_fps(np.stack([still(1), still(2), still(3)]), 4.0), tmp_path / "a.gif")
    assert decode_upload(upload_entry("a.gif", animation.read_bytes())).num_frames == 3

    with pytest.raises(UploadError, match=r"notes\.txt: not an image"):
        decode_upload(upload_entry("notes.txt", b"just some text"))
    with pytest.raises(UploadError, match=r"fake\.png: not a GIF, PNG"):
        decode_upload(upload_entry("fake.png", b"just some text"))
    with pytest.raises(UploadError, match="over the 1 MB upload limit"):
        decode_upload(upload_entry("big.png", b"\0" * (2 * 2**20)), max_bytes=2**20)
    huge = io.BytesIO()
    Image.new("1", (5000, 5000)).save(huge, format="PNG")  # a few KB on disk, 25 megapixels decoded
    with pytest.raises(UploadError, match="decompression bomb"):
        decode_upload(upload_entry("bomb.png", huge.getvalue()))
    with pytest.raises(UploadError, match="empty"):
        decode_upload(upload_entry("empty.gif", b""))


def test_save_sticker_writes_every_format_and_refuses_bad_names(tmp_path):
    clip = Clip.from_fps(np.stack([still(1), still(2)]), 4.0)
    for fmt, (suffix, _) in EXPORT_FORMATS.items():
        path, summary = save_sticker(clip, tmp_path, "out", fmt)
        assert path == tmp_path / f"out{suffix}" and path.stat().st_size > 0 and str(path) in summary
    assert Image.open(tmp_path / "out.webp").size == (512, 512)  # the WhatsApp preset's canvas
    with pytest.raises(ValueError, match="plain file name"):
        save_sticker(clip, tmp_path, "../escape", "GIF")
    with pytest.raises(ValueError, match="format='BMP'"):
        save_sticker(clip, tmp_path, "out", "BMP")


# --------------------------------------------------------------------------- the UI


def test_controls_cover_the_sampler_and_sliders_update_only_on_release(studio):
    assert [value for _, value in studio.task.options] == [
        "i2v", "it2v", "t2v", "interpolation", "predict_forward", "predict_backward",
    ]
    sliders = [
        studio.text_guidance, studio.image_guidance, studio.num_frames, studio.steps, studio.fps, studio.lora_scale,
        studio.strength,
    ]
    assert all(slider.continuous_update is False for slider in sliders)
    assert list(studio.scheduler.options) == ["ddim", "dpm++", "euler"]
    assert list(studio.decode.options) == ["direct", "residual"]
    assert studio.upload.value == ()
    assert studio.factor.layout.display == "none"
    studio.task.value = "interpolation"
    assert studio.factor.layout.display is None


def test_sampler_controls_start_at_the_models_settings_and_steer_generation(studio, pipe):
    recommended = pipe.sampler_settings
    assert (studio.strength.value, studio.decode.value) == (recommended["strength"], recommended["decode"])
    studio.sample.value = 0
    studio.task.value = "i2v"
    from_noise = studio.on_generate()
    studio.strength.value, studio.decode.value = 0.5, "residual"
    request = studio.request()
    assert (request.strength, request.decode) == (0.5, "residual")
    from_the_sticker = studio.on_generate()
    assert studio.last_error is None
    assert not np.array_equal(from_noise.frames, from_the_sticker.frames)


def test_changing_task_moves_the_settings_the_model_recommends_per_task(dataset, tmp_path):
    components = tiny_components()
    components.config = dataclasses.replace(components.config, sampler={"strength": 0.3},
                                            task_sampler={"i2v": {"strength": 0.9}})
    ui = StickerStudio(RDTFPipeline(components), dataset=dataset, export_dir=tmp_path, progress=False)
    assert ui.task.value == "it2v" and ui.strength.value == 0.3
    ui.text_guidance.value = 5.0  # the user's own choice stays
    ui.task.value = "i2v"
    assert ui.strength.value == 0.9 and ui.text_guidance.value == 5.0
    ui.task.value = "interpolation"
    assert ui.strength.value == 0.3


def test_picking_a_sample_fills_the_prompt_and_generate_shows_result_beside_ground_truth(studio, dataset):
    studio.sample.value = 1
    row = dataset.rows[1]
    assert studio.prompt.value == row["caption_en"] and row["caption_zh"] in studio.caption.value
    assert studio.num_frames.value == sample_clip(dataset, 1).num_frames
    clip = studio.on_generate()
    assert clip is not None and studio.last_error is None and studio.last_result is clip
    frames = gif_frames(studio.result.value)
    assert len(frames) == clip.num_frames
    single = gif_frames(gif_bytes(comparison_clip(clip)))[0]
    assert frames[0].width > 1.9 * single.width  # two columns: generated | ground truth
    assert "it2v" in studio.status.value
    studio.task.value = "t2v"
    studio.prompt.value = "一只小猫快速地上下弹跳"
    assert studio.on_generate() is not None and studio.last_error is None


def test_interpolation_disables_the_timing_sliders_and_says_what_it_makes(studio, dataset, tmp_path):
    studio.sample.value = 0
    assert not studio.num_frames.disabled and not studio.fps.disabled and studio.timing.value == ""
    studio.task.value = "interpolation"
    assert studio.num_frames.disabled and studio.fps.disabled
    source, truth = task_inputs("interpolation", sample_clip(dataset, 0), 2)
    frames, fps = interpolation_timing(source, 2)
    assert frames == truth.num_frames and fps == pytest.approx(2 * source.fps)
    assert f"→ {frames} frames at {fps:.3g} fps" in studio.timing.value and "do not apply" in studio.timing.value
    studio.factor.value = 3
    source3 = task_inputs("interpolation", sample_clip(dataset, 0), 3)[0]
    assert f"→ {interpolation_timing(source3, 3)[0]} frames" in studio.timing.value

    studio.factor.value = 2
    studio.num_frames.value, studio.fps.value = 3, 20.0  # ignored: interpolation keeps the source's timing
    clip = studio.on_generate()
    assert clip is not None and studio.last_error is None
    assert clip.num_frames == frames and clip.fps == pytest.approx(fps, abs=0.1)
    assert f"→ {frames} frames at {clip.fps:.3g} fps" in studio.status.value
    assert "not the Frames / fps sliders" in studio.status.value
    animation = write_clip(Clip.from_fps(np.stack([still(1), still(2), still(3)]), 4.0), tmp_path / "a.gif")
    studio.upload.value = (upload_entry("a.gif", animation.read_bytes()),)
    assert "3 source frames at 4 fps ×2 → 5 frames at 8 fps" in studio.timing.value

    studio.task.value = "i2v"
    assert not studio.num_frames.disabled and not studio.fps.disabled and studio.timing.value == ""
    clip = studio.on_generate()
    assert clip.num_frames == 3 and clip.fps == pytest.approx(20.0, abs=0.1)
    assert "sliders" not in studio.status.value


def test_errors_show_in_the_ui_instead_of_raising(studio):
    studio.task.value = "t2v"
    studio.prompt.value = ""
    assert studio.on_generate() is None
    assert "needs a prompt" in studio.last_error and "needs a prompt" in studio.status.value
    studio.task.value = "i2v"
    assert studio.on_generate() is None and "needs a source image" in studio.status.value
    assert studio.on_save() is None and "generate a sticker first" in studio.status.value


def test_uploads_replace_the_sample_and_bad_uploads_get_a_clear_message(studio):
    studio.sample.value = 0
    studio.upload.value = (upload_entry("cat.png", png_bytes(still())),)
    assert studio.sample.value is None and studio.last_error is None and "16x16, still image" in studio.status.value
    studio.task.value = "i2v"
    clip = studio.on_generate()
    assert clip is not None and studio.ground_truth() is None
    assert gif_frames(studio.result.value)[0].width == gif_frames(gif_bytes(comparison_clip(clip)))[0].width

    studio.upload.value = (upload_entry("notes.txt", "不是图片".encode()),)
    assert "notes.txt: not an image" in studio.last_error
    assert studio.on_generate() is None and "UploadError" in studio.status.value
    studio.max_upload_bytes = 100
    studio.upload.value = (upload_entry("cat.png", png_bytes(still())),)
    assert "upload limit" in studio.status.value
    studio.sample.value = 0  # picking a sample clears the upload and its error
    assert studio.upload.value == () and studio.on_generate() is not None


def test_lora_selector_and_scale_change_the_result(studio, workspace):
    studio.sample.value = 0
    base = studio.on_generate().frames
    studio.lora.value = str(workspace / "runs" / "tiny-lora")
    tuned = studio.on_generate().frames
    assert not np.array_equal(base, tuned)
    studio.lora_scale.value = 0.0
    np.testing.assert_array_equal(studio.on_generate().frames, base)


def test_save_button_exports_the_last_result(studio, tmp_path):
    studio.sample.value = 0
    studio.on_generate()
    studio.export_format.value = "WebM (Telegram sticker)"
    studio.export_name.value = "wave"
    path = studio.on_save()
    assert path == tmp_path / "out" / "wave.webm" and path.is_file() and "telegram sticker" in studio.status.value
    studio.export_name.value = "a/b"
    assert studio.on_save() is None and "plain file name" in studio.status.value


# --------------------------------------------------------------------------- inline display


def test_gallery_shows_each_sample_animated_with_both_captions(dataset):
    page = sample_gallery_html(dataset, [0, 1])
    assert page.count("data:image/gif;base64,") == 2
    for row in dataset.rows[:2]:
        assert row["caption_en"] in page and row["caption_zh"] in page


def test_training_log_figure_plots_loss_per_task_and_the_task_mix(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text(
        "step,loss,weight_i2v,weight_interpolation,loss_i2v,loss_interpolation,val_i2v,val_interpolation\n"
        "1,0.5,0.2,0.8,,0.5,0.9,0.8\n"
        "2,0.4,0.4,0.6,0.4,,,\n"
        "3,0.3,0.6,0.4,0.3,0.2,0.7,0.6\n",
        encoding="utf-8",
    )
    columns = read_training_log(log)
    assert np.isnan(columns["loss_i2v"][0]) and columns["weight_interpolation"][2] == pytest.approx(0.4)
    losses, mix = training_log_figure(log).axes
    assert sorted(line.get_label() for line in losses.get_lines() if not line.get_label().startswith("_")) == [
        "i2v", "interpolation",
    ]
    assert len(mix.collections) == 2  # one band per task
    log.write_text("step,loss\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no rows"):
        read_training_log(log)


def test_summary_markdown_has_a_row_per_task_and_a_column_per_method(dataset):
    cases = cases_from_items([dataset[0], dataset[1]], ["i2v", "interpolation"])
    result = evaluate_methods(cases, {}, resamples=50, progress=False)
    table = summary_markdown(result, ("psnr",))
    assert table.startswith("**psnr ↑**")
    assert "| i2v |" in table and "| interpolation |" in table
    assert all(method in table.splitlines()[2] for method in result.methods)
    with pytest.raises(ValueError, match="none of them"):
        summary_markdown(result, ("fvd",))


def test_stills_pillow_cannot_finish_decoding_get_a_clear_message():
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="JPEG")
    with pytest.raises(UploadError, match=r"cut\.jpg: the image data is corrupt or truncated"):
        decode_upload(upload_entry("cut.jpg", buffer.getvalue()[: len(buffer.getvalue()) // 2]))
    huge = io.BytesIO()
    Image.new("L", (6000, 6000)).save(huge, format="BMP")  # stills outside rdtf.io are checked here
    with pytest.raises(UploadError, match=r"6000x6000 image is over the \d+ pixel limit"):
        decode_upload(upload_entry("huge.bmp", huge.getvalue()), max_bytes=10**8)


def test_find_loras_offers_only_the_loras_trained_on_the_given_base(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "mine").mkdir(parents=True)
    for name, card in (("on-mine", {"base": "models/mine"}), ("on-hub", {"base": "org/model"}), ("no-card", None)):
        folder = tmp_path / "loras" / name
        folder.mkdir(parents=True)
        (folder / "pytorch_lora_weights.safetensors").write_bytes(b"")
        if card is not None:
            (folder / "rdtf_card.json").write_text(json.dumps(card))
    assert [f.name for f in find_loras("loras")] == ["no-card", "on-hub", "on-mine"]
    assert [f.name for f in find_loras("loras", base=tmp_path / "models" / "mine")] == ["on-mine"]
    assert [f.name for f in find_loras("loras", base="org/model")] == ["on-hub"]
    assert find_loras("loras", base="models/other") == []

