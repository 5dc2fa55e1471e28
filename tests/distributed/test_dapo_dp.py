"""PAPO-D at DP2 where the ranks keep different numbers of groups: no hang, and one process's step.

Reference: the same step in a single process on the same samples (dapo_workers steers the rollout
so that it depends on the prompt only). The DP2 job must re-sample the same rounds, choose the same
groups (the first algo.prompts_per_step informative ones in stream order, dealt round-robin over
the ranks), and end the step with the same loss and weights. A rank that filtered on its own (the
old code) would run a different number of rollouts and updates than its peer: a hang, caught by
the harness's timeout, or a different batch.
"""

import pytest

from tests.distributed.dapo_workers import papo_d_step
from tests.distributed.harness import assert_tensors_close, make_synthetic, run_distributed

LOSS_TOL = 1e-5
LR = 1e-3  # dapo_workers.recipe
# AdamW's first updates move each weight by about lr * sign(gradient): another batch flips signs and
# moves weights by ~lr; rounding only matters where a gradient is near zero (a few elements, ~1e-5).
PARAM_TOL = LR / 10


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dapo")
    make_synthetic(root / "train", "train", 48, samples_per_shard=48)
    single = run_distributed(papo_d_step, 1, args=(str(root / "train"), str(root / "one")), timeout_s=120)
    dp2 = run_distributed(papo_d_step, 2, args=(str(root / "train"), str(root / "two")), timeout_s=120)
    return single[0], dp2


def test_the_ranks_kept_different_numbers_of_groups(runs):
    """Guard on the test itself: without uneven keeps and re-sampling it would prove nothing."""
    single, (rank0, rank1) = runs
    assert single["resampled"] >= 1
    assert len(rank0["kept_per_round"]) == len(rank1["kept_per_round"]) == single["resampled"] + 1
    assert rank0["kept_per_round"] != rank1["kept_per_round"]
    assert sum(rank0["kept_per_round"]) != sum(rank1["kept_per_round"])


def test_dp2_chooses_the_groups_one_process_chooses(runs):
    single, (rank0, rank1) = runs
    assert len(single["chosen"]) == 4 and len(rank0["chosen"]) == len(rank1["chosen"]) == 2
    interleaved = [key for pair in zip(rank0["chosen"], rank1["chosen"]) for key in pair]
    assert interleaved == single["chosen"]
    for tag in ("resampled", "kept_fraction"):
        assert rank0[tag] == rank1[tag] == single[tag], tag


def test_dp2_step_matches_one_process(runs):
    single, (rank0, rank1) = runs
    for out in (rank0, rank1):
        assert out["loss"] == pytest.approx(single["loss"], abs=LOSS_TOL)
        assert out["kl_prcp"] == pytest.approx(single["kl_prcp"], abs=LOSS_TOL)
        assert out["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-5)
    assert_tensors_close(rank0["before"], single["before"], 0.0, "weights before the step")
    moved = max((single["params"][k] - single["before"][k]).abs().max().item() for k in single["params"])
    assert moved > LR / 2, "the step did not move the weights: the comparison would prove nothing"
    assert_tensors_close(rank0["params"], single["params"], PARAM_TOL, "weights after the DP2 step")
