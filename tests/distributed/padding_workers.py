"""Workers for test_rollout_padding: core attention under the rollout's padding mask, and a
left-padded rollout on the tiny text model with Transformer Engine's attention emulated."""

from __future__ import annotations

import torch
import torch.distributed as dist

from papo_mega.models.presets import PRESETS
from papo_mega.types import RolloutPrompt

PAD_ID = 0
SHORT, LONG = 5, 13  # prompt lengths: the short one is left-padded by 8 when batched with the long one


def tiny_model(**overrides):
    """The tiny preset's language model (no vision tower), fp32."""
    from papo_mega.config import ModelConfig

    return ModelConfig(**{**PRESETS["tiny"]["model"], "precision": "fp32", **overrides})


def _attention_inputs(rows: int, sq: int, sk: int, heads: int, groups: int, seed: int):
    """Random [sq, b, heads, d] queries, [sk, b, groups, d] keys/values; head dim 16."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sq, rows, heads, 16, generator=gen)
    k = torch.randn(sk, rows, groups, 16, generator=gen)
    v = torch.randn(sk, rows, groups, 16, generator=gen)
    return q, k, v


def _left_pad_masks(lengths: list[int], total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's prefill mask [b, 1, s, s] (causal and real keys) and decode mask [b, 1, 1, s]
    (real keys), True = masked out, for left-padded rows of these lengths."""
    real = torch.arange(total)[None, :] >= total - torch.tensor(lengths)[:, None]
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    return ~(causal[None] & real[:, None, :])[:, None], ~real[:, None, None, :]


def _padding_aware_te_class_over(base: type) -> type:
    """What padding_aware_te_attention() builds on a GPU, with `base` standing in for megatron's
    TEDotProductAttention (this process only: Transformer Engine does not import here)."""
    import sys
    import types

    from papo_mega.models.te_attention import padding_aware_te_attention

    sys.modules["megatron.core.extensions.transformer_engine"] = types.SimpleNamespace(TEDotProductAttention=base)
    padding_aware_te_attention.cache_clear()
    return padding_aware_te_attention()


def masked_attention_vs_stock() -> dict[str, float]:
    """Max |difference| to megatron's local DotProductAttention under the same mask, for
    SdpaDotProductAttention, the padding-aware emulated TE attention and (control) the emulated TE
    attention alone; left-padded prefill and decode, and the unmasked training call; GQA."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from papo_mega.distributed import init_distributed
    from papo_mega.models.gpt import build_transformer_config
    from papo_mega.models.sdpa_attention import SdpaDotProductAttention
    from papo_mega.models.te_attention import EmulatedTEDotProductAttention, PaddingAwareEmulatedTEAttention

    groups = init_distributed({}, seed=0)
    te_wrapper = _padding_aware_te_class_over(EmulatedTEDotProductAttention)
    config = build_transformer_config(tiny_model(hidden_size=64, num_attention_heads=4, num_query_groups=2), groups)
    kinds = {"stock": DotProductAttention, "sdpa": SdpaDotProductAttention,
             "te_fixed": PaddingAwareEmulatedTEAttention, "te_raw": EmulatedTEDotProductAttention,
             "te_wrapper": te_wrapper}
    modules = {name: cls(config, 1, AttnMaskType.causal, "self").eval() for name, cls in kinds.items()}
    prefill_mask, decode_mask = _left_pad_masks([3, 7, 1], 7)
    cases = {
        "prefill": (_attention_inputs(3, 7, 7, 4, 2, seed=1), prefill_mask, AttnMaskType.causal),
        "decode": (_attention_inputs(3, 1, 7, 4, 2, seed=2), decode_mask, AttnMaskType.no_mask),
        "training": (_attention_inputs(3, 7, 7, 4, 2, seed=3), None, AttnMaskType.causal),
    }
    diffs = {}
    with torch.no_grad():
        for case, ((q, k, v), mask, mask_type) in cases.items():
            outs = {name: m(q, k, v, mask, attn_mask_type=mask_type) for name, m in modules.items()}
            assert torch.isfinite(outs["stock"]).all()
            for name in ("sdpa", "te_fixed", "te_raw", "te_wrapper"):
                diffs[f"{case}/{name}"] = (outs[name] - outs["stock"]).abs().max().item()
    return diffs


def _prompts() -> list[RolloutPrompt]:
    """A short and a long text prompt (no image tokens: ids below the tiny preset's specials)."""
    gen = torch.Generator().manual_seed(5)
    return [RolloutPrompt(torch.randint(1, 250, (n,), generator=gen)) for n in (SHORT, LONG)]


def short_prompt_rollouts(layout: dict, padding_aware: bool) -> dict | None:
    """Greedy rollouts of the short prompt batched with the long one (left-padded) and alone, with
    Transformer Engine's core attention emulated (with or without the padding-aware mixin)."""
    from papo_mega.config import RolloutConfig
    from papo_mega.distributed import init_distributed
    from papo_mega.models.qwen_vl import build_model_chunks
    from papo_mega.models.te_attention import emulate_transformer_engine
    from papo_mega.rollout.engine import MegatronEngine

    groups = init_distributed(layout, seed=3)
    # A wide init: with 0.02 the attention is near uniform and attending to pad tokens hardly shows.
    model = tiny_model(init_std=0.3)
    with emulate_transformer_engine(padding_aware=padding_aware):
        chunks = build_model_chunks(model, None, groups, seed=11)
    for chunk in chunks:
        chunk.eval()
    engine = MegatronEngine(chunks, groups, model, spatial_merge_size=2, stop_token_ids=[], pad_token_id=PAD_ID)
    params = RolloutConfig(n=1, temperature=0.0, max_new_tokens=8)
    short, long = _prompts()
    batched = engine.generate([short, long], params, seed=0, step=0)
    alone = engine.generate([short], params, seed=0, step=0)
    result = {"batched_tokens": batched.response_ids[0], "batched_logprobs": batched.logprobs[0],
              "alone_tokens": alone.response_ids[0], "alone_logprobs": alone.logprobs[0]}
    return result if dist.get_rank() == 0 else None
