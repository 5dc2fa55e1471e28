"""megatron-core DDP and the (distributed) optimizer for a list of model chunks.

Gradients are summed, not averaged, across data-parallel ranks (`calculate_per_token_loss`):
`finalize_model_grads` divides by the global token count, so any micro-batch / DP split gives
the gradient of one token-mean over the whole global batch.
"""

from __future__ import annotations

import torch

from papo_mega.config import TrainConfig
from papo_mega.distributed.runtime import ParallelGroups


def wrap_ddp(chunks: list[torch.nn.Module], groups: ParallelGroups, use_distributed_optimizer: bool):
    """Wrap each chunk in megatron-core's DDP (contiguous fp32 grad buffers in `param.main_grad`)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        # Overlap needs CUDA streams; the benefit is on GPU clusters (turned on there later).
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=True,
    )
    wrapped = []
    for index, chunk in enumerate(chunks):
        wrapped.append(
            DistributedDataParallel(
                config=chunk.config,
                ddp_config=ddp_config,
                module=chunk,
                # Only the first chunk's buckets overlap with the pipeline bubble; keep megatron's rule.
                disable_bucketing=index > 0,
            )
        )
    return wrapped


def build_optimizer(chunks, train: TrainConfig, use_distributed_optimizer: bool, precision: str = "fp32"):
    """AdamW through megatron-core (TE or apex FusedAdam when present, torch AdamW otherwise)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam",
        lr=train.lr,
        weight_decay=train.weight_decay,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_eps=1e-8,
        clip_grad=train.grad_clip,
        bf16=precision == "bf16",
        params_dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    return get_megatron_optimizer(config, chunks, use_gloo_process_groups=False)


def attach_grad_finalisation(chunks) -> None:
    """Let the pipeline schedules reduce grads across DP/PP and scale by the global token count."""
    from megatron.core.distributed import finalize_model_grads

    for chunk in chunks:
        config = chunk.config
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
        config.grad_sync_func = None
        config.param_sync_func = None
