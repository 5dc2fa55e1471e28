"""Non-causal core attention over packed sequences, for megatron-core's `SelfAttention`.

The vision tower packs every image of a batch (and every attention window inside an image) into
one sequence. Which tokens may see each other is block-diagonal: contiguous segments attend within
themselves. The layers receive the structure as `attention_mask` in one of two forms:

* segment lengths, a 1-D integer tensor (what the tower passes): segments of equal length are
  stacked into one batch and attended without any mask, so the cost is sum(len^2) rather than
  (sum len)^2 - for 16 images of 256 patches in 16-patch windows that is 256x less work than a
  masked attention over the packed sequence;
* a [b or 1, 1, s, s] boolean mask in megatron's convention (True = masked out), computed with
  one masked SDPA call (the general form; used by tests as the reference).
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


def segment_lengths(segment_ids: torch.Tensor) -> torch.Tensor:
    """[s] segment id per token, segments contiguous -> [num_segments] int64 lengths, in order."""
    _, counts = torch.unique_consecutive(segment_ids, return_counts=True)
    if len(counts) != len(torch.unique(segment_ids)):
        raise ValueError("segments must be contiguous to be passed as lengths; use build_segment_mask")
    return counts


def _segmented_sdpa(q, k, v, lengths: list[int], scale: float, dropout_p: float, gqa: bool) -> torch.Tensor:
    """SDPA within contiguous segments: [1, h, s, d] tensors -> [1, h, s, d]; equal lengths share a call."""
    if len(set(lengths)) == 1:  # the usual case (one image size): a view, no copies
        n, length = len(lengths), lengths[0]
        split = [t.reshape(t.size(1), n, length, t.size(3)).transpose(0, 1) for t in (q, k, v)]
        out = torch.nn.functional.scaled_dot_product_attention(*split, dropout_p=dropout_p, scale=scale,
                                                               enable_gqa=gqa)
        return out.transpose(0, 1).reshape(q.shape)
    pieces = [torch.split(t, lengths, dim=2) for t in (q, k, v)]
    by_length: dict[int, list[int]] = {}
    for i, length in enumerate(lengths):
        by_length.setdefault(length, []).append(i)
    outputs: list[torch.Tensor | None] = [None] * len(lengths)
    for members in by_length.values():
        stacked = [torch.cat([piece[i] for i in members]) for piece in pieces]  # [n, h, len, d]
        out = torch.nn.functional.scaled_dot_product_attention(*stacked, dropout_p=dropout_p, scale=scale,
                                                               enable_gqa=gqa)
        for j, i in enumerate(members):
            outputs[i] = out[j : j + 1]
    return torch.cat(outputs, dim=2)


class PackedSdpaAttention(MegatronModule):
    """Core attention with megatron's constructor and forward signature, computed by SDPA.

    Attention is bidirectional; `attention_mask` selects the block-diagonal structure: segment
    lengths (1-D integer tensor, batch 1), a [b or 1, 1, sq, sk] bool mask (True = masked out), or
    None for full attention. No parameters: checkpoints are
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
        dropout_p = self.dropout_p if self.training else 0.0
        gqa = k.size(1) != q.size(1)
        if attention_mask is not None and attention_mask.dim() == 1:
            if q.size(0) != 1 or int(attention_mask.sum()) != q.size(2):
                raise ValueError(f"segment lengths cover {int(attention_mask.sum())} tokens of a batch "
                                 f"{q.size(0)} x {q.size(2)}; they need batch 1 and must cover the sequence")
            context = _segmented_sdpa(q, k, v, attention_mask.tolist(), self.softmax_scale, dropout_p, gqa)
        else:
            allowed = None if attention_mask is None else ~attention_mask
            context = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, dropout_p=dropout_p, scale=self.softmax_scale, enable_gqa=gqa
            )
        # [b, heads, sq, d] -> [sq, b, heads * d]
        return context.permute(2, 0, 1, 3).reshape(
            query.size(0), query.size(1), self.hidden_size_per_partition
        )
