"""Worker functions for the training-checkpoint tests (module-level so spawn can pickle them).

`train_run` trains the tiny GPT of workers.py the way the trainer does: megatron DDP, the
DistributedOptimizer, warmup + cosine LR, a real ShardStream per DP rank deciding each rank's rows,
and random draws from python / numpy / torch every step (so an RNG state that is not restored
changes the losses). It resumes with checkpoint.resume=auto and saves every `save_every` steps.
"""

from __future__ import annotations

import errno
import os
import random
import signal

import numpy as np
import torch
import torch.distributed as dist

from papo_mega.config import CheckpointConfig, Config, ModelConfig, ParallelConfig, RunConfig, TrainConfig
from papo_mega.data.shards import ShardStream
from papo_mega.distributed import init_distributed
from papo_mega.distributed.sharding import gather_full_tensors
from papo_mega.errors import PapoError
from papo_mega.lm_step import make_lm_batch, train_step
from papo_mega.models.qwen_vl import build_model_chunks
from papo_mega.optim import attach_grad_finalisation, build_optimizer, build_scheduler, wrap_ddp
from tests.distributed.workers import TINY_MODEL, TINY_TRAIN, _probe_logits

CKPT_TRAIN = dict(TINY_TRAIN, steps=6, warmup_steps=2, lr_schedule="cosine", min_lr=1e-4, weight_decay=0.01)


def make_config(run_dir: str, layout: dict, resume: str = "auto", keep_last: int = 2, save_every: int = 2,
                model: dict | None = None, distopt: bool = True, steps: int = 6) -> Config:
    return Config(
        model=ModelConfig(**{**TINY_MODEL, **(model or {})}),
        parallel=ParallelConfig(**layout, use_distributed_optimizer=distopt),
        train=TrainConfig(**{**CKPT_TRAIN, "steps": steps}),
        checkpoint=CheckpointConfig(save_every=save_every, keep_last=keep_last, resume=resume),
        run=RunConfig(run_dir=run_dir),
    )


def build(cfg: Config, seed: int = 1234):
    """groups, chunks (DDP-wrapped), optimizer, scheduler for cfg."""
    groups = init_distributed(cfg.parallel.layout_sizes(), seed=seed)
    distopt = cfg.parallel.use_distributed_optimizer
    chunks = wrap_ddp(build_model_chunks(cfg.model, None, groups, seed=seed), groups, use_distributed_optimizer=distopt)
    attach_grad_finalisation(chunks)
    optimizer = build_optimizer(chunks, cfg.train, use_distributed_optimizer=distopt)
    scheduler = build_scheduler(optimizer, cfg.train, cfg.train.steps)
    return groups, chunks, optimizer, scheduler


def _rows(samples, stream_iter, cfg: Config, groups) -> torch.Tensor:
    """The global batch as this rank sees it: its own rows from its stream, zeros elsewhere."""
    dp, rank = groups.layout.dp_size, groups.dp_rank
    per_rank = cfg.train.global_batch_size // dp
    # RNG draws of every kind a trainer makes (sampling, shuffles): same on the ranks of one DP rank.
    jitter = random.randint(0, 5) + int(np.random.randint(0, 5)) + int(torch.randint(0, 5, (1,)))
    batch = torch.zeros(cfg.train.global_batch_size, cfg.train.seq_len + 1, dtype=torch.long)
    for row in range(per_rank):
        sample = next(stream_iter)
        samples.append(sample["index"])
        batch[rank * per_rank + row] = make_lm_batch(1, cfg.train.seq_len, cfg.model.vocab_size,
                                                     seed=sample["index"], step=jitter)[0]
    return batch


def _seed_everything(groups) -> None:
    seed = 4242 + groups.dp_rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_run(cfg: Config, shard_dir: str, kill: dict | None = None, fault: dict | None = None,
              stop_after: int | None = None):
    """Train cfg.train.steps steps (resuming per cfg.checkpoint.resume), saving every save_every.

    kill: {'step': s, 'rank': r} SIGKILLs rank r at the start of step s (0-based).
    fault: {'phase': p, 'step': s, 'rank': r} SIGKILLs rank r inside the save of step s at phase p.
    Returns (rank 0) {start, losses {step: loss}, lrs, samples, weights, checkpoints}.
    """
    from papo_mega import checkpoint

    groups, chunks, optimizer, scheduler = build(cfg)
    if fault is not None:
        def hook(phase: str, _f=fault):
            if phase == _f["phase"] and current["step"] == _f["step"] and dist.get_rank() == _f["rank"]:
                os.kill(os.getpid(), signal.SIGKILL)
        checkpoint._FAULT_HOOK = hook
    stream = ShardStream(shard_dir, dp_rank=groups.dp_rank, dp_size=groups.layout.dp_size, seed=3,
                         shuffle_buffer=4)
    start = 0
    resume = checkpoint.resolve_resume(cfg)
    if resume is not None:
        state = checkpoint.load_training_checkpoint(resume, chunks, optimizer, scheduler, groups,
                                                    load_optimizer=cfg.checkpoint.load_optimizer)
        start = state["step"]
        assert state["rank_state"]["step"] == start and state["config"]["train"]["lr"] == cfg.train.lr
        stream.load_state_dict(state["rank_state"]["stream"])
    else:
        _seed_everything(groups)
    stream_iter = iter(stream)
    losses, lrs, samples = {}, {}, []
    current = {"step": None}
    for step in range(start, stop_after if stop_after is not None else cfg.train.steps):
        if kill is not None and step == kill["step"] and dist.get_rank() == kill["rank"]:
            os.kill(os.getpid(), signal.SIGKILL)
        batch = _rows(samples, stream_iter, cfg, groups)
        lrs[step + 1] = optimizer.param_groups[0]["lr"]
        losses[step + 1] = train_step(chunks, optimizer, batch, groups, cfg.train.micro_batch_size)["loss"]
        scheduler.step(1)
        done = step + 1
        if cfg.checkpoint.save_every and done % cfg.checkpoint.save_every == 0:
            current["step"] = done
            checkpoint.save_training_checkpoint(cfg.run.run_dir, done, chunks, optimizer, scheduler,
                                                {"stream": stream.state_dict(), "step": done}, cfg, groups)
    weights = gather_full_tensors(chunks, groups, kind="param")
    if dist.get_rank() != 0:
        return None
    return {"start": start, "losses": losses, "lrs": lrs, "samples": samples, "weights": weights}


def failing_saves(cfg: Config, shard_dir: str):
    """Train 2 steps and save. Then saves that fail with ENOSPC on rank 1: step 4 while writing its
    rank state (our code; the run can go on and save step 4 again), then step 6 inside megatron's
    shard writer (megatron reports it on every rank; a real run stops there). Returns the messages."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from papo_mega import checkpoint

    groups, chunks, optimizer, scheduler = build(cfg)
    stream = ShardStream(shard_dir, dp_rank=groups.dp_rank, dp_size=groups.layout.dp_size, seed=3, shuffle_buffer=4)
    stream_iter, samples = iter(stream), []
    _seed_everything(groups)
    for _ in range(2):
        train_step(chunks, optimizer, _rows(samples, stream_iter, cfg, groups), groups, cfg.train.micro_batch_size)
        scheduler.step(1)
    args = (chunks, optimizer, scheduler, {"step": 2}, cfg, groups)
    checkpoint.save_training_checkpoint(cfg.run.run_dir, 2, *args)

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    messages, final = [], None
    real_save, real_write = torch.save, filesystem_async._write_item
    for step, where in ((4, "rank_state"), (6, "shards")):
        if dist.get_rank() == 1:
            if where == "rank_state":
                checkpoint.torch.save = lambda obj, f, *a, **k: disk_full() if "rank_state" in str(f) else \
                    real_save(obj, f, *a, **k)
            else:
                filesystem_async._write_item = disk_full  # inherited by megatron's forked writers
        try:
            checkpoint.save_training_checkpoint(cfg.run.run_dir, step, *args)
            messages.append(None)
        except PapoError as err:
            messages.append(str(err))
        finally:
            checkpoint.torch.save, filesystem_async._write_item = real_save, real_write
        if where == "rank_state":  # the run goes on: the next save works and publishes
            final = str(checkpoint.save_training_checkpoint(cfg.run.run_dir, step, *args))
    return {"messages": messages, "final": final}


def _step_and_probe(cfg: Config, chunks, optimizer, scheduler, groups) -> torch.Tensor:
    """One more update on a fixed global batch, then the probe logits (they depend on the optimizer
    moments and the scheduler's lr, so they show whether both were restored)."""
    batch = make_lm_batch(cfg.train.global_batch_size, cfg.train.seq_len, cfg.model.vocab_size, 77, 0)
    train_step(chunks, optimizer, batch, groups, cfg.train.micro_batch_size)
    scheduler.step(1)
    return _probe_logits(chunks, groups, cfg.model.vocab_size)


def save_for_layouts(cases: list, shard_dir: str):
    """For each (cfg, optimizer_format): train 2 steps, save step 2, probe; step once more, probe."""
    from papo_mega import checkpoint

    out = []
    for cfg, optimizer_format in cases:
        groups, chunks, optimizer, scheduler = build(cfg)
        stream = ShardStream(shard_dir, dp_rank=groups.dp_rank, dp_size=groups.layout.dp_size, seed=3,
                             shuffle_buffer=4)
        stream_iter, samples = iter(stream), []
        _seed_everything(groups)
        for _ in range(2):
            train_step(chunks, optimizer, _rows(samples, stream_iter, cfg, groups), groups, cfg.train.micro_batch_size)
            scheduler.step(1)
        checkpoint.save_training_checkpoint(cfg.run.run_dir, 2, chunks, optimizer, scheduler,
                                            {"step": 2, "stream": stream.state_dict()}, cfg, groups,
                                            optimizer_format=optimizer_format)
        saved = _probe_logits(chunks, groups, cfg.model.vocab_size)
        after = _step_and_probe(cfg, chunks, optimizer, scheduler, groups)
        out.append({"saved": saved, "after": after})
    return out if dist.get_rank() == 0 else None


def load_cases(cases: list):
    """For each (cfg, checkpoint path, load_optimizer): build cfg's model at its layout from another
    seed, load; probe logits, then one more update and probe again. A PapoError is returned as text."""
    from papo_mega import checkpoint

    out = []
    for cfg, path, load_optimizer in cases:
        groups, chunks, optimizer, scheduler = build(cfg, seed=999)
        try:
            state = checkpoint.load_training_checkpoint(path, chunks, optimizer, scheduler, groups,
                                                        load_optimizer=load_optimizer)
        except PapoError as err:
            out.append({"error": str(err)})
            continue
        loaded = _probe_logits(chunks, groups, cfg.model.vocab_size)
        num_steps = scheduler.num_steps
        after = _step_and_probe(cfg, chunks, optimizer, scheduler, groups)
        out.append({"loaded": loaded, "after": after, "step": state["step"], "rank_state": state["rank_state"],
                    "num_steps": num_steps})
    return out if dist.get_rank() == 0 else None


def perturbed_replica(layout: dict):
    """check_replicas after two steps (clean), then after DP rank 1 nudged one weight by one ulp."""
    from papo_mega.sanity import check_replicas, replica_fingerprint

    cfg = make_config("/nonexistent", layout)
    groups, chunks, optimizer, scheduler = build(cfg)
    for step in range(2):
        batch = make_lm_batch(cfg.train.global_batch_size, cfg.train.seq_len, cfg.model.vocab_size, 5, step)
        train_step(chunks, optimizer, batch, groups, cfg.train.micro_batch_size)
        scheduler.step(1)
    results = {}
    for case in ("clean", "perturbed"):
        if case == "perturbed" and groups.dp_rank == 1 and groups.tp_rank == 0:
            name, param = [(n, p) for n, p in chunks[0].module.named_parameters()][3]
            results["nudged"] = name
            with torch.no_grad():
                flat = param.data.view(-1)
                flat[7] = torch.nextafter(flat[7], torch.tensor(float("inf")))
        try:
            check_replicas(chunks, groups)
            results[case] = None
        except PapoError as err:
            results[case] = str(err)
    results["rows"] = replica_fingerprint(chunks).shape[0]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results.get("nudged"))
    results["nudged"] = next((g for g in gathered if g), None)
    return results if dist.get_rank() == 0 else None
