"""loss.aggregation: the micro-batch losses of an update add up to the naive loss of each mode.

Reference: the per-token loss, its d/dlogp and per-token metric values from test_algo_losses'
token-by-token float64 reference (naive_papo on one token at a time), aggregated here by hand:

- global_token_mean: sum over the update's response tokens / their count;
- microbatch_token_mean (verl / PAPO reference): the plain mean over the update's micro-batches
  (all DP ranks) of each micro-batch's own token mean.

Under test: compute_papo_loss with num_tokens from reduction.token_normaliser, one call per
micro-batch, summed - what policy.papo_forward_backward does at any layout (the sum over
micro-batches and ranks is the all-reduce; tests/distributed/test_papo_layouts.py runs it).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from papo_mega.algo.reduction import UpdateCounts, token_normaliser
from papo_mega.config import LossConfig
from papo_mega.errors import ConfigError, PapoError
from tests.unit.test_algo_losses import COEF_SETS, B, T, leaves, make_inputs, run_loss, run_naive

MODES = ("global_token_mean", "microbatch_token_mean")
# Row groups, one per micro-batch, in update order (over DP ranks: rank-major). The MASK rows of
# test_algo_losses hold 8, 6, 3 and 7 response tokens, so these micro-batches are unequal.
PARTITIONS = {
    "one_microbatch": [[0, 1, 2, 3]],
    "uneven_pair": [[0], [1, 2, 3]],
    "two_ranks_x_two": [[0], [1], [2], [3]],
    "empty_microbatch": [[0, 1], [2], [3]],  # row 2's mask is cleared: a micro-batch without tokens
}
EMPTY_ROWS = {"empty_microbatch": [2]}
TOKEN_METRICS = ("loss", "pg_loss", "kl_ref", "kl_prcp", "entropy", "masked_entropy", "clip_frac_high",
                 "clip_frac_low", "clip_frac_dual", "ratio_mean", "approx_kl_old")


def per_token_reference(cfg: LossConfig, inputs: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """[B, T] tensors of each token's metric values (loss included) and d loss_t / d logp_t."""
    values = {name: torch.zeros(B, T, dtype=torch.float64) for name in TOKEN_METRICS}
    dlogp = torch.zeros(B, T, dtype=torch.float64)
    for b, t in itertools.product(range(B), range(T)):
        if not inputs["response_mask"][b, t]:
            continue
        one = {k: (v[b : b + 1] if k == "advantages" else v[b : b + 1, t : t + 1]) for k, v in inputs.items()}
        metrics, grads = run_naive(cfg, one, num_tokens=1)
        for name in TOKEN_METRICS:
            values[name][b, t] = metrics[name]
        dlogp[b, t] = grads["logp"][0][0]
    return values, dlogp


def naive_aggregate(mode: str, values: torch.Tensor, mask: torch.Tensor, partition: list[list[int]]) -> float:
    """The update's value of a per-token quantity under `mode`, written out plainly."""
    if mode == "global_token_mean":
        return float((values * mask).sum() / mask.sum())
    means = []
    for rows in partition:
        tokens = mask[rows].sum()
        means.append(float((values[rows] * mask[rows]).sum() / tokens) if tokens > 0 else 0.0)
    return sum(means) / len(means)


def naive_token_weights(mode: str, mask: torch.Tensor, partition: list[list[int]]) -> torch.Tensor:
    """d (update loss) / d loss_t: 1/N per token, or 1/(n_m M) for a token of micro-batch m."""
    if mode == "global_token_mean":
        return mask / mask.sum()
    weights = torch.zeros_like(mask)
    for rows in partition:
        if mask[rows].sum() > 0:
            weights[rows] = mask[rows] / mask[rows].sum() / len(partition)
    return weights


def ours(cfg: LossConfig, inputs: dict, partition: list[list[int]]):
    """Sum over micro-batches of compute_papo_loss normalised by token_normaliser; logp gradient."""
    inputs = leaves(inputs)
    mask = inputs["response_mask"]
    counts = UpdateCounts(tokens=int(mask.sum()), microbatches=len(partition))
    total, metric_sums = 0.0, dict.fromkeys(TOKEN_METRICS, 0.0)
    for rows in partition:
        piece = {k: v[rows] for k, v in inputs.items()}
        normaliser = token_normaliser(cfg.aggregation, piece["response_mask"].sum(), counts)
        loss, metrics = run_loss(cfg, piece, num_tokens=normaliser)
        total = total + loss
        for name in TOKEN_METRICS:
            metric_sums[name] += metrics[name].item()
    total.backward()
    return total.item(), inputs["logp"].grad, metric_sums


@pytest.mark.parametrize("partition_name", list(PARTITIONS))
@pytest.mark.parametrize("mode", MODES)
def test_aggregation_matches_the_naive_mode(mode, partition_name):
    cfg = LossConfig(prcp_clip=0.05, aggregation=mode, **COEF_SETS["all"])
    inputs = make_inputs(seed=3)
    inputs["response_mask"][EMPTY_ROWS.get(partition_name, [])] = 0.0
    partition = PARTITIONS[partition_name]
    values, dlogp = per_token_reference(cfg, inputs)
    mask = inputs["response_mask"]
    loss, grad, metrics = ours(cfg, inputs, partition)
    assert loss == pytest.approx(naive_aggregate(mode, values["loss"], mask, partition), abs=1e-12)
    expected_grad = dlogp * naive_token_weights(mode, mask, partition)
    assert torch.allclose(grad, expected_grad, atol=1e-12, rtol=0)
    # Metrics follow the loss's aggregation: the mean of micro-batch means in the reference's mode.
    for name in TOKEN_METRICS:
        assert metrics[name] == pytest.approx(naive_aggregate(mode, values[name], mask, partition), abs=1e-12, rel=1e-12), name


def test_the_modes_differ_on_unequal_microbatches_and_agree_on_one():
    """Guard on the test itself: with unequal token counts the two modes must give other numbers."""
    inputs = make_inputs(seed=3)
    results = {}
    for mode, name in itertools.product(MODES, ("one_microbatch", "two_ranks_x_two")):
        results[mode, name] = ours(LossConfig(aggregation=mode, **COEF_SETS["all"]), inputs, PARTITIONS[name])[0]
    assert results["global_token_mean", "one_microbatch"] == pytest.approx(
        results["microbatch_token_mean", "one_microbatch"], abs=1e-12)
    assert abs(results["global_token_mean", "two_ranks_x_two"] - results["microbatch_token_mean", "two_ranks_x_two"]) > 1e-3
    # global_token_mean does not depend on the micro-batching at all.
    assert results["global_token_mean", "one_microbatch"] == pytest.approx(
        results["global_token_mean", "two_ranks_x_two"], abs=1e-12)


def test_aggregation_is_validated():
    with pytest.raises(ConfigError, match=r"loss\.aggregation='token_mean' is not one of global_token_mean \| "
                                          r"microbatch_token_mean"):
        LossConfig(aggregation="token_mean")
    with pytest.raises(PapoError, match="loss.aggregation='seq'"):
        token_normaliser("seq", torch.tensor(3.0), UpdateCounts(10, 2))
