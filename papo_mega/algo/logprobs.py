"""Log-prob of the sampled token and full-vocabulary entropy from vocabulary-parallel logits.

Each tensor-parallel rank holds logits for its slice of the vocabulary, [..., V/tp]. Full logits
are never gathered: per token we all-reduce the max, then (sum of exp, target logit, sum of
p * z) over the TP group - two collectives per chunk of tokens.

Memory: the work runs over chunks of tokens (64 MiB of fp32 logits each by default) in two
reused buffers, and the backward recomputes each chunk's softmax from the saved logits in place,
so the extra memory beyond the logits and their gradient is two chunks, not a handful of
[tokens, V] tensors as in a naive log_softmax
(measured in tools/bench_algo.py, docs/algorithm.md).

Why not megatron-core's vocab_parallel_cross_entropy: it gives the log-prob but not the entropy,
works in place on a float copy of the whole logits and keeps the whole softmax for backward. We
use its VocabUtility for the shard's vocabulary range.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

CHUNK_BYTES = 64 * 2**20
"""Default chunk: as many tokens as fit 64 MiB of fp32 logits per buffer (about 110 tokens at
Qwen's 151936 vocabulary at TP1, 880 at TP8). Smaller chunks were not measurably slower."""
_NEG_LARGE = -1e30
"""Padded vocabulary columns hold the dtype's minimum; dividing by a temperature < 1 would make
them -inf and 0 * -inf = NaN in p * log p. Clamping to a large finite negative keeps p = 0 exact."""


def _vocab_range(local_vocab: int, group) -> tuple[int, int]:
    from megatron.core.tensor_parallel.utils import VocabUtility

    rank = dist.get_rank(group) if group is not None else 0
    world = dist.get_world_size(group) if group is not None else 1
    return VocabUtility.vocab_range_from_per_partition_vocab_size(local_vocab, rank, world)


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _scaled_into(buffer: torch.Tensor, chunk: torch.Tensor, temperature: float) -> torch.Tensor:
    """Copy a chunk of logits into a reused compute buffer, divide by T, clamp padding (in place)."""
    out = buffer[: chunk.shape[0]]
    out.copy_(chunk)
    if temperature != 1.0:
        out.div_(temperature)
    return out.clamp_(min=_NEG_LARGE)


def _chunk_stats(z: torch.Tensor, exp: torch.Tensor, local_target: torch.Tensor, in_shard: torch.Tensor, group,
                 with_entropy: bool):
    """(log-sum-exp, log p(target), entropy) of one chunk [n, V/tp] of scaled logits.

    z is overwritten with the shifted logits; exp is a scratch buffer of the same shape.
    """
    local_max = z.amax(dim=-1)  # amax: no indices (3x faster than max(dim) on CPU)
    global_max = _all_reduce(local_max, dist.ReduceOp.MAX, group)
    shifted = z.sub_(global_max.unsqueeze(-1))
    torch.exp(shifted, out=exp)
    target = torch.where(in_shard, shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1), 0.0)
    sums = [exp.sum(dim=-1), target]
    if with_entropy:
        # sum_v e^s * s as a batched dot product: no [n, V] product tensor.
        sums.append(torch.bmm(exp.unsqueeze(1), shifted.unsqueeze(2)).reshape(-1))
    reduced = _all_reduce(torch.stack(sums), dist.ReduceOp.SUM, group)
    log_sum = reduced[0].log()
    logp = reduced[1] - log_sum
    # H = log Z - E_p[z]: with shifted logits s = z - max, H = log(sum e^s) - sum(e^s * s) / sum(e^s).
    entropy = log_sum - reduced[2] / reduced[0] if with_entropy else None
    return log_sum + global_max, logp, entropy


def _chunk_rows(local_vocab: int, chunk_tokens: int | None) -> int:
    if chunk_tokens is not None:
        return chunk_tokens
    return max(1, CHUNK_BYTES // (4 * local_vocab))


class _VocabParallelLogProbs(torch.autograd.Function):
    """Two [chunk, V/tp] compute buffers, reused by every chunk in forward and in backward."""

    @staticmethod
    def forward(ctx, logits, targets, group, temperature, chunk_tokens, with_entropy):
        local_vocab = logits.shape[-1]
        start, end = _vocab_range(local_vocab, group)
        flat = logits.reshape(-1, local_vocab)
        flat_targets = targets.reshape(-1)
        in_shard = (flat_targets >= start) & (flat_targets < end)
        local_targets = torch.where(in_shard, flat_targets - start, 0)
        n = flat.shape[0]
        rows = min(_chunk_rows(local_vocab, chunk_tokens), max(n, 1))
        compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        lse = torch.empty(n, dtype=compute_dtype, device=logits.device)
        logp = torch.empty_like(lse)
        entropy = torch.empty_like(lse) if with_entropy else None
        z_buf = torch.empty(rows, local_vocab, dtype=compute_dtype, device=logits.device)
        exp_buf = torch.empty_like(z_buf)
        for lo in range(0, n, rows):
            hi = min(lo + rows, n)
            z = _scaled_into(z_buf, flat[lo:hi], temperature)
            lse[lo:hi], logp[lo:hi], ent = _chunk_stats(z, exp_buf[: hi - lo], local_targets[lo:hi], in_shard[lo:hi],
                                                        group, with_entropy)
            if with_entropy:
                entropy[lo:hi] = ent
        del z_buf, exp_buf
        ctx.save_for_backward(logits, local_targets, in_shard, lse, entropy if with_entropy else lse)
        ctx.temperature, ctx.rows, ctx.with_entropy = temperature, rows, with_entropy
        shape = targets.shape
        return logp.view(shape), (entropy.view(shape) if with_entropy else None)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, local_targets, in_shard, lse, entropy = ctx.saved_tensors
        t, rows = ctx.temperature, ctx.rows
        local_vocab = logits.shape[-1]
        flat = logits.reshape(-1, local_vocab)
        grad = torch.empty_like(flat)
        g_logp = grad_logp.reshape(-1).to(lse.dtype) if grad_logp is not None else torch.zeros_like(lse)
        g_ent = grad_entropy.reshape(-1).to(lse.dtype) if (ctx.with_entropy and grad_entropy is not None) else None
        buf = torch.empty(min(rows, max(flat.shape[0], 1)), local_vocab, dtype=lse.dtype, device=logits.device)
        p_buf = torch.empty_like(buf)
        for lo in range(0, flat.shape[0], rows):
            hi = min(lo + rows, flat.shape[0])
            # d logp_target / dz = onehot - p;  dH / dz = -p * (log p + H). All in place.
            log_p = _scaled_into(buf, flat[lo:hi], t).sub_(lse[lo:hi].unsqueeze(-1))
            dz = torch.exp(log_p, out=p_buf[: hi - lo])
            if g_ent is not None:
                coeff = log_p.add_(entropy[lo:hi].unsqueeze(-1)).mul_(g_ent[lo:hi].unsqueeze(-1))
                coeff.add_(g_logp[lo:hi].unsqueeze(-1))
                dz.mul_(coeff).neg_()
            else:
                dz.mul_(g_logp[lo:hi].unsqueeze(-1)).neg_()
            hit = torch.nonzero(in_shard[lo:hi]).squeeze(-1)
            dz[hit, local_targets[lo:hi][hit]] += g_logp[lo:hi][hit]
            if t != 1.0:
                dz.div_(t)
            grad[lo:hi].copy_(dz)
        return grad.view_as(logits), None, None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    tp_group=None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log p(target), entropy or None), float32 (float64 for float64 input) [...], from this rank's logits shard [..., V/tp].

    targets: global vocabulary ids [...]. The same values on every TP rank; gradients flow to
    this rank's logits shard only (the output layer's backward all-reduces across TP).
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree on [B, T]")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1")
    vocab = logits.shape[-1] * (dist.get_world_size(tp_group) if tp_group is not None else 1)
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        # Out-of-range ids would silently read another column; one host sync per call is cheap.
        raise ValueError(f"targets must be token ids in [0, {vocab}); got [{int(targets.min())}, {int(targets.max())}]")
    return _VocabParallelLogProbs.apply(logits, targets.long(), tp_group, float(temperature), chunk_tokens, with_entropy)
