"""Reductions over micro-batches and parallel groups, done once per step.

Every token-mean metric from compute_papo_loss is already divided by the *global* token count,
so the global value is a plain sum over micro-batches and data-parallel ranks. Keys ending in
`_max` / `_min` reduce with max / min. The metrics live on the last pipeline stage; the other
stages receive them so every rank returns the same dict.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from papo_mega.distributed.runtime import ParallelGroups


def count_response_tokens(response_masks: list[torch.Tensor], groups: ParallelGroups) -> int:
    """The step's response-token count over all micro-batches and data-parallel ranks."""
    local = torch.zeros((), dtype=torch.float64, device=groups.device)
    for mask in response_masks:
        local += mask.detach().double().sum().to(groups.device)
    dist.all_reduce(local, group=groups.dp)
    return int(local.item())


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
