"""Workers for the PAPO-loss layout tests: our pipeline at any layout vs a naive single process.

The naive reference shares only the model weights with the code under test: it stacks the two
views by hand, takes a full-vocabulary log_softmax and writes the PAPO objective out term by
term (papo.md), then calls backward on the loss of the whole batch aggregated as
loss.aggregation says: one token mean, or the mean of the token means of consecutive groups of
`micro_batch_size` sequences (the layout's micro-batches, rank-major over DP).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from papo_mega.algo.reduction import UpdateCounts
from papo_mega.config import LossConfig, load_config
from papo_mega.convert.parity import build_probe_inputs
from papo_mega.distributed import init_distributed
from papo_mega.distributed.sharding import gather_full_tensors
from papo_mega.models.qwen_vl import build_model_chunks
from papo_mega.optim import attach_grad_finalisation, wrap_ddp
from papo_mega.types import PolicyMicroBatch

GLOBAL_SEQUENCES = 8
MODEL_SEED = 11


def papo_batch(model_cfg, vision_cfg, uneven: bool = False) -> list[PolicyMicroBatch]:
    """8 one-sequence pieces (text + image), equal length, with responses, advantages, masked pixels.

    uneven: piece i's response loses its first i % 4 tokens, so consecutive pairs differ in token count."""
    gen = torch.Generator().manual_seed(2024)
    pieces = []
    for probe_seed in range(GLOBAL_SEQUENCES // 2):
        probe = build_probe_inputs(model_cfg, vision_cfg, seed=probe_seed)
        patches = probe.image_grid_thw.prod(dim=1).tolist()
        for row in range(2):
            start = sum(patches[:row])
            ids = probe.input_ids[row : row + 1]
            real = probe.attention_mask[row : row + 1].bool()
            targets = torch.roll(ids, -1, dims=1)
            # The "response": real tokens after the image (the text tail), as a rollout would be.
            after_image = torch.cumsum(ids == model_cfg.vision_end_token_id, dim=1) > 0
            response = (after_image & torch.roll(real, -1, dims=1)).float()
            response[:, -1] = 0
            if uneven:
                response[0, response[0].nonzero()[: len(pieces) % 4, 0]] = 0
            pixels = probe.pixel_values[start : start + patches[row]]
            keep = (torch.rand(pixels.shape[0], 1, generator=gen) > 0.6).float()
            pieces.append(PolicyMicroBatch(
                input_ids=ids, position_ids=probe.position_ids[:, row : row + 1].contiguous(),
                targets=targets, response_mask=response,
                advantages=torch.randn(1, generator=gen),
                pixel_values=pixels, masked_pixel_values=pixels * keep,
                image_grid_thw=probe.image_grid_thw[row : row + 1],
            ))
    return pieces


def _concat(pieces: list[PolicyMicroBatch]) -> PolicyMicroBatch:
    def cat(name, dim=0):
        values = [getattr(p, name) for p in pieces]
        return None if values[0] is None else torch.cat(values, dim=dim)

    return PolicyMicroBatch(
        input_ids=cat("input_ids"), position_ids=cat("position_ids", 1), targets=cat("targets"),
        response_mask=cat("response_mask"), advantages=cat("advantages"), pixel_values=cat("pixel_values"),
        masked_pixel_values=cat("masked_pixel_values"), image_grid_thw=cat("image_grid_thw"),
        old_logp=cat("old_logp"), masked_logp=cat("masked_logp"), ref_logp=cat("ref_logp"),
        masked_entropy=cat("masked_entropy"),
    )


def _perturbation(shape, seed: int, scale: float) -> torch.Tensor:
    """Deterministic noise that moves old/ref log-probs away from the current policy (clips engage)."""
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _loss_config(overrides: dict) -> LossConfig:
    base = dict(kl_coef=0.05, prcp_coef=0.1, entropy_coef=0.03, masked_entropy_coef=0.02, clip_low=0.2, clip_high=0.25)
    return LossConfig(**{**base, **overrides})


def layout_papo_grads(layout: dict, loss_overrides: dict, micro_batch_size: int, breakage: str | None = None,
                      uneven: bool = False):
    """Our path: DDP chunks at `layout`, old/masked log-probs from one no-grad forward, PAPO update.

    breakage="local_token_count" normalises by this rank's tokens only (no DP all-reduce), to show
    the test catches a wrong reduction. uneven: papo_batch's responses of unequal lengths.
    """
    from papo_mega.algo import policy
    from papo_mega.algo.policy import attach_old_logprobs, papo_forward_backward

    if breakage == "local_token_count":
        policy.count_update = lambda masks, groups: UpdateCounts(int(sum(m.sum().item() for m in masks)), len(masks))

    cfg = load_config(None, ["preset=tiny"])
    loss_cfg = _loss_config(loss_overrides)
    groups = init_distributed(layout, seed=1234)
    chunks = wrap_ddp(build_model_chunks(cfg.model, cfg.vision, groups, seed=MODEL_SEED), groups, use_distributed_optimizer=False)
    attach_grad_finalisation(chunks)
    pieces = papo_batch(cfg.model, cfg.vision, uneven)
    per_rank = GLOBAL_SEQUENCES // groups.layout.dp_size
    mine = pieces[groups.dp_rank * per_rank : (groups.dp_rank + 1) * per_rank]
    microbatches = [_concat(mine[i : i + micro_batch_size]).to(groups.device) for i in range(0, per_rank, micro_batch_size)]
    # Always compute the masked view here so old/masked/ref log-probs are the same tensors as the reference's.
    microbatches = attach_old_logprobs(chunks, groups, microbatches, loss_cfg, with_masked=True)
    start = groups.dp_rank * per_rank
    for index, mb in enumerate(microbatches):
        rows = slice(start + index * micro_batch_size, start + (index + 1) * micro_batch_size)
        shape = (GLOBAL_SEQUENCES, mb.input_ids.shape[1])
        mb.old_logp = mb.old_logp + _perturbation(shape, 1, 0.3)[rows]
        mb.ref_logp = mb.old_logp + _perturbation(shape, 2, 0.5)[rows]
        if loss_cfg.masked_grad:
            mb.masked_logp = None  # must come from the training forward
    metrics = papo_forward_backward(chunks, groups, microbatches, loss_cfg)
    grads = gather_full_tensors(chunks, groups, kind="grad")
    return {"metrics": metrics, "grads": grads} if dist.get_rank() == 0 else None


def _naive_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
    sampled = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return sampled, entropy


def _naive_k3(logp, logq):
    d = torch.clamp(logq - logp, -20, 20)
    return torch.clamp(torch.exp(d) - d - 1, -10, 10)


def _naive_objective(logp, old, adv, mask, cfg: LossConfig, masked_logp, ref_logp, entropy, masked_entropy):
    ratio = torch.exp(torch.clamp(logp - old, -20, 20))
    adv = adv[:, None].expand_as(logp)
    surrogate = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high))
    if cfg.clip_dual is not None:
        surrogate = torch.where(adv < 0, torch.min(surrogate, -adv * cfg.clip_dual), surrogate)
    if cfg.kl_estimator == "k1":
        kl_ref = logp - ref_logp
    elif cfg.kl_estimator == "k2":
        kl_ref = 0.5 * (logp - ref_logp) ** 2
    else:
        kl_ref = _naive_k3(logp, ref_logp)
    prcp = _naive_k3(logp, masked_logp)
    if cfg.prcp_clip is not None:
        prcp = torch.clamp(prcp, 0, cfg.prcp_clip)
    if cfg.entropy_estimator == "sampled":
        entropy, masked_entropy = -logp, -masked_logp
    per_token = (surrogate + cfg.kl_coef * kl_ref - cfg.prcp_coef * prcp
                 + cfg.entropy_coef * entropy + cfg.masked_entropy_coef * masked_entropy)
    return per_token, _naive_k3(logp, masked_logp)


def _naive_mean(values, mask, aggregation: str, micro_batch_size: int | None):
    """The batch's token mean, or the mean over micro-batches of consecutive rows of each one's token mean."""
    if aggregation == "global_token_mean":
        return (values * mask).sum() / mask.sum()
    rows = range(0, len(mask), micro_batch_size)
    return torch.stack([(values[r : r + micro_batch_size] * mask[r : r + micro_batch_size]).sum()
                        / mask[r : r + micro_batch_size].sum() for r in rows]).mean()


def naive_papo_grads(loss_overrides: dict, micro_batch_size: int | None = None, uneven: bool = False):
    """One process, no schedules, no DDP: the whole batch, full logits, the objective by hand.

    `micro_batch_size`: the layout's, for loss.aggregation=microbatch_token_mean; `uneven`: as
    papo_batch. Also returns the global token mean of the same per-token loss, to compare modes."""
    cfg = load_config(None, ["preset=tiny"])
    loss_cfg = _loss_config(loss_overrides)
    groups = init_distributed({}, seed=1234)
    chunk = build_model_chunks(cfg.model, cfg.vision, groups, seed=MODEL_SEED)[0]
    batch = _concat(papo_batch(cfg.model, cfg.vision, uneven))
    vocab, temp = cfg.model.vocab_size, loss_cfg.temperature

    def forward(pixels):
        return chunk(batch.input_ids, batch.position_ids, pixel_values=pixels, image_grid_thw=batch.image_grid_thw)[..., :vocab]

    with torch.no_grad():
        both = torch.cat([batch.pixel_values, batch.masked_pixel_values])
        stacked = chunk(batch.input_ids.repeat(2, 1), torch.cat([batch.position_ids] * 2, dim=1),
                        pixel_values=both, image_grid_thw=torch.cat([batch.image_grid_thw] * 2))[..., :vocab]
        old, _ = _naive_logprobs(stacked[: len(batch.input_ids)], batch.targets, temp)
        old_masked, old_masked_entropy = _naive_logprobs(stacked[len(batch.input_ids) :], batch.targets, temp)
    shape = batch.targets.shape
    old = old + _perturbation(shape, 1, 0.3)
    ref = old + _perturbation(shape, 2, 0.5)
    logp, entropy = _naive_logprobs(forward(batch.pixel_values), batch.targets, temp)
    if loss_cfg.masked_grad:
        masked_logp, masked_entropy = _naive_logprobs(forward(batch.masked_pixel_values), batch.targets, temp)
    else:
        masked_logp, masked_entropy = old_masked, old_masked_entropy
    per_token, kl_prcp = _naive_objective(logp, old, batch.advantages, batch.response_mask, loss_cfg,
                                          masked_logp, ref, entropy, masked_entropy)
    mask = batch.response_mask
    loss = _naive_mean(per_token, mask, loss_cfg.aggregation, micro_batch_size)
    global_loss = _naive_mean(per_token.detach(), mask, "global_token_mean", None)
    kl_prcp = _naive_mean(kl_prcp, mask, loss_cfg.aggregation, micro_batch_size)
    loss.backward()
    for param in chunk.parameters():
        param.main_grad = param.grad if param.grad is not None else torch.zeros_like(param)
    grads = gather_full_tensors([chunk], groups, kind="grad")
    tokens = [] if micro_batch_size is None else mask.view(-1, micro_batch_size, mask.shape[1]).sum((1, 2)).tolist()
    return {"loss": loss.item(), "kl_prcp": kl_prcp.item(), "grads": grads, "microbatch_tokens": tokens,
            "global_token_mean_loss": global_loss.item()}
