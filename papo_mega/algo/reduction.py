"""Reductions over micro-batches and parallel groups, done once per step.

Every token-mean metric from compute_papo_loss is already divided by its micro-batch's share of
the update (`token_normaliser`), so the global value is a plain sum over micro-batches and
data-parallel ranks. Keys ending in `_max` / `_min` reduce with max / min. The metrics live on
the last pipeline stage; the other stages receive them so every rank returns the same dict.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from papo_mega.distributed.runtime import ParallelGroups
from papo_mega.errors import PapoError


class UpdateCounts(NamedTuple):
    """One update's totals over all micro-batches and data-parallel ranks."""

    tokens: int
    microbatches: int


def count_update(response_masks: list[torch.Tensor], groups: ParallelGroups) -> UpdateCounts:
    """The update's response-token and micro-batch counts over all data-parallel ranks (one all-reduce)."""
    local = torch.zeros(2, dtype=torch.float64, device=groups.device)
    for mask in response_masks:
        local[0] += mask.detach().double().sum().to(groups.device)
    local[1] = len(response_masks)
    dist.all_reduce(local, group=groups.dp)
    return UpdateCounts(int(local[0].item()), int(local[1].item()))


def token_normaliser(aggregation: str, local_tokens: torch.Tensor, counts: UpdateCounts) -> float | torch.Tensor:
    """What one micro-batch divides its token sums by, so that the sums over all micro-batches
    and ranks give the update's loss (and metrics) under `loss.aggregation`.

    global_token_mean: the update's token count N - every token weighs 1/N.
    microbatch_token_mean: this micro-batch's own count n_m times the update's micro-batch count M
    - the mean over micro-batches of each one's token mean (verl / the PAPO reference). An empty
    micro-batch still counts in M, as the reference's gradient-accumulation divisor counts it.
    """
    if aggregation == "global_token_mean":
        return float(counts.tokens)
    if aggregation == "microbatch_token_mean":
        # A tensor, not .item(): no host sync per micro-batch on the device.
        return local_tokens.clamp(min=1.0) * counts.microbatches
    raise PapoError(f"loss.aggregation={aggregation!r} is not one of global_token_mean | microbatch_token_mean")


def _kind(name: str) -> str:
    return "max" if name.endswith("_max") else "min" if name.endswith("_min") else "sum"


def reduce_metrics(per_microbatch: list[dict[str, torch.Tensor]], groups: ParallelGroups) -> dict[str, float]:
    """Combine the last stage's per-micro-batch metrics over DP; return them on every rank."""
    reduced: dict[str, float] = {}
    if per_microbatch:
        names = sorted(per_microbatch[0])
        ops = {"sum": (dist.ReduceOp.SUM, torch.sum), "max": (dist.ReduceOp.MAX, torch.amax),
               "min": (dist.ReduceOp.MIN, torch.amin)}
        for kind, (op, combine) in ops.items():
            keys = [n for n in names if _kind(n) == kind]
            if not keys:
                continue
            table = torch.stack([torch.stack([m[k].detach().double().to(groups.device) for k in keys]) for m in per_microbatch])
            values = combine(table, dim=0)
            dist.all_reduce(values, op=op, group=groups.dp)
            reduced.update(zip(keys, values.tolist()))
    box = [reduced]
    last = dist.get_global_rank(groups.pp, groups.layout.pp_size - 1)
    dist.broadcast_object_list(box, src=last, group=groups.pp)
    return box[0]
