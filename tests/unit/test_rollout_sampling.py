"""Sampling filters and draws against naive per-row implementations."""

import math

import pytest
import torch

from papo_mega.rollout.sampling import filtered_probs, rollout_generator, sample_tokens, token_logprobs


def naive_filter(row: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    scaled = [x / temperature for x in row]
    order = sorted(range(len(row)), key=lambda i: -scaled[i])
    keep = set(order[:top_k]) if top_k else set(order)
    z = max(scaled)
    weights = {i: math.exp(scaled[i] - z) for i in keep}
    total = sum(weights.values())
    probs = {i: w / total for i, w in weights.items()}
    kept, mass = set(), 0.0
    for i in order:
        if i not in probs:
            continue
        if mass >= top_p:
            break
        kept.add(i)
        mass += probs[i]
    norm = sum(probs[i] for i in kept)
    return [probs[i] / norm if i in kept else 0.0 for i in range(len(row))]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.3, 0, 0.8), (1.0, 4, 0.5), (2.0, 1, 1.0)])
def test_filtered_probs_match_naive(temperature, top_k, top_p):
    logits = torch.randn(5, 9, generator=torch.Generator().manual_seed(3)) * 2
    ours = filtered_probs(logits, temperature, top_k, top_p)
    for r in range(logits.shape[0]):
        expected = naive_filter(logits[r].double().tolist(), temperature, top_k, top_p)
        assert ours[r].tolist() == pytest.approx(expected, abs=1e-9)


def test_sampling_follows_the_distribution_and_is_seeded():
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3]])).repeat(20000, 1)
    draws = sample_tokens(logits, 1.0, 0, 1.0, rollout_generator(1, 0, 0))
    freq = torch.bincount(draws, minlength=3).double() / draws.numel()
    assert freq.tolist() == pytest.approx([0.1, 0.6, 0.3], abs=0.015)
    again = sample_tokens(logits, 1.0, 0, 1.0, rollout_generator(1, 0, 0))
    assert torch.equal(draws, again)
    other_rank = sample_tokens(logits, 1.0, 0, 1.0, rollout_generator(1, 0, 1))
    assert not torch.equal(draws, other_rank)


def test_filtered_tokens_are_never_drawn():
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0]]).repeat(5000, 1)
    draws = sample_tokens(logits, 1.0, 2, 1.0, rollout_generator(0, 0, 0))
    assert set(draws.tolist()) <= {0, 1}
    banned = logits.index_fill(1, torch.tensor([0]), float("-inf"))
    assert 0 not in sample_tokens(banned, 1.0, 0, 1.0, rollout_generator(0, 1, 0)).tolist()


def test_greedy_and_logprobs():
    logits = torch.randn(4, 7, generator=torch.Generator().manual_seed(0))
    tokens = sample_tokens(logits, 0.0, 0, 1.0, rollout_generator(0, 0, 0))
    assert torch.equal(tokens, logits.argmax(-1))
    expected = torch.log_softmax(logits / 0.5, -1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, tokens, 0.5), expected)
