"""GRPO group-relative advantages and DAPO's dynamic-sampling filter against per-group loops."""

from __future__ import annotations

import math

import pytest
import torch

from papo_mega.algo.advantage import dynamic_sampling_keep, grpo_advantages
from papo_mega.errors import PapoError


def naive_advantages(rewards: list[float], group_size: int, normalise_std: bool = True) -> list[float]:
    """(R - mean) / (unbiased std + 1e-6) group by group, in Python floats."""
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        mean = sum(group) / len(group)
        if len(group) > 1:
            std = math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1))
        for r in group:
            if not normalise_std:
                out.append(r - mean)
            elif len(group) == 1:
                out.append(0.0)
            else:
                out.append((r - mean) / (std + 1e-6))
    return out


@pytest.mark.parametrize("normalise_std", [True, False])
@pytest.mark.parametrize("group_size", [2, 5, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_grpo_matches_naive(group_size, normalise_std, dtype):
    gen = torch.Generator().manual_seed(group_size)
    groups = 6
    rewards = torch.rand(groups * group_size, generator=gen, dtype=torch.float64)
    # Typical rewards: 0.9 * accuracy + 0.1 * format, with ties and a constant group.
    rewards[: group_size] = 0.9 * (torch.rand(group_size, generator=gen) > 0.5).double() + 0.1
    rewards[group_size : 2 * group_size] = 1.0
    rewards = rewards.to(dtype)
    got = grpo_advantages(rewards, group_size, normalise_std=normalise_std)
    want = naive_advantages(rewards.double().tolist(), group_size, normalise_std)
    assert got.shape == rewards.shape and got.dtype == torch.float32
    assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-5, rtol=1e-5)
    # The constant group has zero advantage; every group sums to ~0.
    assert bool((got[group_size : 2 * group_size] == 0).all())
    assert torch.allclose(got.view(groups, group_size).sum(dim=1), torch.zeros(groups), atol=1e-4)


def test_grpo_uses_unbiased_std_and_eps():
    # Group [0, 1]: mean 0.5, unbiased std sqrt(0.5) (population std would be 0.5).
    got = grpo_advantages(torch.tensor([0.0, 1.0]), 2)
    expected = 0.5 / (math.sqrt(0.5) + 1e-6)
    assert got.tolist() == pytest.approx([-expected, expected], rel=1e-6)
    # A tiny spread is divided by (std + eps), not std: the advantage stays small, not +-0.707.
    tiny = grpo_advantages(torch.tensor([0.0, 1e-9], dtype=torch.float64), 2)
    assert abs(tiny[1].item()) < 1e-3


def test_grpo_groups_are_contiguous_rows():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    got = grpo_advantages(rewards, 3)
    # Group 0 = rows 0..2 ([1, 0, 0]); group 1 = rows 3..5 ([0, 1, 1]).
    assert got[0] > 0 and got[1] < 0 and got[2] < 0
    assert got[3] < 0 and got[4] > 0 and got[5] > 0
    assert got[0].item() == pytest.approx(-got[3].item(), rel=1e-6)


def test_group_size_one_gives_zeros():
    rewards = torch.tensor([0.3, 1.0, -2.0, 5.0])
    assert torch.equal(grpo_advantages(rewards, 1), torch.zeros(4))
    assert torch.equal(grpo_advantages(rewards, 1, normalise_std=False), torch.zeros(4))


def test_input_is_not_modified():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.25])
    copy = rewards.clone()
    grpo_advantages(rewards, 2)
    assert torch.equal(rewards, copy)


@pytest.mark.parametrize("fn", [grpo_advantages, dynamic_sampling_keep])
def test_bad_input(fn):
    with pytest.raises(PapoError, match=r"has shape \(2, 3\); expected one value per response \[N\]"):
        fn(torch.zeros(2, 3), 3)
    with pytest.raises(PapoError, match=r"7 .* do not split into groups of 3"):
        fn(torch.zeros(7), 3)
    with pytest.raises(PapoError, match="do not split into groups of 0"):
        fn(torch.zeros(6), 0)
    with pytest.raises(PapoError, match="do not split into groups of -2"):
        fn(torch.zeros(6), -2)
    for bad in (float("nan"), float("inf"), -float("inf")):
        values = torch.zeros(6)
        values[4] = bad
        with pytest.raises(PapoError, match="NaN or inf"):
            fn(values, 3)


def naive_keep(accuracy: list[float], group_size: int, low: float = 0.01, high: float = 0.99) -> list[bool]:
    keep = []
    for start in range(0, len(accuracy), group_size):
        group = accuracy[start : start + group_size]
        mean = sum(group) / len(group)
        keep.append(low < mean < high)
    return keep


def test_dynamic_sampling_drops_all_right_and_all_wrong_groups():
    accuracy = torch.tensor([
        1, 1, 1, 1, 1,   # all right: dropped
        0, 0, 0, 0, 0,   # all wrong: dropped
        1, 0, 0, 0, 0,   # 0.2: kept
        1, 1, 1, 1, 0,   # 0.8: kept
    ], dtype=torch.float32)
    keep = dynamic_sampling_keep(accuracy, 5)
    assert keep.dtype == torch.bool and keep.tolist() == [False, False, True, True]


def test_dynamic_sampling_thresholds_are_strict():
    # Group means exactly at, just inside and just outside the bounds (group of 100, float64 sums).
    means = [0.0, 0.01, 0.02, 0.5, 0.98, 0.99, 1.0]
    accuracy = torch.cat([torch.tensor([1.0] * round(m * 100) + [0.0] * (100 - round(m * 100))) for m in means])
    keep = dynamic_sampling_keep(accuracy, 100)
    assert keep.tolist() == naive_keep(accuracy.tolist(), 100)
    assert keep.tolist() == [False, False, True, True, True, False, False]


@pytest.mark.parametrize("low,high", [(0.01, 0.99), (0.2, 0.8), (0.0, 1.0)])
def test_dynamic_sampling_matches_naive(low, high):
    gen = torch.Generator().manual_seed(3)
    accuracy = (torch.rand(8 * 5, generator=gen) > torch.rand(8, generator=gen).repeat_interleave(5)).float()
    accuracy[:5] = 1.0
    accuracy[5:10] = 0.0
    keep = dynamic_sampling_keep(accuracy, 5, low=low, high=high)
    assert keep.shape == (8,)
    assert keep.tolist() == naive_keep(accuracy.tolist(), 5, low, high)
    assert not keep[0] and not keep[1]
