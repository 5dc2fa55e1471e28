"""Non-causal core attention over packed sequences, for megatron-core's `SelfAttention`.

The vision tower packs every image of a batch (and every attention window inside an image) into
one sequence. Which tokens may see each other is given by a block-diagonal boolean mask, in
megatron's convention (True = masked out), so the stock `DotProductAttention` with an arbitrary
mask would compute the same function; this module does it with one
`torch.nn.functional.scaled_dot_product_attention` call instead of materialising scores with
baddbmm and an unfused softmax.
"""

from __future__ import annotations

import math

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide


def build_segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[s] segment id per token -> [1, 1, s, s] bool mask, True where query and key differ in segment.

    Segments are the attention units (an image, a frame, a window); tokens of one segment need not
    be contiguous, but in the vision tower they are.
    """
    return (segment_ids[:, None] != segment_ids[None, :])[None, None]


class PackedSdpaAttention(MegatronModule):
    """Core attention with megatron's constructor and forward signature, computed by SDPA.

    Attention is bidirectional; `attention_mask` ([b or 1, 1, sq, sk] bool, True = masked out, or
    None for full attention) selects the block-diagonal structure. No parameters: checkpoints are
    unaffected by swapping it in.
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ):
        super().__init__(config=config)
        if attn_mask_type in (
            AttnMaskType.causal,
            AttnMaskType.padding_causal,
            AttnMaskType.causal_bottom_right,
        ):
            raise ValueError(f"PackedSdpaAttention is bidirectional; got attn_mask_type={attn_mask_type}")
        if config.context_parallel_size != 1:
            raise ValueError("PackedSdpaAttention does not support context parallelism")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp_size = pg_collection.tp.size()
        self.attn_mask_type = attn_mask_type
        self.head_dim = config.kv_channels
        self.hidden_size_per_partition = divide(config.kv_channels * config.num_attention_heads, tp_size)
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """[sq, b, heads, d] queries, [sk, b, groups, d] keys/values -> [sq, b, heads * d]."""
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError(
                "PackedSdpaAttention takes a boolean attention_mask, not a bias or packed params"
            )
        # SDPA wants [b, heads, s, d] and a mask that is True where attention is allowed.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        allowed = None if attention_mask is None else ~attention_mask
        context = torch.nn.functional.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=allowed,
            dropout_p=self.dropout_p if self.training else 0.0,
            scale=self.softmax_scale,
            enable_gqa=k.size(1) != q.size(1),
        )
        # [b, heads, sq, d] -> [sq, b, heads * d]
        return context.permute(2, 0, 1, 3).reshape(
            query.size(0), query.size(1), self.hidden_size_per_partition
        )
