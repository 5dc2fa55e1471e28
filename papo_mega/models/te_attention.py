"""Transformer Engine's core attention made padding-aware for the rollout, and a CPU emulation of it.

The rollout engine left-pads prompts and hands megatron-core a boolean mask (True = masked out).
megatron's static inference passes it to core attention with attn_mask_type `causal` at prefill
and `no_mask` at decode (megatron/core/transformer/attention.py, _adjust_key_value_for_inference:
"attn_mask_type = AttnMaskType.no_mask" once sequence_len_offset > 0 in eval). For those types
Transformer Engine never reads the mask:

* transformer_engine/pytorch/attention/dot_product_attention/dot_product_attention.py,
  DotProductAttention: "Argument attention_mask in the forward call is only used when
  attn_mask_type includes 'padding' or 'arbitrary'"; its forward doc: the mask "should be None for
  causal masks and 'no_mask'". For `causal` TE "calculates and applies an upper triangular mask",
  aligned to the top left corner.
* `padding_causal` does not rescue a left-padded batch: for "padding" types TE turns the mask into
  cu_seqlens with dot_product_attention/utils.py get_cu_seqlens, which counts each row's unmasked
  tokens (mask.logical_not().sum) - sequence lengths from offset 0, i.e. right padding.

So with the TE spec every prompt shorter than the longest in its batch attends to the pad tokens
and samples from a different function than the one trained. `padding_aware_te_attention()` is
megatron's TEDotProductAttention with `PaddingMaskedAttention` in front (the masked rollout calls
go to SDPA with the mask; training, which passes no mask, stays on TE's fused kernels).

TE does not run on CPU, so `EmulatedTEDotProductAttention` computes what TE computes for causal and
no_mask - the mask ignored - inside megatron's local spec; `emulate_transformer_engine()` makes
`select_layer_spec` build that spec, with or without the padding-aware mixin (tests).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from papo_mega.models.sdpa_attention import (
    INFERENCE_MASK_TYPES,
    PaddingMaskedAttention,
    SdpaDotProductAttention,
)


class EmulatedTEDotProductAttention(DotProductAttention):
    """megatron's TEDotProductAttention as TE computes it for attn_mask_type causal / no_mask, on CPU:
    causal (top-left aligned, as TE's `causal`) or full attention, `attention_mask` ignored.

    Same constructor and forward signature as megatron's TEDotProductAttention (0.16.1:
    forward(query, key, value, attention_mask, attn_mask_type, attention_bias=None,
    packed_seq_params=None, num_splits=None)). Other mask types are not emulated.
    """

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, num_splits=None):
        """[sq, b, heads, d] queries, [sk, b, groups, d] keys/values -> [sq, b, heads * d]."""
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if mask_type not in INFERENCE_MASK_TYPES or attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError(f"the TE emulation covers mask types causal/no_mask only, not {mask_type.name}")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        context = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=mask_type == AttnMaskType.causal, enable_gqa=k.size(1) != q.size(1),
            scale=self.softmax_scale * (self.scale_mask_softmax.scale or 1.0),
        )
        return context.permute(2, 0, 1, 3).reshape(query.size(0), query.size(1), -1)


class PaddingAwareEmulatedTEAttention(PaddingMaskedAttention, EmulatedTEDotProductAttention):
    """The emulated TE attention behind the padding-aware mixin: what the TE spec runs with the fix."""


@functools.cache
def padding_aware_te_attention() -> type:
    """megatron's TEDotProductAttention with `PaddingMaskedAttention` in front (needs Transformer Engine)."""
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    class PaddingAwareTEDotProductAttention(PaddingMaskedAttention, TEDotProductAttention):
        """TE's fused attention, except for masked causal/no_mask calls (the rollout), which use SDPA."""

    return PaddingAwareTEDotProductAttention


_emulation: list[type] = []  # innermost emulate_transformer_engine() block's core attention


@contextlib.contextmanager
def emulate_transformer_engine(padding_aware: bool = True) -> Iterator[None]:
    """Within the block, `select_layer_spec` builds the local spec with the emulated TE core attention
    (behind the padding-aware mixin unless padding_aware=False: today's TE behaviour, a test control)."""
    _emulation.append(PaddingAwareEmulatedTEAttention if padding_aware else EmulatedTEDotProductAttention)
    try:
        yield
    finally:
        _emulation.pop()


def emulating_transformer_engine() -> bool:
    """Inside an emulate_transformer_engine() block (the local spec is used even where TE runs)."""
    return bool(_emulation)


def local_core_attention() -> type:
    """The local spec's core attention: SDPA (padding-aware), or the TE emulation inside emulate_transformer_engine."""
    return _emulation[-1] if _emulation else SdpaDotProductAttention
