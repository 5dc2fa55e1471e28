"""megatron-core DDP and the (distributed) optimizer for a list of model chunks.

Gradients are summed, not averaged, across data-parallel ranks (`calculate_per_token_loss`):
`finalize_model_grads` divides by the global token count, so any micro-batch / DP split gives
the gradient of one token-mean over the whole global batch.
"""

from __future__ import annotations

import torch

from papo_mega.config import TrainConfig
from papo_mega.distributed.runtime import ParallelGroups
from papo_mega.models.gpt import PARAM_DTYPES


def wrap_ddp(chunks: list[torch.nn.Module], groups: ParallelGroups, use_distributed_optimizer: bool):
    """Wrap each chunk in megatron-core's DDP (contiguous fp32 grad buffers in `param.main_grad`)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        # Off on every device (docs/scaling.md, "Known GPU items"): megatron's overlapped buckets
        # learn each parameter's grad count from the first batch and assert when a later batch
        # leaves a parameter without a grad (an update without images leaves the vision tower
        # gradient-free), and the overlap's gain has not been measured on our GPU steps yet.
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
        # Each param group carries min_lr; the scheduler's cosine reads it from there.
        min_lr=train.min_lr,
        # fp8 models keep bf16 parameters (TE casts GEMM inputs), so fp8 is bf16 here too: megatron
        # then steps fp32 master copies; with bf16=False and no distributed optimizer it would
        # step the bf16 parameters themselves and lose small updates.
        bf16=PARAM_DTYPES[precision] == torch.bfloat16,
        params_dtype=PARAM_DTYPES[precision],
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


def build_scheduler(optimizer, train: TrainConfig, total_updates: int):
    """megatron-core's `OptimizerParamScheduler` for `train`: linear warmup, then constant or cosine.

    The learning rate of optimizer update u (0-based, u = scheduler.num_steps when the update runs) is

        lr(u) = train.lr * u / W                                         for u <= W (W = warmup_steps > 0)
        lr(u) = train.lr                                                 after warmup, constant schedule
        lr(u) = min_lr + (lr - min_lr) * (1 + cos(pi * (u - W) / (T - W))) / 2   cosine, W < u <= T
        lr(u) = min_lr                                                   cosine, u > T (T = total_updates)

    so the first update of a warmup runs at lr 0 (megatron's convention) and lr reaches min_lr at
    update T. Call `scheduler.step(1)` right after every `optimizer.step()`. Weight decay is constant
    (train.weight_decay; biases and norms keep megatron's wd_mult 0). The curve is a function of the
    current config: on resume `load_state_dict` restores only the update count, so a run resumed
    with more train.steps stretches its cosine to the new end.
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from papo_mega.errors import ConfigError

    if total_updates < 1:
        raise ConfigError(f"the run has {total_updates} optimizer updates; train.steps must give at least one")
    warmup = train.warmup_steps
    decay_steps = total_updates
    if warmup >= total_updates:
        if train.lr_schedule == "cosine":
            raise ConfigError(
                f"train.warmup_steps={warmup} leaves no updates for the cosine decay ({total_updates} updates in "
                f"the run); make warmup_steps smaller than {total_updates} or use train.lr_schedule=constant"
            )
        decay_steps = warmup + 1  # constant: the decay length is never used, megatron only asserts on it
    if train.lr_schedule == "cosine" and train.min_lr > train.lr:
        raise ConfigError(f"train.min_lr={train.min_lr} exceeds train.lr={train.lr}; the cosine decays to min_lr")

    class _Scheduler(OptimizerParamScheduler):
        def load_state_dict(self, state_dict: dict) -> None:
            # megatron adds the saved count to the current one; restoring is idempotent here.
            self.num_steps = 0
            super().load_state_dict(state_dict)

    return _Scheduler(
        optimizer,
        init_lr=0.0,
        max_lr=train.lr,
        min_lr=train.min_lr if train.lr_schedule == "cosine" else train.lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=decay_steps,
        lr_decay_style=train.lr_schedule,
        start_wd=train.weight_decay,
        end_wd=train.weight_decay,
        wd_incr_steps=max(total_updates, 1),
        wd_incr_style="constant",
        # The current config defines the curve; a checkpoint restores only the update count.
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
