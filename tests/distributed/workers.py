"""Worker functions for the multi-process tests (module-level so spawn can pickle them).

Every worker builds the same tiny GPT from the same seed at the layout it is given and returns,
on global rank 0, plain tensors for the parent test to compare with a single-process run.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from papo_mega.config import ModelConfig, TrainConfig
from papo_mega.distributed import init_distributed
from papo_mega.distributed.sharding import gather_full_tensors
from papo_mega.lm_step import forward_backward, make_lm_batch, split_microbatches, train_step
from papo_mega.models.forward import compute_full_logits
from papo_mega.models.qwen_vl import build_model_chunks
from papo_mega.optim import attach_grad_finalisation, build_optimizer, wrap_ddp
from papo_mega.types import ModelInputs

TINY_MODEL = dict(num_layers=4, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                  num_query_groups=2, vocab_size=64, max_seq_len=64)
TINY_TRAIN = dict(seq_len=16, micro_batch_size=2, global_batch_size=8, lr=1e-2, grad_clip=1.0, seed=7)


def _setup(layout: dict, model: dict, distopt: bool = False, breakage: str | None = None):
    groups = init_distributed(layout, seed=1234)
    if breakage:
        _break(breakage)
    model_cfg = ModelConfig(**{**TINY_MODEL, **model})
    chunks = wrap_ddp(build_model_chunks(model_cfg, None, groups), groups, use_distributed_optimizer=distopt)
    attach_grad_finalisation(chunks)
    return groups, model_cfg, chunks


def _break(what: str) -> None:
    """Deliberately remove one reduction, to show the equivalence tests catch it."""
    if what == "tp_allreduce":
        from megatron.core.tensor_parallel import layers

        layers.reduce_from_tensor_model_parallel_region = lambda x, group=None: x
    elif what == "dp_grad_sync":
        from megatron.core.distributed import DistributedDataParallel

        DistributedDataParallel.finish_grad_sync = lambda self, *a, **k: None
    else:
        raise ValueError(what)


def loss_and_grads(layout: dict, model: dict | None = None, train: dict | None = None, breakage: str | None = None):
    """Global token-mean loss and full gradients for one global batch."""
    groups, model_cfg, chunks = _setup(layout, model or {}, breakage=breakage)
    train_cfg = TrainConfig(**{**TINY_TRAIN, **(train or {})})
    batch = make_lm_batch(train_cfg.global_batch_size, train_cfg.seq_len, model_cfg.vocab_size, train_cfg.seed, 0)
    loss = forward_backward(chunks, split_microbatches(batch, groups, train_cfg.micro_batch_size), groups)
    grads = gather_full_tensors(chunks, groups, kind="grad")
    return {"loss": loss, "grads": grads, "layout": groups.layout.describe()} if dist.get_rank() == 0 else None


def train_weights(layout: dict, steps: int, distopt: bool, model: dict | None = None, train: dict | None = None,
                  breakage: str | None = None):
    """Losses of `steps` optimizer steps and the full weights after them; checks DP replicas agree."""
    groups, model_cfg, chunks = _setup(layout, model or {}, distopt=distopt, breakage=breakage)
    train_cfg = TrainConfig(**{**TINY_TRAIN, **(train or {})})
    optimizer = build_optimizer(chunks, train_cfg, use_distributed_optimizer=distopt)
    losses = []
    for step in range(steps):
        batch = make_lm_batch(train_cfg.global_batch_size, train_cfg.seq_len, model_cfg.vocab_size, train_cfg.seed, step)
        losses.append(train_step(chunks, optimizer, batch, groups, train_cfg.micro_batch_size)["loss"])
    weights = gather_full_tensors(chunks, groups, kind="param")
    # Replicas on other DP ranks must hold the very same weights (nanotron's sanity check).
    replica_max_diff = 0.0
    for chunk in chunks:
        for param in chunk.parameters():
            copies = [torch.empty_like(param) for _ in range(groups.layout.dp_size)]
            dist.all_gather(copies, param.detach().contiguous(), group=groups.dp)
            replica_max_diff = max(replica_max_diff, max((c - copies[0]).abs().max().item() for c in copies))
    if dist.get_rank() != 0:
        return None
    return {"losses": losses, "weights": weights, "replica_max_diff": replica_max_diff}


def _probe_logits(chunks, groups, vocab_size: int) -> torch.Tensor:
    tokens = make_lm_batch(2, 12, vocab_size, 99, 0)[:, :-1]
    positions = torch.arange(tokens.shape[1]).expand_as(tokens).contiguous()
    return compute_full_logits(chunks, groups, ModelInputs(tokens, positions), vocab_size)


def save_after_training(layout: dict, directory: str):
    """Train one step (so weights differ from any init), save, return logits on a probe batch."""
    from papo_mega.model_dir import save_model

    groups, model_cfg, chunks = _setup(layout, {})
    train_cfg = TrainConfig(**TINY_TRAIN)
    optimizer = build_optimizer(chunks, train_cfg, use_distributed_optimizer=False)
    batch = make_lm_batch(train_cfg.global_batch_size, train_cfg.seq_len, model_cfg.vocab_size, 3, 0)
    train_step(chunks, optimizer, batch, groups, train_cfg.micro_batch_size)
    save_model(chunks, directory)
    logits = _probe_logits(chunks, groups, model_cfg.vocab_size)  # collective: every rank runs it
    return logits if dist.get_rank() == 0 else None


def load_and_probe(layout: dict, directory: str):
    """Build the model with a different seed, load the checkpoint, return logits on the probe batch."""
    from papo_mega.model_dir import load_model

    groups = init_distributed(layout, seed=4321)
    model_cfg = ModelConfig(**TINY_MODEL)
    chunks = build_model_chunks(model_cfg, None, groups, seed=4321)
    load_model(chunks, directory)
    logits = _probe_logits(chunks, groups, model_cfg.vocab_size)  # collective: every rank runs it
    return logits if dist.get_rank() == 0 else None


def vlm_microbatches(model_cfg, vision_cfg, count: int, seed: int = 5) -> list:
    """`count` single-sequence micro-batches, each with text and one image of its own grid."""
    from papo_mega.convert.parity import build_probe_inputs
    from papo_mega.lm_step import MicroBatch

    out = []
    for i in range(count):
        probe = build_probe_inputs(model_cfg, vision_cfg, seed=seed + i)
        row = i % 2
        patches = probe.image_grid_thw.prod(dim=1).tolist()
        start = sum(patches[:row])
        ids = probe.input_ids[row : row + 1]
        mask = probe.attention_mask[row : row + 1].float()
        labels = torch.roll(ids, -1, dims=1)
        loss_mask = mask * torch.roll(mask, -1, dims=1) * (labels != model_cfg.image_token_id)
        loss_mask[:, -1] = 0
        out.append(MicroBatch(tokens=ids, labels=labels, loss_mask=loss_mask,
                              position_ids=probe.position_ids[:, row : row + 1].contiguous(),
                              pixel_values=probe.pixel_values[start : start + patches[row]],
                              image_grid_thw=probe.image_grid_thw[row : row + 1]))
    return out


def vlm_loss_and_grads(layout: dict):
    """The tiny Qwen2.5-VL preset: global token-mean loss and full gradients over 4 micro-batches."""
    from papo_mega.config import load_config
    from papo_mega.lm_step import forward_backward

    cfg = load_config(None, ["preset=tiny"])
    groups = init_distributed(layout, seed=1234)
    chunks = wrap_ddp(build_model_chunks(cfg.model, cfg.vision, groups, seed=11), groups, use_distributed_optimizer=False)
    attach_grad_finalisation(chunks)
    loss = forward_backward(chunks, [mb.to(groups.device) for mb in vlm_microbatches(cfg.model, cfg.vision, 4)], groups)
    grads = gather_full_tensors(chunks, groups, kind="grad")
    return {"loss": loss, "grads": grads} if dist.get_rank() == 0 else None


def optimizer_step_dtypes(precision: str, distopt: bool) -> list[str]:
    """dtypes of the tensors Adam steps, for a bf16-parameter model (what bf16 and fp8 build) with
    the optimizer built for `precision`: fp32 master copies are what keep small updates."""
    groups, model_cfg, chunks = _setup({}, {"precision": "bf16"}, distopt)
    optimizer = build_optimizer(chunks, TrainConfig(**TINY_TRAIN), distopt, precision)
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    dtypes = {str(p.dtype) for opt in inner for group in opt.optimizer.param_groups for p in group["params"]}
    return sorted(dtypes)
