"""Workers for the vocabulary-parallel log-prob tests (module-level so spawn can pickle them).

Every rank gets the same full logits [B, T, V] and takes its TP shard of the vocabulary, columns
[tp_rank * V/tp, (tp_rank + 1) * V/tp), as the output layer of a TP model would hold them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from papo_mega.algo.logprobs import vocab_parallel_logprobs
from papo_mega.distributed import init_distributed


def shard_logprobs(tp_size: int, cases: list[dict]) -> list[dict] | None:
    """For each case: log-probs, entropy and the full-vocabulary gradient of
    sum(logp * w_logp + entropy * w_entropy), the shards' gradients gathered over the TP group.

    Also returns `unreduced`: the log-probs each rank would get from its shard alone (no TP
    group), which must differ from the reference - it shows the comparison can fail.
    """
    groups = init_distributed({"tp_size": tp_size}, seed=4321)
    assert dist.get_world_size(groups.tp) == tp_size
    rank = groups.tp_rank
    out = []
    for case in cases:
        logits = case["logits"]
        vocab = logits.shape[-1]
        assert vocab % tp_size == 0
        shard = vocab // tp_size
        local = logits[..., rank * shard : (rank + 1) * shard].clone().requires_grad_(True)
        logp, entropy = vocab_parallel_logprobs(local, case["targets"], groups.tp, case["temperature"],
                                                with_entropy=case["with_entropy"], chunk_tokens=case["chunk_tokens"])
        total = (logp.double() * case["w_logp"]).sum()
        if entropy is not None:
            total = total + (entropy.double() * case["w_entropy"]).sum()
        total.backward()
        pieces = [torch.empty_like(local.grad) for _ in range(tp_size)]
        dist.all_gather(pieces, local.grad.contiguous(), group=groups.tp)
        with torch.no_grad():
            # Out-of-shard ids are rejected without a TP group; clamp them into this shard.
            unreduced, _ = vocab_parallel_logprobs(local, case["targets"].clamp(max=shard - 1), None, case["temperature"],
                                                   chunk_tokens=case["chunk_tokens"])
        out.append({
            "logp": logp.detach(),
            "entropy": entropy.detach() if entropy is not None else None,
            "grad": torch.cat(pieces, dim=-1),
            "unreduced": unreduced,
        })
    return out if dist.get_rank() == 0 else None
