"""Task masks: each task gives the frame pattern DESIGN.md §1 promises."""

from __future__ import annotations

import pytest
import torch

from rdtf.masks import (
    TASKS,
    condition_mask,
    interpolation_mask,
    mask_from_string,
    mask_to_string,
    restrict_to_real_frames,
)


@pytest.mark.parametrize(
    ("task", "kwargs", "expected"),
    [
        ("i2v", {}, "10000000"),
        ("it2v", {"position": 3}, "00010000"),
        ("t2v", {}, "00000000"),
        ("interpolation", {"stride": 2}, "10101010"),
        ("interpolation", {"stride": 2, "offset": 1}, "01010101"),
        ("interpolation", {"stride": 3}, "10010010"),
        ("predict_forward", {"num_given": 5}, "11111000"),
        ("predict_backward", {"num_given": 6}, "00111111"),
        ("predict_forward", {}, "11110000"),
    ],
)
def test_condition_mask_patterns(task, kwargs, expected):
    assert mask_to_string(condition_mask(task, 8, **kwargs)) == expected


def test_every_task_has_a_mask_of_the_right_length():
    for task in TASKS:
        for frames in (2, 8, 16):
            mask = condition_mask(task, frames)
            assert mask.shape == (frames,) and mask.dtype == torch.float32


def test_string_round_trip_and_validation():
    assert mask_to_string(mask_from_string("0110")) == "0110"
    with pytest.raises(ValueError, match="0s and 1s"):
        mask_from_string("01a0")
    with pytest.raises(ValueError, match="0s and 1s"):
        mask_from_string("")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: condition_mask("dance", 8), "task 'dance'"),
        (lambda: condition_mask("i2v", 0), "num_frames=0"),
        (lambda: condition_mask("i2v", 8, position=8), "position=8"),
        (lambda: condition_mask("predict_forward", 8, num_given=8), "num_given=8"),
        (lambda: interpolation_mask(8, 1), "stride=1"),
        (lambda: interpolation_mask(8, 3, offset=3), "offset=3"),
    ],
)
def test_bad_parameters_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_padding_is_never_a_condition():
    loss_mask = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])
    cond = interpolation_mask(5, 2)  # 10101
    assert mask_to_string(restrict_to_real_frames(cond, loss_mask)) == "10100"
