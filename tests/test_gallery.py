"""The README gallery (rdtf.gallery) on a tiny model and a toy dataset: files, tables, markers, checks, determinism."""

from __future__ import annotations

import dataclasses
import html
import re
from pathlib import Path
from urllib.parse import unquote

import pytest
from built_in import built_in_dataset

from rdtf.gallery import GALLERY_FILE, MARKER_END, MARKER_START, build_gallery
from rdtf.io import read_clip
from rdtf.models import build_tiny_components

BEFORE = f"# Kit\n\nIntro with ünïcode and a | pipe.\r\n\n## Gallery\n\n{MARKER_START}\nold gallery\n"
AFTER = f"{MARKER_END}\n\n## Later section\n\nkept as is\n"
FAST = {"count": 2, "num_inference_steps": 2, "progress": False}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gallery-inputs")
    built_in_dataset(root, count=24, size=32, seed=1)
    build_tiny_components(seed=0).save_pretrained(root / "model")
    return root / "model", root / "data"


def _project(tmp_path: Path) -> tuple[Path, Path]:
    readme = tmp_path / "README.md"
    readme.write_bytes((BEFORE + AFTER).encode())
    return readme, tmp_path / "assets" / "gallery"


def _references(markdown: Path) -> set[Path]:
    sources = re.findall(r'src="([^"]+)"', markdown.read_text(encoding="utf-8"))
    return {(markdown.parent / unquote(html.unescape(source))).resolve() for source in sources}


def _snapshot(folder: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def gallery(inputs, tmp_path_factory) -> tuple[Path, Path, Path]:
    model, data = inputs
    readme, out = _project(tmp_path_factory.mktemp("gallery"))
    markdown = build_gallery(model, data, out, readme=readme, **FAST)
    return markdown, readme, out


def test_the_gallery_writes_every_sample_with_the_right_frame_counts(gallery):
    markdown, _, out = gallery
    assert markdown == out / GALLERY_FILE
    stills = sorted((out / "still").glob("*.png"))
    assert len(stills) == 2
    for still in stills:
        key = still.stem
        assert read_clip(still).num_frames == 1
        assert read_clip(out / "i2v" / f"{key}.gif").num_frames == 8  # the model's clip length
        truth = read_clip(out / "it2v" / f"{key}_gt.gif")
        assert read_clip(out / "it2v" / f"{key}_pred.gif").num_frames == truth.num_frames
        low, dense, whole = (read_clip(out / "interpolation" / f"{key}_{part}.gif") for part in ("low", "pred", "gt"))
        assert whole.num_frames % 2 == 1 and whole.num_frames >= truth.num_frames - 1
        assert dense.num_frames == whole.num_frames and low.num_frames == (whole.num_frames + 1) // 2
        assert low.fps == pytest.approx(whole.fps / 2, rel=0.05)


def test_the_tables_show_exactly_the_files_written_and_say_how(gallery):
    markdown, readme, out = gallery
    written = {path.resolve() for path in out.rglob("*") if path.is_file() and path.name != GALLERY_FILE}
    assert _references(markdown) == written
    assert _references(readme) == written  # same tables, paths relative to the README's folder
    text = markdown.read_text(encoding="utf-8")
    assert text.count("**English (prompt):**") == 1 and text.count("**中文 (prompt):**") == 1
    assert "`rdtf gallery --base" in text and "--seed 0" in text and "2 ddim steps" in text


def test_the_provenance_names_each_tables_settings_where_the_model_recommends_its_own(inputs, tmp_path):
    _, data = inputs
    components = build_tiny_components(seed=0)
    components.config = dataclasses.replace(
        components.config, task_sampler={"i2v": {"strength": 0.9}, "interpolation": {"decode": "residual"}})
    components.save_pretrained(tmp_path / "model")
    text = build_gallery(tmp_path / "model", data, tmp_path / "gallery", readme=None, **FAST).read_text(encoding="utf-8")
    assert "static sticker → animated: 2 ddim steps" in text and "start strength 0.9" in text
    assert "2× interpolation: 2 ddim steps" in text and "residual decode" in text


def test_only_the_text_between_the_markers_changes(gallery):
    _, readme, _ = gallery
    content = readme.read_bytes()
    assert content.startswith(BEFORE.encode()[: -len("old gallery\n")]) and content.endswith(AFTER.encode())
    assert b"old gallery" not in content and b"### Frame interpolation" in content
    assert content.count(MARKER_START.encode()) == 1 and content.count(MARKER_END.encode()) == 1


def test_a_second_run_rewrites_identical_files(inputs, gallery):
    model, data = inputs
    markdown, readme, out = gallery
    before = _snapshot(readme.parent)
    assert build_gallery(model, data, out, readme=readme, **FAST) == markdown
    assert _snapshot(readme.parent) == before


def test_a_readme_without_markers_is_refused_before_any_generation(inputs, tmp_path):
    model, data = inputs
    readme, out = _project(tmp_path)
    readme.write_text("# Kit\n\nno markers here\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"README\.md.*gallery:start"):
        build_gallery(model, data, out, readme=readme, **FAST)
    assert not out.exists()
    assert readme.read_text(encoding="utf-8") == "# Kit\n\nno markers here\n"


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"count": 0}, ValueError, "count=0"),
        ({"count": 4}, ValueError, "count=4: only 3 of the 3 clips"),
        ({"exclude_motions": ("wobble", "flip")}, ValueError, r"count=2: only 1 .*'wobble', 'flip'"),
        ({"split": "nope"}, ValueError, "split='nope'"),
        ({"data": "missing-data"}, FileNotFoundError, "missing-data"),
        ({"model": "missing-model"}, ValueError, "missing-model"),
        ({"scheduler": "fast"}, ValueError, "scheduler='fast'"),
        ({"strength": 0.0}, ValueError, "strength=0.0"),
        ({"decode": "raw"}, ValueError, "decode='raw'"),
    ],
)
def test_bad_inputs_are_named_before_any_generation(inputs, tmp_path, change, error, message):
    model, data = inputs
    readme, out = _project(tmp_path)
    arguments = {"model": model, "data": data, **FAST, **change}
    for name in ("model", "data"):  # a str here names a folder that does not exist
        if isinstance(arguments[name], str):
            arguments[name] = tmp_path / arguments[name]
    with pytest.raises(error, match=message):
        build_gallery(out_dir=out, readme=readme, **arguments)
    assert not out.exists()
