"""The full PAPO loss on the tiny Qwen2.5-VL gives one process's gradients at every layout.

Reference: a naive single process (algo_workers.naive_papo_grads) - full-vocabulary log_softmax,
the objective written out term by term, one backward over the whole batch. Under test: our
vocab-parallel log-probs, two-view batching, micro-batching, global token normalisation and
megatron's schedules at TP2, PP2 (several micro-batches), DP2 and TP2xPP2; and
loss.aggregation=microbatch_token_mean (the reference's mean of micro-batch token means) at DP2.
"""

import pytest

from tests.distributed.algo_workers import layout_papo_grads, naive_papo_grads
from tests.distributed.harness import assert_tensors_close, run_distributed

LOSS_TOL = 1e-5
GRAD_TOL = 2e-6  # fp32; gradients here are O(1e-2..1)

# (layout, world size, micro-batch size): 8 sequences in the global batch.
LAYOUTS = {
    "tp1_one_microbatch": ({}, 1, 8),
    "tp1_four_microbatches": ({}, 1, 2),
    "tp2": ({"tp_size": 2}, 2, 4),
    "pp2_four_microbatches": ({"pp_size": 2}, 2, 2),
    "pp2_vpp2_four_microbatches": ({"pp_size": 2, "vpp_size": 2}, 2, 2),
    "dp2_two_microbatches": ({}, 2, 2),
    "tp2_pp2": ({"tp_size": 2, "pp_size": 2}, 4, 2),
}

CONFIGS = {
    "detached_masked": {},  # reference-code behaviour: masked log-probs from the no-grad forward
    "masked_grad_full_entropy": {"masked_grad": True, "entropy_estimator": "full", "kl_estimator": "k2",
                                 "prcp_clip": 0.05, "temperature": 0.7},
    "microbatch_token_mean": {"aggregation": "microbatch_token_mean"},
}
# microbatch_token_mean's naive reference: the micro-batch size of dp2_two_microbatches, and
# responses of unequal lengths (papo_batch's are all 6 tokens long: the modes would coincide).
NAIVE_EXTRA = {"microbatch_token_mean": (2, True)}


@pytest.fixture(scope="module")
def naive():
    return {name: run_distributed(naive_papo_grads, 1, args=(cfg, *NAIVE_EXTRA.get(name, ())))[0]
            for name, cfg in CONFIGS.items()}


def _check(out, ref, what):
    assert out["metrics"]["loss"] == pytest.approx(ref["loss"], abs=LOSS_TOL), what
    assert out["metrics"]["kl_prcp"] == pytest.approx(ref["kl_prcp"], abs=LOSS_TOL), what
    largest = max(g.abs().max().item() for g in ref["grads"].values())
    assert largest > 1e-3, "reference gradients vanish: the comparison would prove nothing"
    assert_tensors_close(out["grads"], ref["grads"], GRAD_TOL, what)


@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_detached_masked_branch_matches_naive(layout_name, naive):
    layout, world, mbs = LAYOUTS[layout_name]
    out = run_distributed(layout_papo_grads, world, args=(layout, CONFIGS["detached_masked"], mbs))[0]
    _check(out, naive["detached_masked"], f"{layout_name} gradients")


@pytest.mark.parametrize("layout_name", ["tp1_four_microbatches", "tp2", "pp2_four_microbatches", "dp2_two_microbatches", "tp2_pp2"])
def test_masked_grad_full_entropy_matches_naive(layout_name, naive):
    """Both views in the training forward, full-vocabulary entropy, k2, prcp clip, temperature."""
    layout, world, mbs = LAYOUTS[layout_name]
    out = run_distributed(layout_papo_grads, world, args=(layout, CONFIGS["masked_grad_full_entropy"], mbs))[0]
    _check(out, naive["masked_grad_full_entropy"], f"{layout_name} masked_grad gradients")


def test_masked_grad_changes_the_gradient(naive):
    """Guard on the test itself: the two configs must differ, or masked_grad would be untested."""
    a, b = naive["detached_masked"]["grads"], naive["masked_grad_full_entropy"]["grads"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-4


def test_wrong_token_normalisation_is_caught(naive):
    """DP2 normalising by each rank's own token count (a classic bug) must fail the comparison."""
    layout, world, mbs = LAYOUTS["dp2_two_microbatches"]
    out = run_distributed(layout_papo_grads, world, args=(layout, CONFIGS["detached_masked"], mbs, "local_token_count"))[0]
    with pytest.raises(AssertionError):
        _check(out, naive["detached_masked"], "dp2 with a local token count")


def test_microbatch_token_mean_at_dp2_matches_its_naive_reference(naive):
    """Four micro-batches of unequal token counts over two ranks: our DP2 run gives the naive mean of
    micro-batch token means (loss, KL_prcp metric, gradients) and not the global token mean."""
    layout, world, mbs = LAYOUTS["dp2_two_microbatches"]
    ref = naive["microbatch_token_mean"]
    assert len(set(ref["microbatch_tokens"])) > 1, "equal micro-batches: the two modes would coincide"
    out = run_distributed(layout_papo_grads, world, args=(layout, CONFIGS["microbatch_token_mean"], mbs, None, True))[0]
    _check(out, ref, "dp2 microbatch_token_mean")
    assert abs(out["metrics"]["loss"] - ref["global_token_mean_loss"]) > 100 * LOSS_TOL
