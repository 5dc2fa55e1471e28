"""The PAPO / GRPO / DAPO objective as pure functions of per-token log-probs (no process groups).

Per response token t (docs/algorithm.md, ../shared/design/papo.md):

    loss_t = dual_clip_ppo(ratio_t, A)                       ratio = exp(clamp(logp - old_logp, -20, 20))
           + kl_coef * KL_est(logp || ref_logp)              when a reference is given
           - prcp_coef * clamp(k3(logp || masked_logp), 0, prcp_clip)   when the masked view is given
           + entropy_coef * H_t + masked_entropy_coef * H^mask_t

and loss = sum_t loss_t * mask_t / num_tokens. Passing the global response-token count as
`num_tokens` makes the sum of the per-micro-batch losses over every micro-batch and data-parallel
rank equal the token mean of the whole global batch; every metric is normalised the same way, so
metrics add up the same way (keys ending in `_max` / `_min` reduce with max / min instead).

`loss.aggregation=microbatch_token_mean` (the reference code's) passes each micro-batch's own
token count times the update's micro-batch count instead (reduction.token_normaliser): the sums
then give the mean of the micro-batch token means, metrics included.

Nothing here detaches an input: whether the masked branch gets gradient is the caller's choice.
`loss_config_at` gives the coefficients in force at a training step (loss.prcp_schedule).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from papo_mega.config import LossConfig
from papo_mega.errors import PapoError

__all__ = ["LossConfig", "LossInputError", "compute_papo_loss", "kl_estimate", "loss_config_at", "policy_surrogate",
           "scheduled_prcp_coef"]

LOG_RATIO_CLAMP = 20.0
"""|logp - old_logp| is clamped before exp (verl / EasyR1): one wild token cannot overflow the ratio."""
K3_CLAMP = 10.0
"""The k3 estimate is clamped to [-10, 10] (reference code)."""


class LossInputError(PapoError):
    """A loss input with the wrong shape, dtype or non-finite values."""


def scheduled_prcp_coef(cfg: LossConfig, step: int, total_steps: int) -> float:
    """The KL_prcp weight at 0-based training step `step` of `total_steps` (loss.prcp_schedule).

    linear is the reference code's "annealing" controller: read once per training step (rollout
    batch, not per optimizer update), starting at prcp_coef at step 0 and moving by 1/span a step,
    span = max(1, int(total_steps * prcp_anneal_fraction)), held at prcp_end_coef from step span on.
    A pure function of the step, so a resumed run continues the schedule where it stopped.
    """
    if cfg.prcp_schedule == "constant":
        return cfg.prcp_coef
    span = max(1, int(total_steps * cfg.prcp_anneal_fraction))
    progress = min(step / span, 1.0)
    return cfg.prcp_coef + (cfg.prcp_end_coef - cfg.prcp_coef) * progress


def loss_config_at(cfg: LossConfig, step: int, total_steps: int) -> LossConfig:
    """The constant loss config in force at `step`: the scheduled prcp_coef, and both entropy
    coefficients scaled by scheduled / initial prcp_coef, as the reference scales them."""
    if cfg.prcp_schedule == "constant":
        return cfg
    coef = scheduled_prcp_coef(cfg, step, total_steps)
    scale = coef / cfg.prcp_coef  # prcp_coef > 0 under a linear schedule (LossConfig checks)
    return replace(cfg, prcp_schedule="constant", prcp_coef=coef, entropy_coef=cfg.entropy_coef * scale,
                   masked_entropy_coef=cfg.masked_entropy_coef * scale)


def kl_estimate(logp: torch.Tensor, logq: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(p || q) from the sampled token's log-probs under p (sampling) and q.

    k1 = logp - logq; k2 = (logp - logq)^2 / 2; k3 = exp(d) - d - 1 with d = clamp(logq - logp,
    -20, 20), then clamped to [-10, 10] (Schulman's low-variance, non-negative estimator).
    """
    if estimator == "k1":
        return logp - logq
    if estimator == "k2":
        return 0.5 * (logp - logq).square()
    if estimator == "k3":
        d = (logq - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return (torch.exp(d) - d - 1.0).clamp(-K3_CLAMP, K3_CLAMP)
    raise LossInputError(f"unknown KL estimator {estimator!r}; use k1 | k2 | k3")


def policy_surrogate(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, cfg: LossConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Dual-clip PPO loss per token [B, T] and boolean masks of where each clip is active."""
    ratio = torch.exp((logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    loss = torch.maximum(unclipped, clipped)
    negative = advantages < 0
    flags = {
        "clip_frac_high": (advantages > 0) & (ratio > 1.0 + cfg.clip_high),
        "clip_frac_low": negative & (ratio < 1.0 - cfg.clip_low),
    }
    if cfg.clip_dual is not None:
        bound = -advantages * cfg.clip_dual
        flags["clip_frac_dual"] = negative & (loss > bound)
        loss = torch.where(negative, torch.minimum(loss, bound), loss)
    else:
        flags["clip_frac_dual"] = torch.zeros_like(negative)
    return loss, {"ratio": ratio, **flags}


def _check_inputs(named: dict[str, torch.Tensor | None], response_mask: torch.Tensor, advantages: torch.Tensor):
    shape = tuple(response_mask.shape)
    if len(shape) != 2:
        raise LossInputError(f"response_mask has shape {shape}; expected [B, T]")
    for name, tensor in named.items():
        if tensor is None:
            continue
        if tuple(tensor.shape) != shape:
            raise LossInputError(f"{name} has shape {tuple(tensor.shape)} but response_mask has {shape}; pass [B, T] tensors")
        if not tensor.is_floating_point():
            raise LossInputError(f"{name} has dtype {tensor.dtype}; log-probs and entropies must be floating point")
    if advantages.dim() == 1:
        if advantages.shape[0] != shape[0]:
            raise LossInputError(f"advantages has {advantages.shape[0]} rows but the batch has {shape[0]}; pass [B] or [B, T]")
        advantages = advantages.unsqueeze(1).expand(shape)
    elif tuple(advantages.shape) != shape:
        raise LossInputError(f"advantages has shape {tuple(advantages.shape)}; expected [B]={shape[0]} or [B, T]={shape}")
    if not advantages.is_floating_point():
        raise LossInputError(f"advantages has dtype {advantages.dtype}; expected floating point")
    valid = response_mask.bool()
    for name, tensor in [*named.items(), ("advantages", advantages)]:
        # where(), not tensor[valid]: a boolean gather costs a quarter of the loss at [640, 2048].
        if tensor is not None and not bool(torch.isfinite(torch.where(valid, tensor.detach(), 0)).all()):
            raise LossInputError(f"{name} has NaN or inf on response tokens; check the rollout and forward that produced it")
    return advantages, valid


def compute_papo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    cfg: LossConfig,
    masked_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    num_tokens: int | float | torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    masked_entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-mean PAPO loss (0-dim, differentiable) and detached metrics.

    logp, old_logp, response_mask, masked_logp, ref_logp, entropy, masked_entropy: [B, T];
    advantages: [B] (per sequence) or [B, T]. `entropy` / `masked_entropy` are full-vocabulary
    entropies for `cfg.entropy_estimator == "full"`; with "sampled" the entropy penalty uses
    -logp (-masked_logp), the reference code's estimate. `num_tokens`: the normaliser (the global
    response-token count); defaults to this batch's mask sum. An all-empty mask gives a zero loss
    (still attached to the graph) and metric `empty_batches` = 1.
    """
    advantages, valid = _check_inputs(
        {"logp": logp, "old_logp": old_logp, "masked_logp": masked_logp, "ref_logp": ref_logp,
         "entropy": entropy, "masked_entropy": masked_entropy},
        response_mask, advantages,
    )
    # Zero the padding before any arithmetic: token_mean drops a NaN/inf there from the value, but
    # not from the gradient (k2's square backward gives 0 * inf = NaN on a padded position).
    def unpad(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))

    logp, old_logp, advantages, masked_logp, ref_logp, entropy, masked_entropy = map(
        unpad, (logp, old_logp, advantages, masked_logp, ref_logp, entropy, masked_entropy))
    if cfg.entropy_estimator == "full":
        if cfg.entropy_coef > 0 and entropy is None:
            raise LossInputError("loss.entropy_estimator=full needs `entropy` (full-vocabulary) tensors; compute them with the log-probs")
        if cfg.masked_entropy_coef > 0 and masked_logp is not None and masked_entropy is None:
            raise LossInputError("loss.entropy_estimator=full needs `masked_entropy` tensors for the masked view")
    else:
        entropy = -logp
        masked_entropy = -masked_logp if masked_logp is not None else None

    weights = valid.to(logp.dtype)
    local_count = weights.sum()
    if num_tokens is None:
        denominator = local_count.clamp(min=1.0)
    else:
        denominator = torch.as_tensor(num_tokens, dtype=logp.dtype, device=logp.device).clamp(min=1.0)

    def token_mean(values: torch.Tensor) -> torch.Tensor:
        # where(), not multiply: a masked-out token holding inf/NaN must not poison the sum.
        return torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum() / denominator

    per_token, clip = policy_surrogate(logp, old_logp, advantages, cfg)
    metrics: dict[str, torch.Tensor] = {"pg_loss": token_mean(per_token)}
    if ref_logp is not None:
        kl_ref = kl_estimate(logp, ref_logp, cfg.kl_estimator)
        per_token = per_token + cfg.kl_coef * kl_ref
        metrics["kl_ref"] = token_mean(kl_ref)
    if masked_logp is not None:
        kl_prcp = kl_estimate(logp, masked_logp, "k3")
        metrics["kl_prcp"] = token_mean(kl_prcp)
        if cfg.prcp_clip is not None:
            kl_prcp = kl_prcp.clamp(0.0, cfg.prcp_clip)
        per_token = per_token - cfg.prcp_coef * kl_prcp
        if masked_entropy is not None:  # None only with entropy_estimator=full and masked_entropy_coef=0
            metrics["masked_entropy"] = token_mean(masked_entropy)
            if cfg.masked_entropy_coef:
                per_token = per_token + cfg.masked_entropy_coef * masked_entropy
    if entropy is not None:
        metrics["entropy"] = token_mean(entropy)
        if cfg.entropy_coef:
            per_token = per_token + cfg.entropy_coef * entropy

    loss = token_mean(per_token)
    ratio = clip.pop("ratio").detach()
    for name, flag in clip.items():
        metrics[name] = token_mean(flag.to(logp.dtype))
    metrics["ratio_mean"] = token_mean(ratio)
    # approx KL(old || new) on sampled tokens: how far this update has moved the policy.
    metrics["approx_kl_old"] = token_mean(old_logp - logp)
    metrics["loss"] = loss
    metrics = {k: v.detach() for k, v in metrics.items()}
    big = torch.finfo(ratio.dtype).max
    metrics["ratio_max"] = torch.where(valid, ratio, torch.full_like(ratio, -big)).max()
    metrics["ratio_min"] = torch.where(valid, ratio, torch.full_like(ratio, big)).min()
    metrics["response_tokens"] = local_count.detach()
    metrics["empty_batches"] = (local_count == 0).to(logp.dtype)
    return loss, metrics
