"""Core attention through `torch.nn.functional.scaled_dot_product_attention` for the local spec.

megatron-core's local `DotProductAttention` materialises the [b*heads, s, s] score matrix with
baddbmm, builds an explicit causal mask, applies a masked-fill and an unfused softmax, and copies
keys/values with repeat_interleave for GQA. On CPU (where Transformer Engine is absent) that is the
largest cost of a training step outside the GEMMs, and it grows with the square of the sequence.
`SdpaDotProductAttention` computes the same function with one SDPA call (fused causal softmax, GQA
without the copies) whenever it can do so exactly, and defers to the stock implementation
otherwise, so switching specs never changes what is computed. See docs/benchmarks.md.
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec


class SdpaDotProductAttention(DotProductAttention):
    """`DotProductAttention` (same constructor, parameters and checkpoint keys) with an SDPA fast path.

    The fast path covers causal self-attention without an explicit mask, window, softmax offset
    or active attention dropout: the training and prefill case. Anything else (padding masks,
    sq != sk decode steps, where SDPA's causal alignment differs from megatron's, dropout, whose
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


def get_local_layer_spec(normalization: str = "RMSNorm") -> ModuleSpec:
    """megatron-core's GPT local layer spec with core attention replaced by `SdpaDotProductAttention`."""
    spec = get_gpt_layer_local_spec(normalization=normalization)
    spec.submodules.self_attention.submodules.core_attention = SdpaDotProductAttention
    return spec
