"""Forward-only passes through the pipeline schedule (evaluation, parity checks, rollout log-probs)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from papo_mega.distributed.runtime import ParallelGroups
from papo_mega.types import ModelInputs


def run_schedule(chunks, items: list, forward_step, seq_length: int, micro_batch_size: int,
                 forward_only: bool = True, refresh_fp8_weights: bool = True) -> list:
    """megatron-core's pipeline schedule over `items` (one per micro-batch) on this rank's chunks.

    Every stage receives the same item list; the returned per-micro-batch reports exist on the
    last pipeline stage only (empty elsewhere). refresh_fp8_weights=False (forward-only) keeps
    Transformer Engine's cached fp8 weight copies from the previous call instead of casting the
    weights again at the first micro-batch: for decode steps between which no weight changes.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    n = len(chunks)
    iterators = [iter(items) for _ in range(n)]
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if n > 1 else iterators[0],
        model=chunks if n > 1 else chunks[0],
        num_microbatches=len(items),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        # None: megatron's default (set_is_first_microbatch at micro-batch 0, i.e. cast again).
        first_val_step=None if refresh_fp8_weights or not forward_only else False,
    )


def compute_full_logits(chunks, groups: ParallelGroups, inputs: ModelInputs, vocab_size: int) -> torch.Tensor:
    """Full-vocabulary logits [B, S, vocab_size] of one batch, returned on every rank.

    Runs the forward-only schedule (so it works at any TP/PP/VPP layout), gathers the last
    stage's vocabulary shards over TP and broadcasts from the last stage. For checks and small
    batches: training code never materialises full logits.
    """
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

    batch, seq = inputs.input_ids.shape
    out = run_schedule(chunks, [inputs], forward_step, seq_length=seq, micro_batch_size=batch)
    # contiguous: the vocab slice is a view, and collectives send raw storage. The other stages'
    # receive buffer is on groups.device too: NCCL broadcasts device tensors only.
    logits = (out[0]["logits"].float().contiguous() if out
              else torch.empty(batch, seq, vocab_size, device=groups.device))
    last = dist.get_global_rank(groups.pp, groups.layout.pp_size - 1)
    dist.broadcast(logits, src=last, group=groups.pp)
    return logits.cpu()
