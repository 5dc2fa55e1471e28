"""loss.prcp_schedule: the KL_prcp weight per training step, as the PAPO reference anneals it.

Reference (MikeWangWZHL/PAPO, verl/trainer/core_algos.py AnnealingKLController, read once per
training step by ray_trainer._get_kl_prcp_coef; dp_actor.py scales both entropy weights by
coef / kl_prcp_coef): coef_k = start + (end - start) * min(k / span, 1) with k the 0-based step
and span = max(1, int(steps * annealing_ratio)). The expectations below are written out by hand.
"""

from __future__ import annotations

import pytest

from papo_mega.algo.losses import loss_config_at, scheduled_prcp_coef
from papo_mega.config import LossConfig, load_config
from papo_mega.errors import ConfigError
from tests.unit.test_algo_losses import check_against_naive, make_inputs

LINEAR = dict(prcp_schedule="linear", prcp_coef=0.02, prcp_end_coef=0.0, prcp_anneal_fraction=0.5)


@pytest.mark.parametrize("steps, overrides, expected", [
    # 8 steps, half of them annealing: span 4, then held at the end value.
    (8, {}, [0.02, 0.015, 0.01, 0.005, 0.0, 0.0, 0.0, 0.0]),
    # 7 steps: span int(3.5) = 3.
    (7, {}, [0.02, 0.02 * 2 / 3, 0.02 / 3, 0.0, 0.0, 0.0, 0.0]),
    # To a non-zero end value over the whole run.
    (5, {"prcp_end_coef": 0.01, "prcp_anneal_fraction": 1.0}, [0.02, 0.018, 0.016, 0.014, 0.012]),
    # Upwards; one step: span max(1, 0) = 1.
    (3, {"prcp_end_coef": 0.05}, [0.02, 0.05, 0.05]),
    (1, {}, [0.02]),
])
def test_linear_schedule_per_step(steps, overrides, expected):
    cfg = LossConfig(**{**LINEAR, **overrides})
    got = [scheduled_prcp_coef(cfg, k, steps) for k in range(steps)]
    assert got == pytest.approx(expected, abs=1e-15)


def test_constant_schedule_is_the_config_itself():
    cfg = LossConfig(prcp_coef=0.02, entropy_coef=0.05, masked_entropy_coef=0.05)
    assert all(loss_config_at(cfg, k, 10) is cfg for k in range(10))


def test_entropy_weights_scale_with_the_coefficient():
    cfg = LossConfig(**LINEAR, entropy_coef=0.05, masked_entropy_coef=0.03)
    at = loss_config_at(cfg, 1, 8)  # coef 0.015: three quarters of the start
    assert at.prcp_schedule == "constant" and at.prcp_coef == pytest.approx(0.015)
    assert at.entropy_coef == pytest.approx(0.05 * 0.75) and at.masked_entropy_coef == pytest.approx(0.03 * 0.75)
    assert at.kl_coef == cfg.kl_coef and at.clip_high == cfg.clip_high  # nothing else moves


@pytest.mark.parametrize("step", [0, 2, 5])
def test_scheduled_loss_equals_the_naive_loss_with_that_steps_coefficients(step):
    """The loss computed with the config in force at step k is the naive PAPO loss whose gamma,
    eta1 and eta2 are the hand-computed values at k (10 steps, span 5: gamma_k = 0.3 (1 - k/5))."""
    cfg = LossConfig(prcp_schedule="linear", prcp_coef=0.3, prcp_end_coef=0.0, prcp_anneal_fraction=0.5,
                     kl_coef=0.05, entropy_coef=0.07, masked_entropy_coef=0.11)
    factor = max(1.0 - step / 5, 0.0)
    naive_cfg = LossConfig(prcp_coef=0.3 * factor, kl_coef=0.05, entropy_coef=0.07 * factor,
                           masked_entropy_coef=0.11 * factor)
    inputs = make_inputs(seed=5)
    check_against_naive(loss_config_at(cfg, step, 10), inputs, atol=1e-10, what=f"step {step}",
                        naive_cfg=naive_cfg)


@pytest.mark.parametrize("override, message", [
    ("loss.prcp_schedule=cosine", r"loss\.prcp_schedule='cosine' is not one of constant \| linear"),
    ("loss.prcp_end_coef=-0.01", r"loss\.prcp_end_coef=-0\.01 must be >= 0"),
    ("loss.prcp_anneal_fraction=0", r"loss\.prcp_anneal_fraction=0(\.0)? must be in \(0, 1\]"),
    ("loss.prcp_anneal_fraction=1.5", r"loss\.prcp_anneal_fraction=1\.5 must be in \(0, 1\]"),
])
def test_schedule_settings_are_validated(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["preset=tiny", override])


def test_linear_schedule_needs_a_start_coefficient():
    with pytest.raises(ConfigError, match=r"loss\.prcp_schedule=linear anneals from loss\.prcp_coef=0\.0; set "
                                          r"prcp_coef > 0 or use loss\.prcp_schedule=constant"):
        load_config(None, ["preset=tiny", "loss.prcp_schedule=linear", "loss.prcp_coef=0"])
