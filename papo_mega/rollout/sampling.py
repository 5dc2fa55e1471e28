"""Turning next-token logits into tokens: temperature, top-k, top-p, seeded draws. Pure functions.

Draws are inverse-CDF samples from uniforms of a generator seeded by (seed, step, data-parallel
rank), so every tensor-parallel and pipeline rank of one model replica draws the same tokens,
and the same seed gives the same responses at any layout (up to float rounding of the logits).
"""

from __future__ import annotations

import hashlib

import torch


def rollout_generator(seed: int, step: int, dp_rank: int) -> torch.Generator:
    """A CPU generator for one rank's rollout at one step (independent streams by hashing)."""
    digest = hashlib.sha256(f"rollout/{seed}/{step}/{dp_rank}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def filtered_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Sampling distribution [R, V] (float64) after temperature, top-k and top-p."""
    scaled = logits.double() / temperature
    if top_k and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Keep a token while the mass before it is below top_p (the first token always stays).
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample_tokens(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                  generator: torch.Generator) -> torch.Tensor:
    """Next tokens [R] from logits [R, V]; temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filtered_probs(logits, temperature, top_k, top_p)
    uniform = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64).to(probs.device)
    cdf = torch.cumsum(probs, dim=-1)
    tokens = torch.searchsorted(cdf, uniform * cdf[:, -1:]).squeeze(-1)
    return tokens.clamp(max=probs.shape[-1] - 1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(token) under logits / temperature (unfiltered: what the policy update recomputes)."""
    scale = temperature if temperature > 0 else 1.0
    return torch.log_softmax(logits.float() / scale, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
