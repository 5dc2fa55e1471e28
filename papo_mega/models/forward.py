"""Forward-only passes through the pipeline schedule (evaluation, parity checks, rollout log-probs)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from papo_mega.distributed.runtime import ParallelGroups
from papo_mega.types import ModelInputs


def compute_full_logits(chunks, groups: ParallelGroups, inputs: ModelInputs, vocab_size: int) -> torch.Tensor:
    """Full-vocabulary logits [B, S, vocab_size] of one batch, returned on every rank.

    Runs the forward-only schedule (so it works at any TP/PP/VPP layout), gathers the last
    stage's vocabulary shards over TP and broadcasts from the last stage. For checks and small
    batches: training code never materialises full logits.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    inputs = inputs.to(groups.device)

    def forward_step(data_iterator, model):
        batch: ModelInputs = next(data_iterator)
        logits = model(batch.input_ids, batch.position_ids, pixel_values=batch.pixel_values,
                       image_grid_thw=batch.image_grid_thw)

        def collect(output):
            full = gather_from_tensor_model_parallel_region(output)[..., :vocab_size]
            return full.sum() * 0.0, {"logits": full.detach()}

        return logits, collect

    n = len(chunks)
    iterators = [iter([inputs]) for _ in range(n)]
    out = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if n > 1 else iterators[0],
        model=chunks if n > 1 else chunks[0],
        num_microbatches=1,
        seq_length=inputs.input_ids.shape[1],
        micro_batch_size=inputs.input_ids.shape[0],
        forward_only=True,
    )
    batch, seq = inputs.input_ids.shape
    # contiguous: the vocab slice is a view, and collectives send raw storage.
    logits = out[0]["logits"].float().contiguous() if out else torch.empty(batch, seq, vocab_size)
    last = dist.get_global_rank(groups.pp, groups.layout.pp_size - 1)
    dist.broadcast(logits, src=last, group=groups.pp)
    return logits.cpu()
