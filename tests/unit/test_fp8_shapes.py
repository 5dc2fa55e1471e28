"""Transformer Engine's fp8 GEMM shape rule (models/fp8_shapes.py), the padding helpers, the policy
rows and SFT lengths they pad, and the config check of widths no padding can fix.

Emulated: transformer_engine/pytorch/utils.py assert_dim_for_fp8_exec - "the product of all
dimensions except the last [divisible] by 8 and the last dimension [...] by 16" - and, for MXFP8,
pytorch/tensor/mxfp8_tensor.py MXFP8Quantizer.is_quantizable (both % 32).
"""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from papo_mega.config import load_config
from papo_mega.errors import ConfigError
from papo_mega.models.fp8_shapes import (
    decoder_gemm_weights,
    fp8_gemm_shape_ok,
    fp8_padded_length,
    fp8_padded_rows,
)
from papo_mega.rollout.assemble import assemble_policy_rows, longest_sequence
from papo_mega.sft import Example, step_seq_len
from papo_mega.types import RolloutBatch, RolloutPrompt

REPO = Path(__file__).resolve().parents[2]
TINY = load_config(None, ["preset=tiny"]).model
FP8 = replace(TINY, precision="fp8")
MXFP8 = replace(TINY, precision="fp8", fp8_recipe="mxfp8")


@pytest.mark.parametrize("shape, ok", [
    ((16, 64), True), ((8, 1, 48), True), ((3, 8, 16), True),  # 3*8 = 24 tokens
    ((17, 1, 64), False), ((5, 3, 64), False), ((8, 24), False), ((16, 8), False),
])
def test_rule_is_te_assert_dim_for_fp8_exec(shape, ok):
    assert fp8_gemm_shape_ok(shape) is ok
    assert fp8_gemm_shape_ok(shape, "tensorwise") is ok


def test_mxfp8_rule_needs_blocks_of_32():
    assert fp8_gemm_shape_ok((32, 1, 64), "mxfp8")
    assert not fp8_gemm_shape_ok((16, 64), "mxfp8") and not fp8_gemm_shape_ok((32, 48), "mxfp8")


@pytest.mark.parametrize("n", [1, 5, 15, 16, 17, 26, 1000])
def test_padded_length(n):
    assert fp8_padded_length(n, TINY) == n  # fp32 / bf16: no padding
    assert fp8_padded_length(n, replace(TINY, precision="bf16")) == n
    padded = fp8_padded_length(n, FP8)
    assert padded % 16 == 0 and n <= padded < n + 16
    assert fp8_padded_length(padded, FP8) == padded
    assert fp8_padded_length(n, MXFP8) % 32 == 0
    # At any micro-batch (and both PAPO views) the token count obeys the rule.
    assert all(fp8_gemm_shape_ok((padded, b, 64)) for b in (1, 2, 3))


def test_padded_rows():
    assert [fp8_padded_rows(n, FP8) for n in (1, 6, 8, 9)] == [8, 8, 8, 16]
    assert [fp8_padded_rows(n, TINY) for n in (1, 6, 9)] == [1, 6, 9]
    assert fp8_padded_rows(6, MXFP8) == 32


def _rollout():
    prompts = [RolloutPrompt(torch.arange(1, 18)), RolloutPrompt(torch.arange(1, 16))]
    lengths = torch.tensor([3, 9, 1, 5, 2, 6])
    mask = (torch.arange(9)[None] < lengths[:, None]).float()
    ids = (torch.arange(54).view(6, 9) % 50 + 60) * mask.long()
    return prompts, RolloutBatch(torch.arange(2).repeat_interleave(3), ids, mask, torch.zeros(6, 9), lengths, ["eos"] * 6)


def test_policy_rows_are_padded_under_fp8_only():
    prompts, rollout = _rollout()
    assert longest_sequence(prompts, rollout) == 26 == longest_sequence(prompts, rollout, TINY)
    assert longest_sequence(prompts, rollout, FP8) == 32
    plain = assemble_policy_rows(prompts, rollout, torch.zeros(6), TINY, 2, 0, rows=range(1, 2))
    padded = assemble_policy_rows(prompts, rollout, torch.zeros(6), FP8, 2, 0, rows=range(1, 2))
    assert plain.input_ids.shape == (1, 26) and padded.input_ids.shape == (1, 32)
    # The padding is right padding with no loss; the real columns are the unpadded rows.
    assert padded.response_mask[:, 26:].sum() == 0
    assert torch.equal(padded.input_ids[:, :26], plain.input_ids)
    assert torch.equal(padded.response_mask[:, :26], plain.response_mask)
    assert torch.equal(padded.position_ids[..., :26], plain.position_ids)
    assert torch.equal(padded.targets[:, :25], plain.targets[:, :25])  # the last column wraps: masked
    # A common seq_len that breaks the rule is padded too (every micro-batch the same).
    assert assemble_policy_rows(prompts, rollout, torch.zeros(6), FP8, 2, 0, seq_len=27).input_ids.shape[1] == 32


def test_sft_step_length_is_padded_under_fp8_only():
    examples = [Example(torch.arange(23), 10, None, None), Example(torch.arange(12), 5, None, None)]
    assert step_seq_len(examples, TINY) == 22
    assert step_seq_len(examples, FP8) == 32


@pytest.mark.parametrize("recipe, world", [("papo_g_32b.yaml", 16), ("papo_g_72b.yaml", 32)])
def test_shipped_fp8_recipes_pass_the_width_check(recipe, world):
    cfg = load_config(REPO / "examples" / recipe)
    assert cfg.model.precision == "fp8"
    cfg.check(world)
    tp = cfg.parallel.tp_size
    assert all(fp8_gemm_shape_ok(w, cfg.model.fp8_recipe) for w in decoder_gemm_weights(cfg.model, tp).values())


@pytest.mark.parametrize("overrides, world, names", [
    (["model.hidden_size=72", "model.mrope_section=[2,3,4]"], 1, "model.hidden_size"),  # 72 % 16
    (["model.ffn_hidden_size=136"], 1, "model.ffn_hidden_size"),  # fc2's input width 136 % 16
    (["model.fp8_recipe=mxfp8", "model.ffn_hidden_size=80"], 1, "model.ffn_hidden_size"),  # 80 % 32
    # 12 heads of 8 over tp4: linear_proj's input width is 24 per rank (hidden 96 itself is fine).
    (["model.hidden_size=96", "model.num_attention_heads=12", "model.num_query_groups=4",
      "model.mrope_section=[1,1,2]", "parallel.tp_size=4"], 4, "model.hidden_size / num_attention_heads"),
])
def test_fp8_widths_that_padding_cannot_fix_are_one_config_error(overrides, world, names):
    with pytest.raises(ConfigError, match=names) as err:
        load_config(None, ["preset=tiny", "model.precision=fp8", *overrides]).check(world)
    assert "\n" not in str(err.value) and "model.precision=bf16" in str(err.value)
    # The same widths in bf16 are fine: the check is fp8's only.
    load_config(None, ["preset=tiny", *overrides]).check(world)
