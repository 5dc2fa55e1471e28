"""Every parameter shape of one rank, from the config alone: the model that `papo-mega plan` counts
memory with and `train --dry-run` checks a built rank against (both tested against real builds).

Shapes follow the local (non-TE) megatron spec; TE's spec only renames the norms into the linears.
"""

from __future__ import annotations

import math

from papo_mega.config import ModelConfig, VisionConfig

Shapes = list[tuple[int, ...]]


def layer_shapes(m: ModelConfig, tp: int) -> Shapes:
    """One decoder layer's local parameter shapes: RMSNorms, GQA attention (qkv bias), SwiGLU MLP."""
    h, d = m.hidden_size, m.hidden_size // m.num_attention_heads
    qkv = (m.num_attention_heads + 2 * m.num_query_groups) * d // tp
    return [
        (h,),  # input_layernorm (TE spec: linear_qkv.layer_norm_weight)
        (qkv, h), (qkv,),  # linear_qkv weight, bias (add_qkv_bias)
        (h, m.num_attention_heads * d // tp),  # linear_proj (no bias)
        (h,),  # pre_mlp_layernorm (TE spec: linear_fc1.layer_norm_weight)
        (2 * m.ffn_hidden_size // tp, h),  # linear_fc1: [gate; up]
        (h, m.ffn_hidden_size // tp),  # linear_fc2
    ]


def vision_shapes(v: VisionConfig, out_hidden: int, tp: int) -> Shapes:
    """The vision tower's local parameter shapes (all on the first pipeline stage)."""
    hv, iv = v.hidden_size, v.intermediate_size
    merged = hv * v.spatial_merge_size**2
    shapes = [(hv, v.in_channels * v.temporal_patch_size * v.patch_size**2)]  # patch_embed, no bias
    block = [
        (hv,), (3 * hv // tp, hv), (3 * hv // tp,), (hv, hv // tp), (hv,),  # norm, qkv w/b, proj w/b
        (hv,), (2 * iv // tp, hv), (2 * iv // tp,), (hv, iv // tp), (hv,),  # norm, fc1 w/b, fc2 w/b
    ]
    shapes += block * v.depth
    shapes += [(hv,), (merged // tp, merged), (merged // tp,), (out_hidden, merged // tp), (out_hidden,)]
    return shapes


def rank_shapes(m: ModelConfig, v: VisionConfig | None, tp: int, pp: int, pp_rank: int,
                virtual_chunks: int = 1) -> Shapes:
    """Every local parameter shape held by a rank at pipeline position pp_rank (any TP/DP rank)."""
    stages = pp * virtual_chunks
    per_chunk = m.num_layers // stages
    vocab_rows = m.padded_vocab_size // tp
    shapes: Shapes = []
    for chunk in range(virtual_chunks):
        stage = chunk * pp + pp_rank
        first, last = stage == 0, stage == stages - 1
        if first:
            shapes.append((vocab_rows, m.hidden_size))  # word embeddings
            if v is not None and v.enabled:
                shapes += vision_shapes(v, m.hidden_size, tp)
        shapes += layer_shapes(m, tp) * per_chunk
        if last:
            shapes.append((m.hidden_size,))  # final_layernorm
            # A tied output layer has no weight of its own on a single stage; on a later stage it
            # keeps a copy of the embedding that the embedding group keeps in sync.
            if not (m.tie_embeddings and first):
                shapes.append((vocab_rows, m.hidden_size))
    return shapes


def stage_layers(m: ModelConfig, pp: int, pp_rank: int, virtual_chunks: int = 1) -> list[int]:
    """Global decoder-layer indices held by pipeline rank pp_rank: model chunk c of that rank is
    pipeline stage c * pp + pp_rank (megatron's interleaved assignment), each of num_layers / (pp * vpp)."""
    per_chunk = m.num_layers // (pp * virtual_chunks)
    return [layer for chunk in range(virtual_chunks)
            for layer in range((chunk * pp + pp_rank) * per_chunk, (chunk * pp + pp_rank + 1) * per_chunk)]


def fp8_gemm_params(m: ModelConfig, tp: int, pp: int, pp_rank: int, virtual_chunks: int = 1) -> int:
    """Weights on one rank whose GEMMs run in fp8: the 2-D weights (qkv, proj, fc1, fc2) of the decoder
    layers outside model.fp8_bf16_layers_start / _end. megatron numbers those layers globally
    (megatron/core/fp8_utils.py is_first_last_bf16_layer: `layer_no < num_layers_at_start_in_bf16`,
    `layer_no >= num_layers - num_layers_at_end_in_bf16`). The embedding, the output layer and the vision
    tower are no TE fp8 modules. 0 unless model.precision is fp8."""
    if m.precision != "fp8":
        return 0
    bf16 = set(range(m.fp8_bf16_layers_start)) | set(range(m.num_layers - m.fp8_bf16_layers_end, m.num_layers))
    fp8_layers = sum(1 for layer in stage_layers(m, pp, pp_rank, virtual_chunks) if layer not in bf16)
    return fp8_layers * numel([shape for shape in layer_shapes(m, tp) if len(shape) == 2])


def numel(shapes: Shapes) -> int:
    return sum(math.prod(shape) for shape in shapes)
