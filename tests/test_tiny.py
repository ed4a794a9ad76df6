"""The rdtf-tiny recipe end to end at toy sizes: every stage runs, the outputs load and sample, reruns skip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rdtf.lora import load_lora
from rdtf.pipeline import RDTFPipeline
from rdtf.tiny import (
    LORA_STAMP,
    RECIPE_NAME,
    SWEEP_NAME,
    TRAINING_DIR,
    TinyRecipe,
    best_following,
    build_tiny_model,
    fewest_steps_within,
    most_lifelike,
    training_changes,
    training_precision,
)
from rdtf.train import CARD_NAME, LOG_NAME, MODEL_DIR

TOY = dict(count=40, size=32, vae_channels=[8, 16], latent_channels=6, vae_steps=3, vae_batch_size=4, unet_channels=[8, 16],
           unet_attention_head_dim=8, text_width=8, text_tower_steps=2, unet_steps=3, refine_steps=[2], refine_curriculum="adaptive", refine_learning_rate=[5e-3], refine_batch_size=[2], batch_size=2, lora_steps=2, lora_rank=2, validate_every=3,
           gpu_mixed_precision="bf16", cpu_mixed_precision="bf16", curriculum="uniform",
           sampler_strengths=[1.0, 0.5], sampler_decodes=["direct", "residual"], sampler_step_counts=[1, 2], sampler_step_tolerance_db=100.0, sampler_text_guidance=[1.0, 3.0], sampler_image_guidance=[1.0], sampler_clips=2, sampler_text_control_motions=2, sampler_text_control_tolerance=0.25, sampler_i2v_step_counts=[2, 1], sampler_i2v_strengths=[1.0, 0.5], sampler_i2v_decodes=["direct"], sampler_i2v_clips=2)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    model, lora = build_tiny_model(TinyRecipe(**TOY), root / "work", root / "assets" / "toy", progress=False)
    return root, model, lora


def test_the_recipe_ships_a_model_with_its_record_and_a_lora(built):
    root, model, lora = built
    assert lora == root / "assets" / "toy-lora-spin"
    record = model / TRAINING_DIR
    assert json.loads((record / RECIPE_NAME).read_text())["unet_steps"] == 3
    assert json.loads((record / CARD_NAME).read_text())["steps"] == 3
    assert (record / LOG_NAME).exists() and (record / "autoencoder_metrics.json").exists()
    assert json.loads((record / "text_tower_metrics.json").read_text())["steps"] == 2
    sweep = json.loads((record / SWEEP_NAME).read_text())
    shared = sweep["shared"]
    assert shared["tasks"] == ["it2v", "interpolation"]
    assert set(shared["psnr_db_by_guidance"]) == {"text 1 image 1", "text 3 image 1"}
    config = RDTFPipeline.from_pretrained(model).components.config
    by_start = shared["psnr_db_by_strength_and_decode"]
    assert set(by_start) == {"1.0 direct", "1.0 residual", "0.5 direct", "0.5 residual"}
    assert set(shared["psnr_db_by_steps"]) == {"1", "2"}
    assert shared["psnr_db_by_steps"]["2"] == max(by_start.values())  # the most steps were scored once, reused
    best_strength, best_decode = max(by_start, key=by_start.get).split()
    assert (shared["chosen"]["strength"], shared["chosen"]["decode"]) == (float(best_strength), best_decode)
    assert config.sampler == shared["chosen"] and config.sampler["num_inference_steps"] == 1  # any count is within 100 dB
    for task in ("it2v", "interpolation"):  # each swept task's own choice, from its own clips
        own = sweep["by_task"][task]
        assert own["tasks"] == [task]
        by_own_start = own["psnr_db_by_strength_and_decode"]
        if task == "it2v":  # among the options that follow the caption
            control = own["text_control_by_strength_and_decode"]
            assert set(control) == set(by_own_start) and all(0 <= share <= 1 for share in control.values())
            assert set(own["text_control_by_guidance"]) == set(own["psnr_db_by_guidance"])
            best = best_following(by_own_start, control, TOY["sampler_text_control_tolerance"])
        else:
            assert "text_control_by_strength_and_decode" not in own
            best = max(by_own_start, key=by_own_start.get)
        strength, decode = best.split()
        assert (own["chosen"]["strength"], own["chosen"]["decode"]) == (float(strength), decode)
        assert {**config.sampler, **config.task_sampler.get(task, {})} == own["chosen"]
    t2v = {**config.sampler, **config.task_sampler.get("t2v", {})}  # text-driven like it2v, with no truth to score
    assert t2v == {**config.sampler, "text_guidance": sweep["by_task"]["it2v"]["chosen"]["text_guidance"]}
    # the shared choice is scored on the mean of the tasks' own scores of the same options
    for name, psnr in shared["psnr_db_by_guidance"].items():
        own = [sweep["by_task"][task]["psnr_db_by_guidance"][name] for task in ("it2v", "interpolation")]
        assert psnr == pytest.approx(np.mean(own))
    i2v_scores = sweep["i2v"]["by_steps_strength_and_decode"]
    assert list(i2v_scores) == ["1 steps 1 direct", "1 steps 0.5 direct", "2 steps 1 direct", "2 steps 0.5 direct"]
    assert all(np.isfinite(s["psnr"]) for s in i2v_scores.values())
    i2v = RDTFPipeline.from_pretrained(model).sampler_settings_for("i2v")
    assert i2v == {**config.sampler, **sweep["i2v"]["chosen"]}
    card = json.loads((lora / CARD_NAME).read_text())
    assert card["config"]["only_motions"] == ["spin"] and card["base"] == str(model)
    recipe = TinyRecipe(**TOY)
    assert card["config"]["timestep_shift"] == recipe.unet_timestep_shift  # it2v starts at pure noise
    assert card["config"]["lora_targets"] == recipe.lora_targets == "attention+conv"
    assert card["config"]["mixed_precision"] == recipe.lora_mixed_precision == "no"  # on every machine
    precision = training_precision(recipe)  # the base's: bf16 on a GPU or an AVX-512 CPU, else fp32
    assert json.loads((record / CARD_NAME).read_text())["config"]["mixed_precision"] == precision
    assert json.loads((record / CARD_NAME).read_text())["config"]["curriculum"] == "uniform"
    assert not list(model.parent.glob(".tmp-*")), "no staging folder may be left behind"


def test_the_shipped_model_samples_and_its_lora_changes_the_output(built):
    _, model, lora = built
    pipe = RDTFPipeline.from_pretrained(model)
    image = np.full((32, 32, 3), 200, np.uint8)
    image[8:24, 8:24] = (30, 90, 200)
    kwargs = dict(image=image, prompt="a face spinning around", num_frames=8, num_inference_steps=2, seed=0)
    plain = pipe.generate(**kwargs)
    assert plain.shape == (8, 32, 32, 3)
    load_lora(pipe.components.unet, lora / "pytorch_lora_weights.safetensors")
    assert not np.allclose(pipe.generate(**kwargs), plain, atol=1e-4)


def test_a_rerun_skips_finished_stages_and_another_recipe_is_refused(built):
    root, model, _ = built
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    stamp, sweep_stamp = weights.stat().st_mtime_ns, (model / TRAINING_DIR / SWEEP_NAME).stat().st_mtime_ns
    build_tiny_model(TinyRecipe(**TOY), root / "work", root / "assets" / "toy", progress=False)
    assert weights.stat().st_mtime_ns == stamp and (model / TRAINING_DIR / SWEEP_NAME).stat().st_mtime_ns == sweep_stamp
    sweep_file = model / TRAINING_DIR / SWEEP_NAME  # a sweep from before the per-task choices is redone
    sweep_file.write_text(json.dumps({k: v for k, v in json.loads(sweep_file.read_text()).items() if k != "by_task"}))
    build_tiny_model(TinyRecipe(**TOY), root / "work", root / "assets" / "toy", progress=False)
    assert "by_task" in json.loads(sweep_file.read_text()) and weights.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match=r"other \['seed'\]"):
        build_tiny_model(TinyRecipe(**{**TOY, "seed": 1}), root / "work", root / "assets" / "toy", progress=False)


def test_new_sweep_settings_rerun_only_the_sweep(built):
    root, model, _ = built
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    resweep = {**TOY, "sampler_strengths": [0.5], "sampler_decodes": ["residual"]}
    build_tiny_model(TinyRecipe(**resweep), root / "work", root / "assets" / "toy", progress=False)
    assert weights.stat().st_mtime_ns == stamp
    sweep = json.loads((model / TRAINING_DIR / SWEEP_NAME).read_text())
    assert set(sweep["shared"]["psnr_db_by_strength_and_decode"]) == {"0.5 residual"}
    assert json.loads((model / TRAINING_DIR / RECIPE_NAME).read_text())["sampler_decodes"] == ["residual"]
    recommended = RDTFPipeline.from_pretrained(model).sampler_settings
    assert (recommended["strength"], recommended["decode"]) == (0.5, "residual")


def test_new_i2v_sweep_settings_rerun_only_the_i2v_sweep(built):
    root, model, _ = built
    main = {**TOY, "sampler_strengths": [0.5], "sampler_decodes": ["residual"]}  # as the test above left it
    build_tiny_model(TinyRecipe(**main), root / "work", root / "assets" / "toy", progress=False)
    before = json.loads((model / TRAINING_DIR / SWEEP_NAME).read_text())
    i2v_sweep = {"sampler_i2v_step_counts": [3], "sampler_i2v_strengths": [0.7], "sampler_i2v_decodes": ["residual"]}
    build_tiny_model(TinyRecipe(**{**main, **i2v_sweep}), root / "work", root / "assets" / "toy", progress=False)
    after = json.loads((model / TRAINING_DIR / SWEEP_NAME).read_text())
    assert {k: v for k, v in after.items() if k != "i2v"} == {k: v for k, v in before.items() if k != "i2v"}
    assert set(after["i2v"]["by_steps_strength_and_decode"]) == {"3 steps 0.7 residual"}
    config = json.loads((model / "rdtf_config.json").read_text())
    # residual is already every task's decode, so only what differs is kept
    assert config["task_sampler"]["i2v"] == {"num_inference_steps": 3, "strength": 0.7}
    pipe = RDTFPipeline.from_pretrained(model)
    assert pipe.sampler_settings_for("i2v")["strength"] == 0.7 and pipe.sampler_settings["strength"] == 0.5
    assert pipe.sampler_settings_for("i2v")["num_inference_steps"] == 3 and pipe.sampler_settings["num_inference_steps"] == 1


def test_the_i2v_sweep_samples_only_options_it_has_not_scored(built):
    root, model, _ = built
    sweep_file = model / TRAINING_DIR / SWEEP_NAME
    main = {**TOY, **json.loads(sweep_file.read_text())["recipe"]}  # the main sweep as the tests above left it
    two = {"sampler_i2v_step_counts": [1], "sampler_i2v_strengths": [1.0, 0.5], "sampler_i2v_decodes": ["direct"]}
    build_tiny_model(TinyRecipe(**{**main, **two}), root / "work", root / "assets" / "toy", progress=False)
    sweep = json.loads(sweep_file.read_text())
    stored = {"1 steps 1 direct": {"psnr": 10.0, "moving": 1.0, "flow_ratio": 1.0, "sharpness": 1.0},
              "1 steps 0.5 direct": {"psnr": 12.0, "moving": 0.0, "flow_ratio": 0.1, "sharpness": 1.0}}
    sweep["i2v"]["by_steps_strength_and_decode"] = stored  # scores no sampling would give
    sweep_file.write_text(json.dumps(sweep))
    for guard, strength in ((1.0, 0.5), (5.0, 1.0)):
        build_tiny_model(TinyRecipe(**{**main, **two, "sampler_i2v_max_psnr_drop_db": guard}), root / "work",
                         root / "assets" / "toy", progress=False)
        after = json.loads(sweep_file.read_text())["i2v"]
        assert after["by_steps_strength_and_decode"] == stored and after["chosen"]["strength"] == strength
        assert RDTFPipeline.from_pretrained(model).sampler_settings_for("i2v")["strength"] == strength
    three = {**two, "sampler_i2v_strengths": [1.0, 0.5, 0.7]}  # a new option alone is sampled
    build_tiny_model(TinyRecipe(**{**main, **three}), root / "work", root / "assets" / "toy", progress=False)
    scores = json.loads(sweep_file.read_text())["i2v"]["by_steps_strength_and_decode"]
    assert list(scores) == ["1 steps 1 direct", "1 steps 0.5 direct", "1 steps 0.7 direct"]
    assert {name: scores[name] for name in stored} == stored and np.isfinite(scores["1 steps 0.7 direct"]["psnr"])


def test_the_refine_phase_trains_on_from_the_base_and_ships_its_weights_and_record(built):
    root, model, _ = built
    work = root / "work"
    unet = Path("unet") / "diffusion_pytorch_model.safetensors"
    shipped = load_file(model / unet)
    assert all(torch.equal(shipped[k], v) for k, v in load_file(work / "refine" / MODEL_DIR / unet).items())
    assert any(not torch.equal(shipped[k], v) for k, v in load_file(work / "base" / MODEL_DIR / unet).items())
    card = json.loads((model / TRAINING_DIR / f"refine_{CARD_NAME}").read_text())
    assert card["steps"] == 2 and card["base"] == str(work / "base" / MODEL_DIR)
    assert card["config"]["curriculum"] == "adaptive" and card["config"]["learning_rate"] == 5e-3
    assert card["config"]["seed"] == TOY.get("seed", 0) + 1 and card["config"]["exclude_motions"] == ["spin"]
    assert json.loads((model / TRAINING_DIR / CARD_NAME).read_text())["steps"] == 3  # the base's record stays
    assert (model / TRAINING_DIR / f"refine_{LOG_NAME}").exists()


def test_an_appended_refine_phase_trains_on_from_the_shipped_model_in_a_new_work_folder(built, tmp_path):
    root, model, lora = built
    unet = Path("unet") / "diffusion_pytorch_model.safetensors"
    longer = {**TOY, "refine_steps": [2, 2], "refine_learning_rate": [5e-3, 1e-3], "refine_batch_size": [2, 3]}
    work, out = tmp_path / "work", tmp_path / "toy"
    shutil.copytree(root / "work" / "data", work / "data")  # prepared elsewhere, e.g. carried to a GPU machine
    manifest = (work / "data" / "manifest.jsonl").stat().st_mtime_ns
    build_tiny_model(TinyRecipe(**longer), work, out, progress=False, stop_after="lora", from_model=model)
    assert (work / "data" / "manifest.jsonl").stat().st_mtime_ns == manifest and not (work / "stickers").exists()
    # the record stood in for the finished stages: nothing before the new phase was trained again
    assert (work / "vae" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        model / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert not (work / "init").exists() and not (work / "base" / MODEL_DIR).exists()
    assert (work / "refine" / MODEL_DIR / unet).read_bytes() == (model / unet).read_bytes()
    card = json.loads((work / "refine2" / CARD_NAME).read_text())
    assert card["steps"] == 2 and card["base"] == str(work / "refine" / MODEL_DIR)
    assert (card["config"]["batch_size"], card["config"]["learning_rate"]) == (3, 1e-3)
    assert card["config"]["seed"] == TOY.get("seed", 0) + 2
    # what ships is the new phase's model, with every phase's record, and a LoRA trained on it
    assert (out / unet).read_bytes() == (work / "refine2" / MODEL_DIR / unet).read_bytes() != (model / unet).read_bytes()
    record = out / TRAINING_DIR
    for prefix in ("", "refine_"):
        assert (record / f"{prefix}{CARD_NAME}").read_bytes() == (model / TRAINING_DIR / f"{prefix}{CARD_NAME}").read_bytes()
    assert json.loads((record / f"refine2_{CARD_NAME}").read_text()) == card
    assert json.loads((record / RECIPE_NAME).read_text())["refine_batch_size"] == [2, 3]
    new_lora = out.parent / "toy-lora-spin"
    assert json.loads((new_lora / CARD_NAME).read_text())["base"] == str(out)
    weights = "pytorch_lora_weights.safetensors"
    assert (new_lora / weights).read_bytes() != (lora / weights).read_bytes()
    # shipped elsewhere, the new model keeps its LoRA: another work folder adopts both and trains nothing
    again, elsewhere = tmp_path / "again", tmp_path / "elsewhere" / "toy"
    build_tiny_model(TinyRecipe(**longer), again, elsewhere, progress=False, stop_after="lora", from_model=out)
    assert (elsewhere / unet).read_bytes() == (out / unet).read_bytes()
    assert (elsewhere.parent / "toy-lora-spin" / weights).read_bytes() == (new_lora / weights).read_bytes()
    assert {path.name for path in (again / "refine2").iterdir()} == {CARD_NAME, LOG_NAME, MODEL_DIR}  # not trained
    assert {path.name for path in (again / "lora-spin").iterdir()} == {CARD_NAME, LOG_NAME, weights, LORA_STAMP}
    # other LoRA settings retrain the LoRA alone
    build_tiny_model(TinyRecipe(**{**longer, "lora_steps": 1}), again, elsewhere, progress=False, stop_after="lora")
    assert json.loads((elsewhere.parent / "toy-lora-spin" / CARD_NAME).read_text())["steps"] == 1
    assert (elsewhere / unet).read_bytes() == (out / unet).read_bytes()
    # a work folder whose data is not what its record trained on is refused before any training
    base_card = work / "base" / CARD_NAME
    base_card.write_text(json.dumps({**json.loads(base_card.read_text()), "data_hash": "0" * 16}))
    with pytest.raises(ValueError, match="not the dataset .* records training on"):
        build_tiny_model(TinyRecipe(**longer), work, out, progress=False, stop_after="lora")


def test_adopting_a_model_is_refused_for_other_training_choices_or_a_used_folder(built, tmp_path):
    _, model, _ = built
    with pytest.raises(ValueError, match=r"built with other \['seed'\]; appended refine phases can continue it"):
        build_tiny_model(TinyRecipe(**{**TOY, "seed": 3}), tmp_path / "work", tmp_path / "toy", from_model=model)
    assert not (tmp_path / "work").exists()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds \['notes.txt'\] but is not a work folder"):
        build_tiny_model(TinyRecipe(**TOY), tmp_path / "used", tmp_path / "toy", from_model=model)
    assert (tmp_path / "used" / "notes.txt").read_text() == "mine"
    with pytest.raises(FileNotFoundError, match="--from-model takes a model folder"):
        build_tiny_model(TinyRecipe(**TOY), tmp_path / "work", tmp_path / "toy", from_model=tmp_path / "used")


def test_a_lora_trained_on_another_model_is_not_adopted(built, tmp_path):
    _, model, lora = built
    shutil.copytree(model, tmp_path / "toy")
    shutil.copytree(lora, tmp_path / "toy-lora-spin")
    stamp_file = tmp_path / "toy-lora-spin" / LORA_STAMP
    stamp = json.loads(stamp_file.read_text())
    assert stamp["base_card"] == json.loads((model / TRAINING_DIR / f"refine_{CARD_NAME}").read_text())
    stamp_file.write_text(json.dumps({**stamp, "base_card": {**stamp["base_card"], "steps": 1}}))  # an earlier model
    build_tiny_model(TinyRecipe(**TOY), tmp_path / "work", tmp_path / "out", progress=False, stop_after="data",
                     from_model=tmp_path / "toy")
    assert (tmp_path / "work" / "refine" / MODEL_DIR).is_dir() and not (tmp_path / "work" / "lora-spin").exists()


def test_refine_phases_may_be_appended_but_not_changed_or_dropped():
    recipe = TinyRecipe(**TOY)
    longer = TinyRecipe(**{**TOY, "refine_steps": [2, 5], "refine_learning_rate": [5e-3, 1e-4], "refine_batch_size": [2, 8]})
    assert training_changes(recipe, longer) == []
    assert training_changes(longer, recipe) == ["refine_batch_size", "refine_learning_rate", "refine_steps"]
    other = TinyRecipe(**{**TOY, "refine_steps": [3]})
    assert training_changes(recipe, other) == ["refine_steps"]


def test_a_record_from_before_refine_phases_were_lists_reads_as_one_phase_or_none():
    old = {"refine_steps": 1000, "refine_learning_rate": 3e-4, "batch_size": 16}
    recipe = TinyRecipe.from_record(old)
    assert recipe.refine_phases() == [(1000, 3e-4, 16)]
    assert TinyRecipe.from_record({**old, "refine_steps": 0}).refine_phases() == []
    assert TinyRecipe.from_record({}) == TinyRecipe()  # fields newer than a record keep their defaults


def test_it2v_takes_the_best_psnr_among_the_options_that_follow_the_caption():
    psnr = {"static": 15.0, "moving": 14.2, "wild": 13.0, "blind": 14.9}
    control = {"static": 0.25, "moving": 0.7, "wild": 0.8, "blind": 0.3}
    assert best_following(psnr, control, tolerance=0.1) == "moving"
    assert best_following(psnr, control, tolerance=0.0) == "wild"
    assert best_following(psnr, control, tolerance=1.0) == "static"  # no constraint left: PSNR alone


@pytest.mark.parametrize(("gpu", "capability", "cpu_precision", "expected"), [
    (True, "AVX2", "no", "bf16"),  # the GPU's own
    (False, "AVX512", "bf16", "bf16"),
    (False, "AVX2", "bf16", "no"),  # emulated bf16 is slower than fp32
    (False, "DEFAULT", "bf16", "no"),
    (False, "AVX2", "no", "no"),
])
def test_the_training_precision_is_bf16_only_where_the_machine_computes_it(monkeypatch, gpu, capability,
                                                                         cpu_precision, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    recipe = TinyRecipe(gpu_mixed_precision="bf16", cpu_mixed_precision=cpu_precision)
    assert training_precision(recipe) == expected


@pytest.mark.parametrize(("change", "message"), [
    ({"condition_fill": "blur"}, "condition_fill='blur': expected one of position, interpolate, flow"),
    ({"curriculum": "random"}, "curriculum='random': expected one of uniform, linear, adaptive"),
    ({"refine_curriculum": "random"}, "refine_curriculum='random': expected one of uniform, linear, adaptive"),
    ({"cpu_mixed_precision": "fp8"}, "cpu_mixed_precision='fp8'"),
    ({"lora_mixed_precision": "fp8"}, "lora_mixed_precision='fp8'"),
    ({"sampler_scheduler": "pndm"}, "sampler_scheduler='pndm'"),
    ({"lora_targets": "convs"}, r"lora_targets='convs': expected one of attention, attention\+conv"),
    ({"sampler_text_control_motions": 1}, "sampler_text_control_motions=1: expected at least 2"),
    ({"refine_batch_size": [2, 4]}, r"refine_batch_size=\[2, 4\]: expected one value per refine phase"),
    ({"refine_steps": [0], "refine_learning_rate": [1e-3]}, r"refine_steps=\[0\].*: expected positive numbers"),
    ({"sampler_i2v_decodes": ["blurry"]}, r"sampler_i2v_decodes=\['blurry'\]: expected a non-empty list"),
])
def test_a_bad_recipe_choice_is_refused_before_any_stage_runs(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        build_tiny_model(TinyRecipe(**{**TOY, **change}), tmp_path / "work", tmp_path / "toy", progress=False)
    assert not (tmp_path / "work").exists()


def test_stop_after_runs_only_the_early_stages(tmp_path):
    with pytest.raises(ValueError, match="stop_after='vea'"):
        build_tiny_model(TinyRecipe(**TOY), tmp_path / "work", tmp_path / "toy", progress=False, stop_after="vea")
    assert not (tmp_path / "work").exists()
    build_tiny_model(TinyRecipe(**TOY), tmp_path / "work", tmp_path / "toy", progress=False, stop_after="init")
    assert (tmp_path / "work" / "init" / "unet").is_dir() and (tmp_path / "work" / "vae" / "vae").is_dir()
    unet_config = json.loads((tmp_path / "work" / "init" / "unet" / "config.json").read_text())
    assert unet_config["attention_head_dim"] == TOY["unet_attention_head_dim"]
    assert not (tmp_path / "work" / "base").exists() and not (tmp_path / "toy").exists()


def test_a_work_folder_refuses_other_training_choices_even_ones_newer_than_it(tmp_path):
    build_tiny_model(TinyRecipe(**TOY), tmp_path / "work", tmp_path / "toy", progress=False, stop_after="data")
    with pytest.raises(ValueError, match=r"other \['vae_steps'\]; use a new --work-dir"):
        build_tiny_model(TinyRecipe(**{**TOY, "vae_steps": 4}), tmp_path / "work", tmp_path / "toy", progress=False,
                         stop_after="data")
    record = tmp_path / "work" / RECIPE_NAME
    older = {k: v for k, v in json.loads(record.read_text()).items() if k != "text_tower_steps"}
    record.write_text(json.dumps(older))  # a folder from before the field
    with pytest.raises(ValueError, match=r"other \['text_tower_steps'\]"):
        build_tiny_model(TinyRecipe(**{**TOY, "text_tower_steps": 5}), tmp_path / "work", tmp_path / "toy",
                         progress=False, stop_after="data")
    default = TinyRecipe().text_tower_steps
    build_tiny_model(TinyRecipe(**{**TOY, "text_tower_steps": default}), tmp_path / "work", tmp_path / "toy",
                     progress=False, stop_after="data")  # the folder was built with the field's default


def test_the_recommended_step_count_is_the_fewest_within_the_tolerance():
    curve = {6: 20.0, 8: 20.55, 10: 20.62, 15: 20.6}
    assert fewest_steps_within(curve, 0.1) == 8
    assert fewest_steps_within(curve, 0.0) == 10
    assert fewest_steps_within(curve, 1.0) == 6


def test_i2v_gets_the_most_moving_sharp_setting_that_keeps_the_stickers_look():
    scores = {  # rdtf-tiny v2 on val clips, rounded: from pure noise it moves but loses the sticker
        "1 direct": {"psnr": 13.6, "moving": 1.0, "flow_ratio": 1.0, "sharpness": 0.86},
        "0.8 direct": {"psnr": 15.2, "moving": 0.5, "flow_ratio": 0.6, "sharpness": 0.94},
        "0.6 direct": {"psnr": 15.9, "moving": 0.25, "flow_ratio": 0.3, "sharpness": 0.96},
        "0.6 residual": {"psnr": 15.9, "moving": 0.19, "flow_ratio": 0.3, "sharpness": 0.97},
        "0.2 direct": {"psnr": 16.6, "moving": 0.0, "flow_ratio": 0.01, "sharpness": 0.95},
    }
    assert most_lifelike(scores, max_psnr_drop_db=1.0) == "0.6 direct"
    assert most_lifelike(scores, max_psnr_drop_db=5.0) == "1 direct"
    assert most_lifelike(scores, max_psnr_drop_db=0.0) == "0.2 direct"
    blurred = {**scores, "0.6 direct": {"psnr": 15.9, "moving": 0.25, "flow_ratio": 0.3, "sharpness": 0.5}}
    assert most_lifelike(blurred, max_psnr_drop_db=1.0) == "0.6 residual"  # sharp beats moving


def test_among_settings_that_all_move_i2v_gets_the_one_moving_as_much_as_the_ground_truth():
    scores = {  # rdtf-tiny r1 on val clips, rounded: every option "moves", the first only half as much as the truth
        "15 steps 0.95 residual": {"psnr": 14.96, "moving": 1.0, "flow_ratio": 0.39, "sharpness": 0.91},
        "25 steps 0.96 residual": {"psnr": 14.60, "moving": 1.0, "flow_ratio": 0.64, "sharpness": 0.87},
        "15 steps 1 residual": {"psnr": 13.70, "moving": 1.0, "flow_ratio": 0.95, "sharpness": 0.77},
    }
    assert most_lifelike(scores, max_psnr_drop_db=1.0) == "25 steps 0.96 residual"  # the blurred one is not sharp
    too_much = {**scores, "25 steps 0.96 residual": {**scores["25 steps 0.96 residual"], "flow_ratio": 3.0}}
    assert most_lifelike(too_much, max_psnr_drop_db=1.0) == "15 steps 0.95 residual"  # 0.39x is nearer than 3x
