"""The policy's forward passes through megatron-core's pipeline schedules, at any TP/PP/DP layout.

- `compute_logprobs`: one no-grad forward over [original; masked] rows per micro-batch -> old
  and masked log-probs (and entropies) together; also the reference model's log-probs.
- `papo_forward_backward`: the training forward/backward with the PAPO loss on the last stage;
  with masked_grad the masked rows ride along in the same forward and get gradient.

Token-mean normalisation: the update's response-token count N and micro-batch count M are
computed once (all micro-batches, all DP ranks); each micro-batch's loss is its token sum over
reduction.token_normaliser - N (loss.aggregation=global_token_mean: one token mean over the whole
update) or its own count times M (microbatch_token_mean: the mean of micro-batch token means).
megatron's per-token contract (calculate_per_token_loss) then divides the gradients by the token
counts we report, summed over micro-batches and DP - N - so we hand it loss * N in either mode.
The result is the gradient of the update's loss as one process would compute it.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
from megatron.core.utils import get_attr_wrapped_model

from papo_mega.algo.logprobs import vocab_parallel_logprobs
from papo_mega.algo.losses import compute_papo_loss
from papo_mega.algo.reduction import count_update, reduce_metrics, token_normaliser
from papo_mega.algo.views import MASKED, ORIGINAL, split_views, stack_views
from papo_mega.config import LossConfig
from papo_mega.distributed.runtime import ParallelGroups
from papo_mega.errors import PapoError
from papo_mega.models.forward import run_schedule
from papo_mega.types import LOSS_FIELDS, MODEL_FIELDS, PIXEL_FIELDS, PolicyMicroBatch, to_host


def _check_uniform(microbatches: list[PolicyMicroBatch], groups: ParallelGroups) -> None:
    if not microbatches:
        raise PapoError("no micro-batches on this rank; the global batch must give every data-parallel rank one")
    shapes = {tuple(mb.input_ids.shape) for mb in microbatches}
    if groups.layout.pp_size > 1 and len(shapes) > 1:
        raise PapoError(f"pipeline parallelism sends fixed-shape activations but micro-batches have shapes "
                        f"{sorted(shapes)}; pad every micro-batch to the same [B, S]")


def _run_schedule(chunks, microbatches, forward_step, forward_only: bool, rows_per_sequence: int):
    batch, seq = microbatches[0].input_ids.shape
    return run_schedule(chunks, microbatches, forward_step, seq_length=seq,
                        micro_batch_size=batch * rows_per_sequence, forward_only=forward_only)


def _model_output(model, mb: PolicyMicroBatch, views: tuple[str, ...], device):
    inputs = stack_views(_model_side(mb, model, device), views)
    return model(inputs.input_ids, inputs.position_ids, pixel_values=inputs.pixel_values,
                 image_grid_thw=inputs.image_grid_thw, image_index=inputs.image_index)


def _model_side(mb: PolicyMicroBatch, model, device) -> PolicyMicroBatch:
    """What this model chunk reads, moved to the device now that the schedule has reached it.

    Micro-batches wait on the host (pinned on CUDA, so the copy overlaps): device memory holds
    the micro-batch in flight, not the step's. Pixels go only to the chunk that runs the vision
    tower (megatron's pre_process: virtual chunk 0 of pipeline stage 0); the loss-side fields
    move in the loss function, which runs on the last stage only.
    """
    if get_attr_wrapped_model(model, "pre_process"):
        return mb.to(device, MODEL_FIELDS + PIXEL_FIELDS, non_blocking=True)
    return replace(mb.to(device, MODEL_FIELDS, non_blocking=True), **dict.fromkeys(PIXEL_FIELDS))


def compute_logprobs(chunks, groups: ParallelGroups, microbatches: list[PolicyMicroBatch], temperature: float,
                     views: tuple[str, ...] = (ORIGINAL, MASKED), with_entropy: bool = False) -> list[dict]:
    """No-grad per-token log-probs of each view, per micro-batch, on every rank.

    Returns [{view: logp [B, S], f"{view}_entropy": entropy [B, S] (with_entropy)}] in
    micro-batch order. All views of a micro-batch go through the model in one forward.
    """
    _check_uniform(microbatches, groups)

    def forward_step(data_iterator, model):
        mb: PolicyMicroBatch = next(data_iterator)
        logits = _model_output(model, mb, views, groups.device)

        def collect(output):
            targets = mb.to(groups.device, ("targets",), non_blocking=True).targets.repeat(len(views), 1)
            logp, entropy = vocab_parallel_logprobs(output, targets, groups.tp, temperature, with_entropy)
            result = split_views(logp, views)
            if with_entropy:
                result.update({f"{v}_entropy": e for v, e in split_views(entropy, views).items()})
            return output.new_zeros(()), {k: v.detach() for k, v in result.items()}

        return logits, collect

    with torch.no_grad():
        stored = _run_schedule(chunks, microbatches, forward_step, forward_only=True, rows_per_sequence=len(views))
    # The last stage holds the results; the other stages receive them (a few floats per token).
    keys = list(views) + ([f"{v}_entropy" for v in views] if with_entropy else [])
    last = dist.get_global_rank(groups.pp, groups.layout.pp_size - 1)
    out = []
    for index, mb in enumerate(microbatches):
        packed = (torch.stack([stored[index][k].float() for k in keys]) if stored
                  else torch.empty(len(keys), *mb.input_ids.shape, device=groups.device))
        packed = packed.contiguous()
        dist.broadcast(packed, src=last, group=groups.pp)
        # Kept on the host with the micro-batch they belong to: device memory holds the
        # micro-batches in flight only, not the step's log-probs.
        out.append(dict(zip(keys, to_host(packed, groups.device).unbind(0))))
    return out


def attach_old_logprobs(chunks, groups: ParallelGroups, microbatches: list[PolicyMicroBatch], cfg: LossConfig,
                        with_masked: bool | None = None) -> list[PolicyMicroBatch]:
    """Fill old_logp (and masked_logp / masked_entropy when the update needs them) from one forward."""
    if with_masked is None:
        with_masked = cfg.needs_masked_view and not cfg.masked_grad
    views = (ORIGINAL, MASKED) if with_masked else (ORIGINAL,)
    full = cfg.entropy_estimator == "full" and with_masked
    results = compute_logprobs(chunks, groups, microbatches, cfg.temperature, views, with_entropy=full)
    filled = []
    for mb, res in zip(microbatches, results):
        extra = {"masked_logp": res[MASKED]} if with_masked else {}
        if full:
            extra["masked_entropy"] = res[f"{MASKED}_entropy"]
        filled.append(replace(mb, old_logp=res[ORIGINAL], **extra))
    return filled


def papo_forward_backward(chunks, groups: ParallelGroups, microbatches: list[PolicyMicroBatch], cfg: LossConfig,
                          forward_only: bool = False) -> dict[str, float]:
    """Forward (and backward) of the PAPO loss over this rank's micro-batches; global metrics.

    Gradients are left in the DDP buffers: reduced over DP and equal to the gradient of the
    update's loss under cfg.aggregation. `cfg` holds the coefficients in force (a scheduled
    prcp_coef: losses.loss_config_at); metric `loss/prcp_coef` reports it. With cfg.masked_grad
    the masked view is part of this forward; otherwise micro-batches must carry masked_logp from
    `attach_old_logprobs` (when PAPO terms have weight).
    """
    _check_uniform(microbatches, groups)
    if any(mb.old_logp is None for mb in microbatches):
        raise PapoError("micro-batches have no old_logp; run attach_old_logprobs before the update")
    masked_in_forward = cfg.masked_grad and cfg.needs_masked_view
    views = (ORIGINAL, MASKED) if masked_in_forward else (ORIGINAL,)
    full_entropy = cfg.entropy_estimator == "full"
    counts = count_update([mb.response_mask for mb in microbatches], groups)

    def forward_step(data_iterator, model):
        host_mb: PolicyMicroBatch = next(data_iterator)
        logits = _model_output(model, host_mb, views, groups.device)

        def loss_func(output):  # the last stage only
            mb = host_mb.to(groups.device, LOSS_FIELDS, non_blocking=True)
            targets = mb.targets.repeat(len(views), 1)
            logp, entropy = vocab_parallel_logprobs(output, targets, groups.tp, cfg.temperature, full_entropy)
            logp_views = split_views(logp, views)
            entropy_views = split_views(entropy, views) if full_entropy else {}
            masked_logp = logp_views.get(MASKED, mb.masked_logp)
            local_tokens = mb.response_mask.detach().sum()
            loss, metrics = compute_papo_loss(
                logp_views[ORIGINAL], mb.old_logp, mb.advantages, mb.response_mask, cfg,
                masked_logp=masked_logp, ref_logp=mb.ref_logp,
                num_tokens=token_normaliser(cfg.aggregation, local_tokens, counts),
                entropy=entropy_views.get(ORIGINAL),
                masked_entropy=entropy_views.get(MASKED, mb.masked_entropy),
            )
            return loss * counts.tokens, local_tokens.to(torch.int), metrics

        return logits, loss_func

    reports = _run_schedule(chunks, microbatches, forward_step, forward_only, rows_per_sequence=len(views))
    metrics = reduce_metrics(list(reports), groups)
    metrics["num_tokens"] = float(counts.tokens)
    metrics["loss/prcp_coef"] = cfg.prcp_coef
    return metrics
