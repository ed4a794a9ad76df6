"""`rdtf ...` end to end on a tiny model: every subcommand does its job or fails with a named reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rdtf.cli import main
from rdtf.io import Clip, read_clip, write_clip
from rdtf.models import build_tiny_components


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "model"
    build_tiny_components(seed=0, sample_size=16, image_size=16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli-data")
    assert main(["synth", str(root / "set"), "--count", "24", "--size", "32", "--seed", "1"]) == 0
    assert main(["prepare", str(root / "set"), str(root / "data"), "--size", "32", "--frames", "8"]) == 0
    return root / "data"


def _still(path: Path) -> Path:
    frame = np.random.default_rng(0).integers(0, 256, (1, 16, 16, 4), dtype=np.uint8)
    frame[..., 3] = 255
    return write_clip(Clip.from_fps(frame, 8), path)


SAMPLER = ["--steps", "2", "--quiet"]


def test_sample_writes_the_requested_sticker(tiny_model, tmp_path, capsys):
    out = tmp_path / "out.gif"
    code = main(["sample", "--base", str(tiny_model), "--image", str(_still(tmp_path / "in.png")),
                 "--prompt", "一只小猫上下弹跳", "--task", "it2v", "--frames", "8", *SAMPLER, "-o", str(out)])
    assert code == 0 and "8 frames" in capsys.readouterr().out
    assert read_clip(out).num_frames == 8


def test_sample_with_an_explicit_mask_keeps_the_given_frames(tiny_model, tmp_path):
    frames = np.random.default_rng(1).integers(0, 256, (8, 16, 16, 4), dtype=np.uint8)
    frames[..., 3] = 255
    source = write_clip(Clip.from_fps(frames, 8), tmp_path / "in.png")
    out = tmp_path / "out.png"
    assert main(["sample", "--base", str(tiny_model), "--image", str(source), "--mask", "10101010", "--strength", "0.5",
                 *SAMPLER, "-o", str(out)]) == 0
    result = read_clip(out).frames
    assert np.array_equal(result[::2, ..., :3], frames[::2, ..., :3])


def test_interpolate_multiplies_the_frame_rate(tiny_model, tmp_path, capsys):
    frames = np.random.default_rng(2).integers(0, 256, (3, 16, 16, 4), dtype=np.uint8)
    frames[..., 3] = 255
    source = write_clip(Clip.from_fps(frames, 4), tmp_path / "slow.png")
    out = tmp_path / "smooth.png"
    assert main(["interpolate", str(source), str(out), "--factor", "2", "--base", str(tiny_model), *SAMPLER]) == 0
    dense = read_clip(out)
    assert dense.num_frames == 5 and dense.fps == pytest.approx(8, rel=0.05)


def test_bad_input_is_reported_not_raised(tiny_model, tmp_path, capsys):
    code = main(["sample", "--base", str(tiny_model), "--image", str(tmp_path / "missing.png"), "-o",
                 str(tmp_path / "x.gif")])
    assert code == 2 and "missing.png" in capsys.readouterr().err
    code = main(["sample", "--base", str(tmp_path / "no-model"), "-o", str(tmp_path / "x.gif"), *SAMPLER])
    assert code == 2 and "no-model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", "--base", str(tiny_model), "--lora", "a.safetensors:high", "-o", "x.gif"])


@pytest.fixture(scope="module")
def lora(tiny_model, prepared, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli-lora") / "lora"
    assert main(["train", "--base", str(tiny_model), "--data", str(prepared), "--output-dir", str(out),
                 "--split", "", "--max-steps", "2", "--batch-size", "2", "--validate-every", "99",
                 "--no-progress", "--trackers", "--lora-rank", "4", "--learning-rate", "0.01"]) == 0
    return out


def test_train_flags_reach_the_run(lora):
    card = json.loads((lora / "rdtf_card.json").read_text())
    assert card["config"]["lora_rank"] == 4 and card["config"]["learning_rate"] == 0.01 and card["steps"] == 2


def test_sample_with_a_scaled_lora(tiny_model, lora, tmp_path):
    common = ["sample", "--base", str(tiny_model), "--prompt", "a cat", "--task", "t2v", "--frames", "4", *SAMPLER]
    assert main([*common, "-o", str(tmp_path / "base.png")]) == 0
    assert main([*common, "--lora", f"{lora}:0.5", "-o", str(tmp_path / "lora.png")]) == 0
    assert not np.array_equal(read_clip(tmp_path / "base.png").frames, read_clip(tmp_path / "lora.png").frames)


def test_evaluate_compares_base_with_base_plus_lora(tiny_model, prepared, lora, tmp_path):
    out = tmp_path / "report"
    assert main(["evaluate", "--data", str(prepared), "--split", "", "--limit", "2", "--model", f"base={tiny_model}",
                 "--model", f"lora={tiny_model}+{lora}:1.0", "--tasks", "interpolation", "--steps", "2",
                 "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {"base", "lora", "crossfade", "flow"} <= {row["method"] for row in rows}
    psnr = {row["method"]: row["psnr"] for row in rows if row["key"] == rows[0]["key"]}
    assert psnr["base"] != psnr["lora"]


def test_evaluate_scores_the_mean_of_samples_beside_one_sample(tiny_model, prepared, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["evaluate", "--data", str(prepared), "--split", "", "--limit", "2", "--model", f"base={tiny_model}",
                 "--tasks", "it2v", "--steps", "2", "--mean-of", "3", "--no-baselines", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    psnr = {row["method"]: row["psnr"] for row in rows if row["key"] == rows[0]["key"]}
    assert set(psnr) == {"base", "base-mean3"} and psnr["base"] != psnr["base-mean3"]
    assert main(["evaluate", "--data", str(prepared), "--model", str(tiny_model), "--mean-of", "0"]) == 2
    assert "--mean-of 0" in capsys.readouterr().err


def test_export_meets_a_preset(tmp_path, capsys):
    frames = np.random.default_rng(3).integers(0, 256, (6, 64, 64, 4), dtype=np.uint8)
    source = write_clip(Clip.from_fps(frames, 10), tmp_path / "in.png")
    assert main(["export", str(source), str(tmp_path / "out.webp"), "--preset", "whatsapp"]) == 0
    assert read_clip(tmp_path / "out.webp").width == 512


def test_demo_smoke_runs_every_notebook_on_the_embedded_model(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path), "--smoke"]) == 0
    pages = sorted(path.name for path in (tmp_path / "reports" / "notebooks").glob("*.html"))
    assert pages == ["01_prepare_data.html", "02_finetune_lora.html", "03_sample_interactive.html",
                     "04_compare_ground_truth.html"]
    assert (tmp_path / "reports" / "compare" / "report.html").is_file()
    assert (tmp_path / "runs" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert "comparison report:" in capsys.readouterr().out


def test_demo_without_the_embedded_model_says_how_to_rebuild_it(tmp_path):
    from rdtf.demo import run_demo

    with pytest.raises(FileNotFoundError, match="rdtf build-tiny"):
        run_demo(tmp_path, smoke=True, model=tmp_path / "no-model")


def test_train_vae_writes_a_loadable_vae(prepared, tmp_path, capsys):
    out = tmp_path / "vae"
    assert main(["train-vae", "--data", str(prepared), "--output-dir", str(out), "--channels", "8", "16",
                 "--steps", "3", "--batch-size", "4", "--quiet"]) == 0
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert "VAE written" in capsys.readouterr().out


def test_help_and_light_commands_start_without_torch():
    """`rdtf --help` lists every command without importing torch; `rdtf train --help` still shows config flags."""
    import subprocess
    import sys

    probe = (
        "import sys, contextlib, io\n"
        "from rdtf.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    try:\n"
        "        main(sys.argv[1:])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('torch' in sys.modules, 'build-tiny' in out.getvalue(), '--max-steps' in out.getvalue())\n"
    )
    def run(*args: str) -> str:
        return subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, check=True).stdout
    assert run("--help").split() == ["False", "True", "False"]
    assert run("train", "--help").split()[::2] == ["True", "True"]


def test_build_tiny_takes_refine_phases_as_lists_and_a_model_to_start_from(tmp_path, capsys):
    from rdtf.cli import _dataclass_overrides, build_parser
    from rdtf.tiny import TinyRecipe

    phases = ["--refine-steps", "1000", "600", "--refine-learning-rate", "3e-4", "1e-4", "--refine-batch-size", "32", "128"]
    args = build_parser("build-tiny").parse_args(["build-tiny", *phases])
    assert TinyRecipe(**_dataclass_overrides(args, TinyRecipe)).refine_phases() == [(1000, 3e-4, 32), (600, 1e-4, 128)]
    assert main(["build-tiny", "--from-model", str(tmp_path / "no-model"), "--work-dir", str(tmp_path / "work"),
                 *phases]) != 0
    assert "no-model/training/rdtf_recipe.json: no such file; --from-model takes a model folder" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()
