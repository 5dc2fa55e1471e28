"""Under model.precision=fp8 every decoder GEMM input of the training step, SFT and the rollout obeys
Transformer Engine's fp8 shape rule, and the fp8 padding leaves the real tokens' numbers unchanged.

Emulated (no TE on CPU): transformer_engine/pytorch/utils.py assert_dim_for_fp8_exec, called on
(inputmat, weight) by the Linear / LayerNormLinear forwards when fp8 is on, raises unless "the
product of all dimensions except the last [is] divisible by 8 and the last dimension [...] by 16".
megatron-core applies TE's fp8 autocast inside TransformerBlock.forward (get_fp8_context), so the
checker (models/fp8_shapes.py check_fp8_gemm_shapes) hooks the decoder's linears. The model runs
fp32 with the local spec; the code under test is handed a ModelConfig with precision=fp8 (the
padding decisions); fp8=False is the control: today's shapes, which TE would reject.
"""

import pytest
import torch

from papo_mega.config import load_config
from papo_mega.models.fp8_shapes import decoder_gemm_weights
from tests.distributed.fp8_workers import policy_step, rollout_run, sft_step
from tests.distributed.harness import assert_tensors_close, run_distributed

TOL = 1e-6


@pytest.fixture(scope="module")
def policy():
    return {fp8: run_distributed(policy_step, 1, args=(fp8,))[0] for fp8 in (False, True)}


def test_policy_step_gemm_inputs_obey_the_fp8_rule(policy):
    plain, fp8 = policy[False], policy[True]
    assert plain["seq_len"] % 8, "the control must start from an awkward length"
    assert plain["violations"], "control: unpadded micro-batches of 1 break TE's rule (the checker sees it)"
    assert fp8["violations"] == []
    assert fp8["seq_len"] % 16 == 0 and fp8["calls"]
    # The checker hooks exactly the decoder GEMMs whose weights the config check reasons about.
    expected = set(decoder_gemm_weights(load_config(None, ["preset=tiny"]).model, 1).values())
    assert {weight for _, _, weight in fp8["calls"]} == expected


def test_fp8_padding_leaves_policy_logprobs_loss_and_grads_unchanged(policy):
    plain, fp8 = policy[False], policy[True]
    for (logp, masked), (ref, ref_masked) in zip(fp8["real_logp"], plain["real_logp"]):
        torch.testing.assert_close(logp, ref, atol=TOL, rtol=0)
        torch.testing.assert_close(masked, ref_masked, atol=TOL, rtol=0)
    for key in ("loss", "kl_prcp"):
        assert fp8["metrics"][key] == pytest.approx(plain["metrics"][key], abs=TOL)
    assert max(g.abs().max().item() for g in plain["grads"].values()) > 1e-3
    assert_tensors_close(fp8["grads"], plain["grads"], TOL, "fp8-padded vs unpadded gradients")


def test_sft_step_obeys_the_fp8_rule_with_the_same_loss():
    plain, fp8 = (run_distributed(sft_step, 1, args=(flag,))[0] for flag in (False, True))
    assert plain["violations"] and plain["seq_len"] % 8
    assert fp8["violations"] == []
    assert fp8["seq_len"] % 16 == 0
    assert fp8["loss"] == pytest.approx(plain["loss"], abs=TOL)
    assert_tensors_close(fp8["grads"], plain["grads"], TOL, "fp8-padded vs unpadded SFT gradients")


@pytest.mark.parametrize("max_batch_rows", [0, 3], ids=["one_batch", "chunks_of_one_prompt"])
def test_rollout_obeys_the_fp8_rule_and_samples_the_same(max_batch_rows):
    """Prompts of 5 and 17 tokens, n=3 (6 rows), rows finishing at different steps: the prefill's
    tokens and every decode step's rows obey TE's rule; the real rows' tokens, log-probs, lengths
    and finish reasons are those of the unpadded run (inert rows draw nothing from the generator)."""
    plain, fp8 = (run_distributed(rollout_run, 1, args=(flag, max_batch_rows))[0] for flag in (False, True))
    assert len(set(plain["lengths"].tolist())) >= 3, "rows should finish at different steps"
    assert plain["violations"], "control: 6 decode rows and a 17- or 5-token prefill break TE's rule"
    assert fp8["violations"] == []
    decode_rows = [rows for seq, rows in fp8["token_shapes"] if seq == 1]
    assert decode_rows and all(rows % 8 == 0 for rows in decode_rows)
    assert fp8["tokens"].tolist() == plain["tokens"].tolist()
    assert fp8["lengths"].tolist() == plain["lengths"].tolist()
    assert fp8["finish"] == plain["finish"]
    assert fp8["prompt_index"].tolist() == plain["prompt_index"].tolist()
    torch.testing.assert_close(fp8["logprobs"], plain["logprobs"], atol=1e-5, rtol=0)
