"""One language-model training step through megatron-core's pipeline schedules.

This is the foundation's end-to-end path (tiny decoder LM on synthetic sequences): the demo,
the layout-equivalence tests and the launch tests all run it. The PAPO loop (train.py) reuses
its pieces: micro-batch slicing per DP rank, the per-token loss contract, global reductions.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from papo_mega.distributed.runtime import ParallelGroups


def make_lm_batch(global_batch_size: int, seq_len: int, vocab_size: int, seed: int, step: int) -> torch.Tensor:
    """Synthetic, learnable sequences [global_batch_size, seq_len + 1]: arithmetic progressions mod V.

    Token t+1 = token t + stride, with a random start and stride per row, so the next token is
    predictable from the two before it: loss can fall from log(V) towards 0. Every rank builds the
    same global batch from (seed, step) and keeps its own slice.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    start = torch.randint(0, vocab_size, (global_batch_size, 1), generator=gen)
    stride = torch.randint(1, 8, (global_batch_size, 1), generator=gen)
    return (start + stride * torch.arange(seq_len + 1)) % vocab_size


@dataclass
class MicroBatch:
    tokens: torch.Tensor
    """[mbs, S] input ids."""
    labels: torch.Tensor
    """[mbs, S] next-token targets."""
    loss_mask: torch.Tensor
    """[mbs, S] 1.0 where the token counts in the loss."""
    position_ids: torch.Tensor
    """[mbs, S], or [3, mbs, S] for multimodal rope."""
    pixel_values: torch.Tensor | None = None
    """[P, C*T*p*p] patches of this micro-batch's images (read by the first pipeline stage)."""
    image_grid_thw: torch.Tensor | None = None
    """[N, 3] patch grid of each image."""

    def to(self, device) -> MicroBatch:
        return MicroBatch(**{k: (v.to(device) if v is not None else None) for k, v in self.__dict__.items()})


def split_microbatches(batch: torch.Tensor, groups: ParallelGroups, micro_batch_size: int) -> list[MicroBatch]:
    """This data-parallel rank's share of the global batch, cut into micro-batches on the host.

    The forward step moves each one to `groups.device` when the schedule reaches it, so only the
    micro-batches in flight occupy device memory (as the RL path does).
    """
    dp_size, dp_rank = groups.layout.dp_size, groups.dp_rank
    rows = batch.shape[0] // dp_size
    local = batch[dp_rank * rows : (dp_rank + 1) * rows].cpu()
    seq_len = batch.shape[1] - 1
    positions = torch.arange(seq_len).unsqueeze(0)
    out = []
    for i in range(0, rows, micro_batch_size):
        chunk = local[i : i + micro_batch_size]
        out.append(
            MicroBatch(
                tokens=chunk[:, :-1].contiguous(),
                labels=chunk[:, 1:].contiguous(),
                loss_mask=torch.ones(chunk.shape[0], seq_len),
                position_ids=positions.expand(chunk.shape[0], -1).contiguous(),
            )
        )
    return out


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Per-token loss contract of megatron's schedules: (sum, token count, values to report)."""
    per_token = output_tensor.float()
    loss_sum = (per_token * loss_mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm_loss": torch.stack([loss_sum.detach(), num_tokens.float()])}


def _forward_step(device: torch.device, data_iterator, model):
    # Moved here, not up front: one micro-batch at a time on the device (a no-op if already there).
    mb: MicroBatch = next(data_iterator).to(device)
    output = model(mb.tokens, mb.position_ids, attention_mask=None, labels=mb.labels,
                   pixel_values=mb.pixel_values, image_grid_thw=mb.image_grid_thw)
    return output, partial(_loss_func, mb.loss_mask)


def forward_backward(
    chunks, microbatches: list[MicroBatch], groups: ParallelGroups, forward_only: bool = False
) -> float:
    """Run the schedule over this rank's micro-batches (on the host or the device); return the
    global token-mean loss.

    Gradients (when not forward_only) are left in the DDP buffers, already reduced across DP
    and divided by the global token count. The returned loss is the same on every rank.
    """
    from papo_mega.models.forward import run_schedule

    first = microbatches[0].tokens
    reported = run_schedule(chunks, microbatches, partial(_forward_step, groups.device), seq_length=first.shape[1],
                            micro_batch_size=first.shape[0], forward_only=forward_only)
    # On groups.device: the losses the schedule returns live there, and NCCL reduces device tensors only.
    totals = torch.zeros(2, dtype=torch.float64, device=groups.device)
    for item in reported:  # non-empty on the last pipeline stage only
        totals += item["lm_loss"].to(torch.float64)
    dist.all_reduce(totals, group=groups.dp)
    # The last stage holds the loss; its pipeline peers receive it.
    last = dist.get_global_rank(groups.pp, groups.layout.pp_size - 1)
    dist.broadcast(totals, src=last, group=groups.pp)
    return (totals[0] / totals[1].clamp(min=1)).item()


def train_step(chunks, optimizer, batch: torch.Tensor, groups: ParallelGroups, micro_batch_size: int) -> dict:
    """Zero grads, forward/backward over the global batch, optimizer step. Returns metrics."""
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    loss = forward_backward(chunks, split_microbatches(batch, groups, micro_batch_size), groups)
    update_ok, grad_norm, _ = optimizer.step()
    return {"loss": loss, "grad_norm": float(grad_norm or 0.0), "update_ok": bool(update_ok)}
