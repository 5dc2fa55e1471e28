"""The learning-rate schedule (optim.build_scheduler) against a hand-written formula."""

import math

import pytest
import torch

from papo_mega.config import TrainConfig
from papo_mega.errors import ConfigError
from papo_mega.optim import build_scheduler


def expected_lr(update: int, lr: float, min_lr: float, warmup: int, total: int, schedule: str) -> float:
    """The documented curve: the lr that optimizer update `update` (0-based) runs with."""
    if warmup > 0 and update <= warmup:
        return lr * update / warmup
    if schedule == "constant":
        return lr
    if update > total:
        return min_lr
    ratio = (update - warmup) / (total - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * ratio))


def _optimizer(groups: int = 2):
    """A torch optimizer with megatron-like param groups (the scheduler only reads param_groups)."""
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(groups)]
    opt = torch.optim.AdamW([{"params": [p]} for p in params], lr=1.0)
    # megatron's groups: the second one (biases/norms) has weight-decay multiplier 0.
    opt.param_groups[1]["wd_mult"] = 0.0
    return opt


@pytest.mark.parametrize("schedule,warmup,total", [("cosine", 3, 10), ("cosine", 0, 7), ("constant", 4, 9),
                                                    ("constant", 0, 5), ("cosine", 1, 2)])
def test_lr_curve_matches_formula(schedule, warmup, total):
    train = TrainConfig(lr=2e-3, min_lr=1e-4, warmup_steps=warmup, lr_schedule=schedule, weight_decay=0.05)
    opt = _optimizer()
    sched = build_scheduler(opt, train, total)
    for update in range(total + 3):
        want = expected_lr(update, train.lr, train.min_lr, warmup, total, schedule)
        for group in opt.param_groups:
            assert group["lr"] == pytest.approx(want, rel=1e-12, abs=1e-15), (update, group["lr"], want)
        assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.05)
        assert opt.param_groups[1]["weight_decay"] == 0.0
        sched.step(1)  # after optimizer.step()
    if schedule == "cosine":
        sched.num_steps = total - 1
        sched.step(1)
        assert opt.param_groups[0]["lr"] == pytest.approx(train.min_lr)


def test_state_dict_round_trip():
    train = TrainConfig(lr=1e-3, min_lr=0.0, warmup_steps=2, lr_schedule="cosine")
    opt = _optimizer()
    sched = build_scheduler(opt, train, 8)
    for _ in range(5):
        sched.step(1)
    state = sched.state_dict()
    lr_after_5 = opt.param_groups[0]["lr"]

    opt2 = _optimizer()
    sched2 = build_scheduler(opt2, train, 8)
    sched2.step(1)  # a restored scheduler's own count never adds to the saved one
    sched2.load_state_dict(state)
    sched2.load_state_dict(state)  # idempotent
    assert sched2.num_steps == 5 and sched2.state_dict() == state
    assert opt2.param_groups[0]["lr"] == lr_after_5
    sched.step(1)
    sched2.step(1)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_resume_with_longer_run_follows_current_config():
    """The config defines the curve; the checkpoint only the update count."""
    short = TrainConfig(lr=1e-3, warmup_steps=0, lr_schedule="cosine")
    sched = build_scheduler(_optimizer(), short, 4)
    sched.step(2)
    opt = _optimizer()
    longer = build_scheduler(opt, short, 8)
    longer.load_state_dict(sched.state_dict())
    assert longer.lr_decay_steps == 8
    assert opt.param_groups[0]["lr"] == pytest.approx(expected_lr(2, 1e-3, 0.0, 0, 8, "cosine"))


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="warmup_steps=5"):
        build_scheduler(_optimizer(), TrainConfig(warmup_steps=5, lr_schedule="cosine"), 5)
    with pytest.raises(ConfigError, match="min_lr"):
        build_scheduler(_optimizer(), TrainConfig(lr=1e-3, min_lr=1e-2, lr_schedule="cosine"), 5)
    # constant: a warmup longer than the run is allowed (the lr simply never reaches its peak)
    opt = _optimizer()
    build_scheduler(opt, TrainConfig(lr=1e-3, warmup_steps=10, lr_schedule="constant"), 5).step(5)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)
