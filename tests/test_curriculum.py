"""Curriculum sampler: valid task distributions, reachable adaptive levels, exact resume, masks per task."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from rdtf.curriculum import (
    CURRICULA,
    EASY_GROUPS,
    NEUTRAL_LEVEL,
    NUM_LEVELS,
    TASK_GROUP,
    TaskCurriculum,
    sample_condition,
)
from rdtf.masks import TASK_USES_TEXT, TASKS


def _assert_distribution(weights: dict[str, float], tasks: tuple[str, ...] = TASKS) -> None:
    assert list(weights) == list(tasks)
    assert all(w >= 0 and math.isfinite(w) for w in weights.values()), weights
    assert sum(weights.values()) == pytest.approx(1.0, abs=1e-12)


def _share(weights: dict[str, float], groups: set[str] | frozenset[str]) -> float:
    return sum(w for t, w in weights.items() if TASK_GROUP[t] in groups)


def _random_losses(rng: np.random.Generator, n: int) -> list[float]:
    """Loss curves of varied shape: noisy decay, plateaus, spikes, drops, scales from 1e-4 to 1e3."""
    scale = 10.0 ** rng.uniform(-4, 3)
    t = np.arange(n)
    curve = np.exp(-t / rng.uniform(5, 200)) + rng.uniform(0.05, 1.0)
    noise = 1.0 + rng.uniform(0, 0.5) * rng.standard_normal(n)
    jumps = np.where(rng.random(n) < 0.05, rng.uniform(0.1, 10.0, n), 1.0)
    return list(np.abs(scale * curve * noise * jumps) + 1e-12)


def test_uniform_weights_are_equal_at_every_step():
    curriculum = TaskCurriculum("uniform", total_steps=100)
    for step in (0, 50, 99, 1000):
        assert curriculum.weights(step) == {t: 1 / len(TASKS) for t in TASKS}


def test_linear_weights_follow_the_static_schedule():
    curriculum = TaskCurriculum("linear", total_steps=101)
    start, middle, end = curriculum.weights(0), curriculum.weights(50), curriculum.weights(100)
    # raw weights at p=0: 3 x 0.1 + 0.9 + 2 x 0.7 = 2.6
    assert start["i2v"] == pytest.approx(0.1 / 2.6)
    assert start["interpolation"] == pytest.approx(0.9 / 2.6)
    assert start["predict_forward"] == pytest.approx(0.7 / 2.6)
    assert middle == pytest.approx({t: 1 / 6 for t in TASKS})
    # raw weights at p=1: 3 x 0.9 + 0.1 + 2 x 0.3 = 3.4
    assert end["t2v"] == pytest.approx(0.9 / 3.4)
    assert end["interpolation"] == pytest.approx(0.1 / 3.4)
    assert end["predict_backward"] == pytest.approx(0.3 / 3.4)
    assert curriculum.weights(10_000) == end  # training past total_steps stays at the end point
    # halfway through the first half: raw generation weight 0.3
    assert curriculum.weights(25)["it2v"] / curriculum.weights(25)["interpolation"] == pytest.approx(0.3 / 0.7)


def test_linear_generation_share_rises_monotonically():
    curriculum = TaskCurriculum("linear", total_steps=200)
    shares = [_share(curriculum.weights(step), {"generation"}) for step in range(0, 200, 10)]
    assert all(b > a for a, b in zip(shares, shares[1:]))
    assert shares[0] < 0.15 and shares[-1] > 0.75


def test_linear_weights_ignore_the_loss():
    curriculum = TaskCurriculum("linear", total_steps=10)
    before = curriculum.weights(5)
    for step, loss in enumerate([0.1, 5.0, 0.001, 9.0]):
        curriculum.update(step, loss)
    assert curriculum.weights(5) == before
    assert curriculum.level == NEUTRAL_LEVEL


@pytest.mark.parametrize("kind", CURRICULA)
def test_weights_stay_a_distribution_for_random_loss_sequences(kind):
    rng = np.random.default_rng(0)
    for trial in range(40):
        tasks = TASKS if trial % 4 else tuple(rng.choice(TASKS, size=rng.integers(1, 6), replace=False))
        total = int(rng.integers(1, 300))
        curriculum = TaskCurriculum(
            kind,
            tasks=tasks,
            total_steps=total,
            history=int(rng.integers(1, 60)),
            adaptive_scale=float(rng.uniform(0, 2)),
            target_loss=None if trial % 2 else float(rng.uniform(0.01, 1)),
        )
        for step, loss in enumerate(_random_losses(rng, 120)):
            curriculum.update(step, loss)
            assert 0 <= curriculum.level < NUM_LEVELS
            _assert_distribution(curriculum.weights(int(rng.integers(0, 2 * total))), tasks)


def test_every_adaptive_level_is_reachable():
    rng = np.random.default_rng(1)
    seen: set[int] = set()
    for _ in range(20):
        curriculum = TaskCurriculum("adaptive", total_steps=100, history=int(rng.integers(2, 60)))
        for step, loss in enumerate(_random_losses(rng, 100)):
            curriculum.update(step, loss)
            seen.add(curriculum.level)
    assert seen == set(range(NUM_LEVELS))


def test_adaptive_extremes_map_to_top_and_bottom_levels():
    """A PID value above its whole history is level 4, below it level 0 (the published code never reached 4)."""
    for loss, expected_level in ((10.0, NUM_LEVELS - 1), (0.001, 0)):
        curriculum = TaskCurriculum("adaptive", total_steps=100, history=20)
        for step in range(30):
            curriculum.update(step, 0.1 + 0.01 * math.sin(step))
        curriculum.update(30, loss)
        assert curriculum.level == expected_level


def test_constant_loss_keeps_the_adaptive_curriculum_neutral():
    adaptive = TaskCurriculum("adaptive", total_steps=100)
    linear = TaskCurriculum("linear", total_steps=100)
    for step in range(40):
        adaptive.update(step, 0.25)
    assert adaptive.level == NEUTRAL_LEVEL
    assert adaptive.weights(40) == pytest.approx(linear.weights(40))


def test_adaptive_moves_toward_easy_tasks_when_loss_spikes_and_back_when_it_falls():
    curriculum = TaskCurriculum("adaptive", total_steps=200, history=30)
    for step in range(50):
        curriculum.update(step, 0.2)
    calm = _share(curriculum.weights(50), EASY_GROUPS)
    curriculum.update(50, 1.5)
    assert curriculum.level == NUM_LEVELS - 1
    assert _share(curriculum.weights(50), EASY_GROUPS) > calm + 0.1

    curriculum = TaskCurriculum("adaptive", total_steps=200, history=30)
    for step in range(50):
        curriculum.update(step, 0.2)
    curriculum.update(50, 0.02)
    assert curriculum.level == 0
    assert _share(curriculum.weights(50), EASY_GROUPS) < calm - 0.1


def test_adaptive_uses_target_loss_as_the_reference():
    """Against a fixed target, a loss persistently above it keeps the integral (anti-windup capped) high."""
    above = TaskCurriculum("adaptive", total_steps=100, target_loss=0.1, integral_limit=2.0)
    for step in range(100):
        above.update(step, 0.1 + 0.05 * step / 100)  # slowly rising loss, always above target
    assert above.level == NUM_LEVELS - 1
    assert above.state_dict()["integral"] == 2.0


def test_update_rejects_bad_loss_and_steps():
    curriculum = TaskCurriculum("adaptive", total_steps=10)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="loss"):
            curriculum.update(0, bad)
    curriculum.update(3, 0.5)
    with pytest.raises(ValueError, match="step=3"):
        curriculum.update(3, 0.5)
    with pytest.raises(ValueError, match="step=-1"):
        curriculum.weights(-1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "cosine"}, "kind"),
        ({"tasks": ("i2v", "v2v")}, "tasks"),
        ({"tasks": ()}, "tasks"),
        ({"tasks": ("i2v", "i2v")}, "tasks"),
        ({"total_steps": 0}, "total_steps"),
        ({"pid": (1.0, float("nan"), 0.0)}, "pid"),
        ({"history": 0}, "history"),
        ({"target_loss": 0.0}, "target_loss"),
        ({"integral_limit": 0.0}, "integral_limit"),
        ({"adaptive_scale": -0.1}, "adaptive_scale"),
        ({"text_dropout": 1.5}, "text_dropout"),
    ],
)
def test_constructor_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TaskCurriculum(**kwargs)


def test_sampling_frequencies_match_weights():
    curriculum = TaskCurriculum("linear", total_steps=100, seed=123)
    step = 20
    expected = curriculum.weights(step)
    draws = 6000
    counts = {t: 0 for t in TASKS}
    for _ in range(draws):
        counts[curriculum.sample_task(step)] += 1
    chi2 = sum((counts[t] - draws * p) ** 2 / (draws * p) for t, p in expected.items())
    assert chi2 < 20.5  # chi-square, 5 degrees of freedom, p = 0.001


def test_sampling_follows_the_schedule_over_training():
    curriculum = TaskCurriculum("linear", total_steps=1000, seed=7)
    early = [curriculum.sample_task(0) for _ in range(500)]
    late = [curriculum.sample_task(999) for _ in range(500)]
    generation = lambda tasks: sum(TASK_GROUP[t] == "generation" for t in tasks) / len(tasks)
    assert generation(early) < 0.2 and generation(late) > 0.7


def test_same_seed_same_draws_different_seed_different_draws():
    mask = torch.ones(8)
    runs = [TaskCurriculum("uniform", seed=s) for s in (5, 5, 6)]
    draws = [[(s.task, s.condition_mask.tolist(), s.use_text) for s in (c.sample(0, mask) for _ in range(50))] for c in runs]
    assert draws[0] == draws[1]
    assert draws[0] != draws[2]


@pytest.mark.parametrize("kind", CURRICULA)
def test_state_dict_round_trip_continues_identically(kind):
    rng = np.random.default_rng(3)
    losses = _random_losses(rng, 120)
    loss_masks = torch.tensor([[1.0] * int(n) + [0.0] * (8 - int(n)) for n in rng.integers(1, 9, size=120)])

    def run(curriculum, steps):
        out = []
        for step in steps:
            sample = curriculum.sample(step, loss_masks[step])
            curriculum.update(step, losses[step])
            out.append((sample.task, sample.condition_mask.tolist(), sample.use_text, curriculum.level, curriculum.weights(step)))
        return out

    original = TaskCurriculum(kind, total_steps=120, seed=11, history=20)
    run(original, range(60))
    state = json.loads(json.dumps(original.state_dict()))  # survives a JSON checkpoint file
    resumed = TaskCurriculum(kind, total_steps=120, seed=999, history=20)  # seed is overwritten by the state
    resumed.load_state_dict(state)
    assert run(resumed, range(60, 120)) == run(original, range(60, 120))


def test_load_state_dict_rejects_a_different_curriculum():
    state = TaskCurriculum("adaptive").state_dict()
    with pytest.raises(ValueError, match="does not match"):
        TaskCurriculum("linear").load_state_dict(state)
    with pytest.raises(ValueError, match="does not match"):
        TaskCurriculum("adaptive", tasks=("i2v", "t2v")).load_state_dict(state)


def _loss_masks(num_frames: int, rng: np.random.Generator) -> list[torch.Tensor]:
    """Every real-frame count with padding at the end, plus random layouts of real frames."""
    masks = [torch.tensor([1.0] * n + [0.0] * (num_frames - n)) for n in range(1, num_frames + 1)]
    for _ in range(4):
        layout = rng.random(num_frames) < 0.6
        layout[rng.integers(num_frames)] = True
        masks.append(torch.tensor(layout, dtype=torch.float32))
    return masks


def _check_task_semantics(task: str, given: list[int], n: int) -> None:
    """``given``: positions among the ``n`` real frames that are conditions."""
    if task == "t2v":
        assert given == []
    elif n == 1:
        assert given == [0]  # documented fallback: a one-frame clip gives its only frame
    elif task in ("i2v", "it2v"):
        assert len(given) == 1
    elif task == "interpolation":
        if n >= 3:
            assert len(given) >= 2
            stride = given[1] - given[0]
            assert stride in (2, 3, 4) and given[0] < stride  # offset < stride
            assert given == list(range(given[0], n, stride))
        else:
            assert len(given) == 1
        assert len(given) < n
    elif task == "predict_forward":
        assert given == list(range(len(given))) and 1 <= len(given) < n
    elif task == "predict_backward":
        assert given == list(range(n - len(given), n)) and 1 <= len(given) < n


@pytest.mark.parametrize("num_frames", range(2, 17))
def test_sample_condition_honours_loss_mask_and_task_semantics(num_frames):
    rng = np.random.default_rng(num_frames)
    generator = torch.Generator().manual_seed(num_frames)
    for loss_mask in _loss_masks(num_frames, rng):
        real = torch.nonzero(loss_mask).flatten().tolist()
        for task in TASKS:
            for _ in range(6):
                mask, use_text = sample_condition(task, loss_mask, generator, text_dropout=0.0)
                assert mask.shape == (num_frames,) and mask.dtype == torch.float32
                assert set(mask.unique().tolist()) <= {0.0, 1.0}
                assert torch.all(mask <= loss_mask), "padding given as a condition"
                given = [real.index(i) for i in torch.nonzero(mask).flatten().tolist()]
                _check_task_semantics(task, given, len(real))
                assert use_text is TASK_USES_TEXT[task]


def test_sample_condition_covers_every_parameter_choice():
    """On 16 real frames the draws reach every stride, offset, prefix length and i2v position."""
    generator = torch.Generator().manual_seed(0)
    loss_mask = torch.ones(16)
    patterns: dict[str, set[str]] = {t: set() for t in TASKS}
    for task in TASKS:
        for _ in range(400):
            mask, _ = sample_condition(task, loss_mask, generator)
            patterns[task].add("".join(str(int(v)) for v in mask.tolist()))
    interpolation = {(p.index("1"), p.index("1", p.index("1") + 1) - p.index("1")) for p in patterns["interpolation"]}
    assert interpolation == {(o, s) for s in (2, 3, 4) for o in range(s)}
    assert len(patterns["predict_forward"]) == len(patterns["predict_backward"]) == 15
    assert len(patterns["i2v"]) == 16 and patterns["t2v"] == {"0" * 16}


def test_sample_condition_first_frame_and_text_dropout_rates():
    generator = torch.Generator().manual_seed(1)
    loss_mask = torch.ones(8)
    draws = [sample_condition("it2v", loss_mask, generator, text_dropout=0.2, first_frame_prob=0.8) for _ in range(2000)]
    first = sum(bool(mask[0]) for mask, _ in draws) / len(draws)
    dropped = sum(not use_text for _, use_text in draws) / len(draws)
    assert first == pytest.approx(0.8, abs=0.03)
    assert dropped == pytest.approx(0.2, abs=0.03)
    assert all(not sample_condition("i2v", loss_mask, generator, text_dropout=0.0)[1] for _ in range(20))
    assert all(not sample_condition("t2v", loss_mask, generator, text_dropout=1.0)[1] for _ in range(20))


def test_sample_condition_accepts_bool_loss_masks():
    generator = torch.Generator().manual_seed(2)
    mask, _ = sample_condition("predict_backward", torch.tensor([True, True, True, False]), generator)
    assert mask[3] == 0 and mask[2] == 1


@pytest.mark.parametrize(
    ("task", "loss_mask", "message"),
    [
        ("v2v", torch.ones(4), "task"),
        ("i2v", torch.zeros(4), "no real frame"),
        ("i2v", torch.ones(2, 4), "shape"),
        ("i2v", torch.ones(0), "shape"),
        ("i2v", torch.tensor([1.0, 0.5]), "0 \\(padding\\) or 1"),
    ],
)
def test_sample_condition_rejects_bad_input(task, loss_mask, message):
    with pytest.raises(ValueError, match=message):
        sample_condition(task, loss_mask, torch.Generator())


def test_sample_batch_stacks_per_example_samples():
    curriculum = TaskCurriculum("adaptive", total_steps=10, seed=4)
    loss_masks = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.float32)
    tasks, masks, use_text = curriculum.sample_batch(0, loss_masks)
    assert len(tasks) == 3 and masks.shape == (3, 6) and use_text.shape == (3,) and use_text.dtype == torch.bool
    assert torch.all(masks <= loss_masks)
    with pytest.raises(ValueError, match="expected \\(B, F\\)"):
        curriculum.sample_batch(0, torch.ones(6))
