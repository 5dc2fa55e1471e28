"""vocab_parallel_logprobs on one process (tp_group=None) against a plain torch.log_softmax.

The tensor-parallel reduction itself is checked in tests/distributed/test_logprobs_tp.py.
"""

from __future__ import annotations

import pytest
import torch

from papo_mega.algo.logprobs import vocab_parallel_logprobs


def naive(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """log p(target) and full entropy of softmax(logits / temperature), from a whole-vocabulary log_softmax."""
    log_probs = torch.log_softmax(logits.double() / temperature, dim=-1)
    logp = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return logp, entropy


def make(shape=(3, 5), vocab=11, seed=0, dtype=torch.float64, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(*shape, vocab, generator=gen, dtype=torch.float64)).to(dtype)
    targets = torch.randint(0, vocab, shape, generator=gen)
    return logits, targets


def weights(shape, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64), torch.randn(*shape, generator=gen, dtype=torch.float64)


def grads_of(fn, logits, targets, w_logp, w_ent):
    """d/d logits of sum(logp * w_logp + entropy * w_ent) (a weight of None leaves that output out)."""
    leaf = logits.detach().clone().requires_grad_(True)
    logp, entropy = fn(leaf, targets)
    total = 0.0
    if w_logp is not None:
        total = total + (logp.double() * w_logp).sum()
    if w_ent is not None:
        total = total + (entropy.double() * w_ent).sum()
    total.backward()
    return logp.detach(), (entropy.detach() if entropy is not None else None), leaf.grad


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_tokens", [1, 3, 4, 7, 15, 16, 1024])
def test_values_and_gradients_match_log_softmax(temperature, chunk_tokens):
    logits, targets = make(shape=(3, 5), vocab=13, seed=chunk_tokens)
    w1, w2 = weights(targets.shape)

    def ours(x, t):
        return vocab_parallel_logprobs(x, t, None, temperature, with_entropy=True, chunk_tokens=chunk_tokens)

    def reference(x, t):
        return naive(x, t, temperature)

    logp, entropy, grad = grads_of(ours, logits, targets, w1, w2)
    want_logp, want_entropy, want_grad = grads_of(reference, logits, targets, w1, w2)
    assert logp.shape == targets.shape and logp.dtype == torch.float64
    torch.testing.assert_close(logp, want_logp, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(entropy, want_entropy, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad, want_grad, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_tokens", [2, 5, 64])
def test_gradcheck(temperature, chunk_tokens):
    logits, targets = make(shape=(7,), vocab=6, seed=3)
    logits.requires_grad_(True)

    def both(x):
        return vocab_parallel_logprobs(x, targets, None, temperature, with_entropy=True, chunk_tokens=chunk_tokens)

    def logp_only(x):
        return vocab_parallel_logprobs(x, targets, None, temperature, with_entropy=False, chunk_tokens=chunk_tokens)[0]

    def entropy_only(x):
        return both(x)[1]

    for fn in (both, logp_only, entropy_only):
        assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("used", ["logp", "entropy"])
def test_gradient_with_one_output_unused(used):
    """with_entropy=True but only one output reaches the loss: the other's gradient is absent."""
    logits, targets = make(shape=(2, 6), vocab=9, seed=4)
    w1, w2 = weights(targets.shape, seed=5)
    if used == "logp":
        w2 = None
    else:
        w1 = None
    for temperature in (1.0, 0.7):
        def ours(x, t, temperature=temperature):
            return vocab_parallel_logprobs(x, t, None, temperature, with_entropy=True, chunk_tokens=5)

        def reference(x, t, temperature=temperature):
            return naive(x, t, temperature)

        _, _, grad = grads_of(ours, logits, targets, w1, w2)
        _, _, want = grads_of(reference, logits, targets, w1, w2)
        torch.testing.assert_close(grad, want, atol=1e-12, rtol=1e-12)


def test_without_entropy():
    logits, targets = make(shape=(4, 3), vocab=10, seed=6)
    w1, _ = weights(targets.shape)

    def ours(x, t):
        return vocab_parallel_logprobs(x, t, chunk_tokens=5)

    logp, entropy, grad = grads_of(ours, logits, targets, w1, None)
    assert entropy is None
    want_logp, _, want_grad = grads_of(naive, logits, targets, w1, None)
    torch.testing.assert_close(logp, want_logp, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad, want_grad, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_padded_vocabulary_columns(dtype, temperature):
    """Columns past the real vocabulary hold finfo.min: finite results, exactly zero gradient there."""
    real, padded = 10, 16
    logits, targets = make(shape=(3, 4), vocab=real, seed=7, dtype=dtype)
    full = torch.cat([logits, torch.full((3, 4, padded - real), torch.finfo(dtype).min, dtype=dtype)], dim=-1)
    w1, w2 = weights(targets.shape, seed=8)

    def ours(x, t):
        return vocab_parallel_logprobs(x, t, None, temperature, with_entropy=True, chunk_tokens=5)

    def reference(x, t):
        return naive(x, t, temperature)

    logp, entropy, grad = grads_of(ours, full, targets, w1, w2)
    want_logp, want_entropy, want_grad = grads_of(reference, logits, targets, w1, w2)
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all() and torch.isfinite(grad).all()
    assert bool((grad[..., real:] == 0).all())
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(logp.double(), want_logp, atol=tol, rtol=tol)
    torch.testing.assert_close(entropy.double(), want_entropy, atol=tol, rtol=tol)
    torch.testing.assert_close(grad[..., :real].double(), want_grad.to(dtype).double(), atol=tol, rtol=tol)


def test_bf16_logits_against_fp32_reference():
    logits, targets = make(shape=(4, 6), vocab=32, seed=9, dtype=torch.bfloat16)
    w1, w2 = weights(targets.shape, seed=10)

    def ours(x, t):
        return vocab_parallel_logprobs(x, t, None, 0.7, with_entropy=True, chunk_tokens=7)

    def reference(x, t):  # the same bf16 values, computed in fp32
        log_probs = torch.log_softmax(x.float() / 0.7, dim=-1)
        return log_probs.gather(-1, t.unsqueeze(-1)).squeeze(-1), -(log_probs.exp() * log_probs).sum(-1)

    logp, entropy, grad = grads_of(ours, logits, targets, w1, w2)
    want_logp, want_entropy, want_grad = grads_of(reference, logits, targets, w1, w2)
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(logp, want_logp, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(entropy, want_entropy, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad.float(), want_grad.float(), atol=2e-2, rtol=2e-2)


def test_large_logits_are_stable():
    """Logits far beyond exp's float32 range: the max shift keeps everything finite and exact."""
    logits, targets = make(shape=(2, 5), vocab=12, seed=11, dtype=torch.float32, scale=500.0)
    logits = logits + 1e4
    logp, entropy = vocab_parallel_logprobs(logits, targets, with_entropy=True, chunk_tokens=3)
    want_logp, want_entropy = naive(logits, targets)
    torch.testing.assert_close(logp.double(), want_logp, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), want_entropy, atol=1e-3, rtol=1e-5)


def test_flat_token_layout():
    """[N, V] logits with [N] targets work the same as [B, T, V]."""
    logits, targets = make(shape=(2, 5), vocab=8, seed=12)
    logp_3d, ent_3d = vocab_parallel_logprobs(logits, targets, with_entropy=True, chunk_tokens=3)
    logp_2d, ent_2d = vocab_parallel_logprobs(logits.reshape(10, 8), targets.reshape(10), with_entropy=True, chunk_tokens=3)
    assert torch.equal(logp_3d.reshape(10), logp_2d) and torch.equal(ent_3d.reshape(10), ent_2d)


def test_bad_arguments():
    logits, targets = make(shape=(2, 5), vocab=8)
    with pytest.raises(ValueError, match=r"logits \(2, 5, 8\) and targets \(2, 4\) disagree"):
        vocab_parallel_logprobs(logits, targets[:, :4])
    with pytest.raises(ValueError, match=r"logits \(2, 5, 8\) and targets \(10,\) disagree"):
        vocab_parallel_logprobs(logits, targets.reshape(10))
    with pytest.raises(ValueError, match="chunk_tokens=0 must be >= 1"):
        vocab_parallel_logprobs(logits, targets, chunk_tokens=0)
