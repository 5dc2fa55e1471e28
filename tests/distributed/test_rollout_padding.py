"""A left-padded rollout samples from the trained function under Transformer Engine's attention.

The engine left-pads a batch's prompts and passes a boolean padding mask; megatron-core's static
inference hands it to core attention with attn_mask_type `causal` (prefill) and `no_mask` (decode,
megatron/core/transformer/attention.py _adjust_key_value_for_inference). Transformer Engine's
DotProductAttention (transformer_engine/pytorch/attention/dot_product_attention/
dot_product_attention.py) says the mask "is only used when attn_mask_type includes 'padding' or
'arbitrary'" and "should be None for causal masks and 'no_mask'": with the TE spec, a prompt
shorter than its batch's longest attended to the pad tokens. TE does not run here, so
papo_mega/models/te_attention.py emulates exactly that (mask ignored for causal/no_mask) in the
local spec; the control runs show the emulation reproduces the bug.
"""

import pytest
import torch

from tests.distributed.harness import run_distributed
from tests.distributed.padding_workers import masked_attention_vs_stock, short_prompt_rollouts


def test_padding_aware_attention_equals_megatrons_masked_attention():
    """SDPA under the padding mask == megatron's local DotProductAttention (masked_fill -10000,
    softmax) on left-padded prefill (rows with no real key included) and decode shapes with GQA,
    and the unmasked training call still goes to the wrapped implementation; the bare TE
    emulation differs under the mask (it ignores it). te_wrapper is the class the TE spec gets
    (padding_aware_te_attention) built over the emulation in place of TEDotProductAttention."""
    diffs = run_distributed(masked_attention_vs_stock, 1, timeout_s=120)[0]
    for case in ("prefill", "decode", "training"):
        assert diffs[f"{case}/sdpa"] < 1e-5, (case, diffs)
        assert diffs[f"{case}/te_fixed"] < 1e-5, (case, diffs)
        assert diffs[f"{case}/te_wrapper"] < 1e-5, (case, diffs)
    assert diffs["training/te_raw"] < 1e-5, diffs
    assert diffs["prefill/te_raw"] > 1e-2 and diffs["decode/te_raw"] > 1e-2, diffs


@pytest.mark.parametrize("layout,world", [({}, 1), ({"tp_size": 2}, 2)], ids=["single", "tp2"])
def test_short_prompt_in_a_padded_batch_equals_it_alone(layout, world):
    """Greedy, fp32: the short prompt batched with a long one (left-padded by 8) gives the tokens
    and log-probs it gives alone, with the TE emulation behind the padding-aware attention; the
    same emulation without it (what the TE spec ran before) does not."""
    fixed = run_distributed(short_prompt_rollouts, world, args=(layout, True), timeout_s=180)[0]
    assert fixed["batched_tokens"].tolist() == fixed["alone_tokens"].tolist()
    torch.testing.assert_close(fixed["batched_logprobs"], fixed["alone_logprobs"], atol=1e-5, rtol=0)

    bare = run_distributed(short_prompt_rollouts, world, args=(layout, False), timeout_s=180)[0]
    assert bare["alone_tokens"].tolist() == fixed["alone_tokens"].tolist()  # unpadded: the same function
    diff = (bare["batched_logprobs"] - bare["alone_logprobs"]).abs().max().item()
    assert diff > 1e-2, f"the TE emulation should bite on a padded batch (max |diff| {diff:.2g})"
