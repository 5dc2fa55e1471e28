"""Data-parallel replicas must hold bit-identical weights; this checks they do (cheaply).

    check_replicas(chunks, groups)   # collective; PapoError naming the first differing parameter

Every DP rank fingerprints its parameters and the fingerprints are all-gathered over the
data-parallel group. A fingerprint is exact and independent of reduction order: each parameter's
bits are read as integers and summed twice (plainly, and weighted by position modulo a prime),
so a changed value, a swapped pair of values or a sign flip shows, while identical replicas
always agree - on any device, with any thread count. Cost: one pass over the weights in chunks
of 16M elements, and one all-gather of 2 int64 per parameter.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from papo_mega.errors import PapoError

_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}
_BLOCK = 1 << 24
_MODULUS = 251


def _named_parameters(chunks) -> list[tuple[str, torch.Tensor]]:
    out = []
    for index, chunk in enumerate(chunks):
        module = getattr(chunk, "module", chunk)
        out.extend((f"chunk{index}.{name}", param) for name, param in module.named_parameters())
    return out


def _fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """[plain sum, position-weighted sum] of the tensor's bits as int64 (wrapping, exact)."""
    flat = tensor.detach().contiguous().view(-1)
    bits = flat.view(_INT_VIEW[flat.element_size()])
    total = torch.zeros(2, dtype=torch.int64, device=flat.device)
    for start in range(0, bits.numel(), _BLOCK):
        block = bits[start : start + _BLOCK].to(torch.int64)
        weights = torch.arange(start, start + block.numel(), device=flat.device, dtype=torch.int64) % _MODULUS + 1
        total[0] += block.sum()
        total[1] += (block * weights).sum()
    return total


def replica_fingerprint(chunks) -> torch.Tensor:
    """[num_params, 2] int64: the fingerprint of every parameter of this rank's chunks, in order."""
    params = _named_parameters(chunks)
    if not params:
        return torch.zeros(0, 2, dtype=torch.int64)
    return torch.stack([_fingerprint(p) for _, p in params])


def check_replicas(chunks, groups) -> None:
    """Raise PapoError on every rank if any data-parallel replicas differ (collective over all ranks)."""
    params = _named_parameters(chunks)
    mine = replica_fingerprint(chunks).to(groups.device)
    dp_size = groups.layout.dp_size
    problem = None
    if dp_size > 1:
        copies = [torch.empty_like(mine) for _ in range(dp_size)]
        dist.all_gather(copies, mine, group=groups.dp)
        for other, copy in enumerate(copies):
            if torch.equal(copy, copies[0]):
                continue
            row = int((copy != copies[0]).any(dim=1).nonzero()[0])
            problem = (f"data-parallel replicas disagree: parameter {params[row][0]} differs between DP rank 0 and "
                       f"DP rank {other} (tp rank {groups.tp_rank}, pp rank {groups.pp_rank})")
            break
    # Every rank raises together (other model-parallel groups may have found nothing).
    reports: list = [None] * dist.get_world_size()
    dist.all_gather_object(reports, problem)
    found = next((r for r in reports if r), None)
    if found:
        raise PapoError(f"{found}; the weights have diverged (a missed gradient reduction or a nondeterministic "
                        f"update) - resume from the last checkpoint, and report it if it recurs")
