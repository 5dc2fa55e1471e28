"""vocab_parallel_logprobs at TP2 (gloo, two processes) equals TP1 and a naive log_softmax.

Each TP rank holds one half of the vocabulary; targets fall in both halves. Values, entropies and
the gradient of sum(logp * w1 + entropy * w2) w.r.t. the whole logits (the shards' gradients
gathered) must match one process holding the whole vocabulary.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import run_distributed
from tests.distributed.logprob_workers import shard_logprobs

VOCAB, REAL_VOCAB = 16, 13  # the padded case: columns 13..15 (in the second shard) hold finfo.min
SHAPE = (3, 5)
TOLS = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2}


def _case(seed, dtype, temperature, chunk_tokens, with_entropy=True, padded=False):
    gen = torch.Generator().manual_seed(seed)
    real = REAL_VOCAB if padded else VOCAB
    logits = 3.0 * torch.randn(*SHAPE, VOCAB, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, real, SHAPE, generator=gen)
    # At least a few targets in each shard, whatever the draw.
    targets[0, :2] = torch.tensor([0, VOCAB // 2 - 1])
    targets[1, :2] = torch.tensor([VOCAB // 2, real - 1])
    logits = logits.to(dtype)
    if padded:
        logits[..., REAL_VOCAB:] = torch.finfo(dtype).min
    return {
        "logits": logits, "targets": targets, "temperature": temperature, "chunk_tokens": chunk_tokens,
        "with_entropy": with_entropy, "real_vocab": real,
        "w_logp": torch.randn(SHAPE, generator=gen, dtype=torch.float64),
        "w_entropy": torch.randn(SHAPE, generator=gen, dtype=torch.float64),
    }


CASES = {
    "fp64_t1_chunk3": _case(1, torch.float64, 1.0, 3),
    "fp64_t0.7_chunk4": _case(2, torch.float64, 0.7, 4),  # 15 tokens: the last chunk is short
    "fp64_padded_t0.5_chunk7": _case(3, torch.float64, 0.5, 7, padded=True),
    "fp32_logp_only_chunk6": _case(4, torch.float32, 1.0, 6, with_entropy=False),
    "fp32_padded_t0.7_chunk1": _case(5, torch.float32, 0.7, 1, padded=True),
    "bf16_t0.7_chunk16": _case(6, torch.bfloat16, 0.7, 16),
}
NAMES = list(CASES)


def _naive(case):
    """Whole-vocabulary log_softmax in float64 (padded columns dropped) and its gradient."""
    real = case["real_vocab"]
    logits = case["logits"].double().detach().clone().requires_grad_(True)
    log_probs = torch.log_softmax(logits[..., :real] / case["temperature"], dim=-1)
    logp = log_probs.gather(-1, case["targets"].unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    total = (logp * case["w_logp"]).sum()
    if case["with_entropy"]:
        total = total + (entropy * case["w_entropy"]).sum()
    total.backward()
    return {"logp": logp.detach(), "entropy": entropy.detach() if case["with_entropy"] else None, "grad": logits.grad}


def _run(tp_size):
    cases = [CASES[name] for name in NAMES]
    return dict(zip(NAMES, run_distributed(shard_logprobs, tp_size, args=(tp_size, cases), timeout_s=120)[0]))


@pytest.fixture(scope="module")
def tp1():
    return _run(1)


@pytest.fixture(scope="module")
def tp2():
    return _run(2)


def _close(got, want, tol, what):
    diff = (got.double() - want.double()).abs().max().item()
    assert diff <= tol, f"{what}: max |diff| {diff:.3g} > {tol:.1g}"


def test_targets_fall_in_both_shards():
    for name, case in CASES.items():
        targets = case["targets"]
        assert (targets < VOCAB // 2).any() and (targets >= VOCAB // 2).any(), name


def _check_against_naive(out, name, what):
    case = CASES[name]
    tol = TOLS[case["logits"].dtype]
    ref = _naive(case)
    _close(out["logp"], ref["logp"], tol, f"{name} {what} logp vs naive")
    if case["with_entropy"]:
        _close(out["entropy"], ref["entropy"], tol, f"{name} {what} entropy vs naive")
    else:
        assert out["entropy"] is None
    assert out["grad"].shape == case["logits"].shape and out["grad"].dtype == case["logits"].dtype
    assert torch.isfinite(out["grad"]).all()
    real = case["real_vocab"]
    assert bool((out["grad"][..., real:] == 0).all()), f"{name} {what}: gradient on padded columns"
    _close(out["grad"], ref["grad"], tol, f"{name} {what} grad vs naive")


@pytest.mark.parametrize("name", NAMES)
def test_tp1_matches_naive(tp1, name):
    _check_against_naive(tp1[name], name, "tp1")


@pytest.mark.parametrize("name", NAMES)
def test_tp2_matches_naive(tp2, name):
    _check_against_naive(tp2[name], name, "tp2")


@pytest.mark.parametrize("name", NAMES)
def test_tp2_matches_tp1(tp1, tp2, name):
    case = CASES[name]
    tol = TOLS[case["logits"].dtype]
    _close(tp2[name]["logp"], tp1[name]["logp"], tol, f"{name} tp2 vs tp1 logp")
    if case["with_entropy"]:
        _close(tp2[name]["entropy"], tp1[name]["entropy"], tol, f"{name} tp2 vs tp1 entropy")
    _close(tp2[name]["grad"], tp1[name]["grad"], tol, f"{name} tp2 vs tp1 grad")


def test_a_shard_alone_is_caught(tp1, tp2):
    """Without the TP reduction rank 0's half of the vocabulary gives other log-probs: the test can fail."""
    for name in NAMES:
        ref = tp1[name]["logp"]
        assert torch.equal(tp1[name]["unreduced"], ref), name  # TP1: no reduction to skip
        assert (tp2[name]["unreduced"].double() - ref.double()).abs().max().item() > 0.1, name
