"""Core attention through `torch.nn.functional.scaled_dot_product_attention` for the local spec.

megatron-core's local `DotProductAttention` materialises the [b*heads, s, s] score matrix with
baddbmm, builds an explicit causal mask, applies a masked-fill and an unfused softmax, and copies
keys/values with repeat_interleave for GQA. On CPU (where Transformer Engine is absent) that is the
largest cost of a training step outside the GEMMs, and it grows with the square of the sequence.
`SdpaDotProductAttention` computes the same function with one SDPA call (fused causal softmax, GQA
without the copies) whenever it can do so exactly, and defers to the stock implementation
otherwise, so switching specs never changes what is computed. See docs/benchmarks.md.

`PaddingMaskedAttention` is the rollout half: megatron's static inference hands core attention the
engine's left-padding mask together with attn_mask_type `causal` (prefill) or `no_mask` (decode),
a combination Transformer Engine answers by ignoring the mask (papo_mega/models/te_attention.py).
The mixin computes exactly those calls itself, with the mask, in every spec.
"""

from __future__ import annotations

import math

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

# The mask types megatron's static inference passes (attention.py, _adjust_key_value_for_inference:
# the layer's `causal` at prefill, `no_mask` once sequence_len_offset > 0).
INFERENCE_MASK_TYPES = (AttnMaskType.causal, AttnMaskType.no_mask)


def compute_masked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                             scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """Softmax attention under a boolean mask, as megatron's local DotProductAttention computes it.

    query [sq, b, heads, d], key/value [sk, b, groups, d] (query head i reads group i // (heads /
    groups), megatron's GQA assignment), mask broadcastable to [b, 1, sq, sk] with True = masked
    out (megatron's convention; SDPA's boolean mask is the opposite) -> [sq, b, heads * d].

    A query row with every key masked (a left-pad position at prefill) gets equal weights on all
    keys, the mean of the values: what megatron's masked_fill(-10000) before the softmax gives. A
    zeroed query with nothing masked gives exactly that, where SDPA on an all-masked row would
    return NaN, and a NaN at a pad position reaches real rows through 0 * NaN in the next layer's
    attention product.
    """
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # SDPA wants [b, heads, s, d]
    dead = mask.all(dim=-1, keepdim=True)  # [b or 1, 1, sq or 1, 1]
    q = q.masked_fill(dead, 0.0)
    context = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=~mask | dead, dropout_p=dropout_p, scale=scale, enable_gqa=k.size(1) != q.size(1)
    )
    return context.permute(2, 0, 1, 3).reshape(query.size(0), query.size(1), -1)


class PaddingMaskedAttention:
    """Mixin for a megatron core attention (DotProductAttention, TEDotProductAttention or a
    subclass): a call with an explicit boolean `attention_mask` under mask type causal/no_mask (the
    rollout's left-padded prefill and decode) is computed by `compute_masked_attention` with that
    mask; every other call (training passes no mask) goes to the wrapped implementation unchanged.

    Same constructor as megatron's core attention; no parameters, so checkpoints are unaffected.
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None, **kwargs):
        super().__init__(config=config, layer_number=layer_number, attn_mask_type=attn_mask_type,
                         attention_type=attention_type, attention_dropout=attention_dropout,
                         softmax_scale=softmax_scale, **kwargs)
        # The net scale both megatron (softmax_scale / layer_number, times layer_number back in the
        # softmax under query-key layer scaling) and TE (1 / sqrt(kv_channels) by default) apply.
        head_dim = kwargs.get("k_channels") or config.kv_channels
        self.masked_softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.masked_dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        # Windows and softmax offsets change the function; those layers keep the wrapped code.
        self.masked_path_supported = config.window_size is None and config.softmax_type == "vanilla"

    def _masked_path_applies(self, attention_mask, attn_mask_type, attention_bias, packed_seq_params) -> bool:
        return (
            self.masked_path_supported
            and isinstance(attention_mask, torch.Tensor)
            and attention_mask.dtype == torch.bool
            and attn_mask_type in INFERENCE_MASK_TYPES
            and attention_bias is None
            and packed_seq_params is None
        )

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        """megatron's core-attention call: [sq, b, heads, d] queries, [sk, b, groups, d] keys/values."""
        if self._masked_path_applies(attention_mask, attn_mask_type, attention_bias, packed_seq_params):
            dropout_p = self.masked_dropout_p if self.training else 0.0
            return compute_masked_attention(query, key, value, attention_mask, self.masked_softmax_scale, dropout_p)
        return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                               attention_bias=attention_bias, packed_seq_params=packed_seq_params, **kwargs)


class SdpaDotProductAttention(PaddingMaskedAttention, DotProductAttention):
    """`DotProductAttention` (same constructor, parameters and checkpoint keys) with SDPA fast paths.

    The causal fast path covers causal self-attention without an explicit mask, window, softmax
    offset or active attention dropout: the training and prefill case. The padding-mask path
    (`PaddingMaskedAttention`) covers the rollout's masked prefill and decode. Anything else
    (sq != sk without a mask, where SDPA's causal alignment differs from megatron's, dropout, whose
    RNG stream SDPA would draw differently) runs the inherited code unchanged.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The stock path divides softmax_scale by the layer number for query-key layer scaling
        # and multiplies it back inside the softmax; SDPA takes the net scale in one go.
        self.sdpa_scale = self.softmax_scale * (self.scale_mask_softmax.scale or 1.0)

    def _fast_path_applies(self, query, key, attention_mask, attention_bias, packed_seq_params) -> bool:
        dropout_active = self.training and self.attention_dropout.p > 0.0
        return (
            self.attn_mask_type == AttnMaskType.causal
            and attention_mask is None
            and attention_bias is None
            and packed_seq_params is None
            and self.softmax_offset is None
            and self.scale_mask_softmax.window_size is None
            and not dropout_active
            and query.size(0) == key.size(0)
        )

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        """[sq, b, heads, d] queries and [sk, b, groups, d] keys/values -> [sq, b, heads * d]."""
        if not self._fast_path_applies(query, key, attention_mask, attention_bias, packed_seq_params):
            return super().forward(
                query,
                key,
                value,
                attention_mask,
                attn_mask_type=attn_mask_type,
                attention_bias=attention_bias,
                packed_seq_params=packed_seq_params,
            )
        # SDPA wants [b, heads, s, d]; enable_gqa maps query head i to group i // (heads / groups),
        # the same assignment as megatron's repeat_interleave.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        context = torch.nn.functional.scaled_dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            scale=self.sdpa_scale,
            enable_gqa=k.size(1) != q.size(1),
        )
        # [b, heads, sq, d] -> [sq, b, heads * d]
        return context.permute(2, 0, 1, 3).reshape(
            query.size(0), query.size(1), self.hidden_size_per_partition
        )


def get_local_layer_spec(normalization: str = "RMSNorm", core_attention: type = SdpaDotProductAttention) -> ModuleSpec:
    """megatron-core's GPT local layer spec with core attention replaced (by `SdpaDotProductAttention`)."""
    spec = get_gpt_layer_local_spec(normalization=normalization)
    spec.submodules.self_attention.submodules.core_attention = core_attention
    return spec
