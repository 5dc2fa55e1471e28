"""Worker for the PAPO-D data-parallel test: one real training step with steered rollouts.

The tiny model answers nothing right, so the rollout is made a function of the prompt alone: the
engine's sampling is replaced by tokens seeded from the prompt ids (the real engine seeds by DP
rank, so a DP2 job and one process would sample differently), and each group's accuracies (=
rewards) come from a hash of the sample key - all right, all wrong, or mixed. Everything after
the rollout (the filter, re-sampling, the exchange of groups, log-probs, updates) is the real code.
"""

from __future__ import annotations

import zlib

import torch

from papo_mega.types import RolloutBatch

GROUP = 4  # rollout.n


def recipe(train_dir: str, run_dir: str) -> list[str]:
    return ["preset=tiny", f"data.train_shards={train_dir}", "data.max_prompt_len=256", "algo.name=papo_d",
            "algo.prompts_per_step=4", "algo.max_resample=8", f"rollout.n={GROUP}", "rollout.max_new_tokens=6",
            "train.micro_batch_size=4", "train.global_batch_size=8", "train.lr=0.001", "train.steps=1",
            "loss.kl_coef=0", "loss.prcp_coef=0.01", "loss.entropy_coef=0.01", "loss.masked_entropy_coef=0.01",
            "data.shuffle_buffer=1", f"run.run_dir={run_dir}"]


def prompt_generate(prompts, params, seed: int, step: int) -> RolloutBatch:
    """`params.n` responses per prompt, drawn from a generator seeded by the prompt's ids only."""
    ids, lengths = [], []
    for prompt in prompts:
        gen = torch.Generator().manual_seed(zlib.crc32(prompt.input_ids.numpy().tobytes()) + seed)
        for _ in range(params.n):
            length = int(torch.randint(2, params.max_new_tokens + 1, (1,), generator=gen))
            row = torch.zeros(params.max_new_tokens, dtype=torch.long)
            row[:length] = torch.randint(10, 200, (length,), generator=gen)
            ids.append(row)
            lengths.append(length)
    lengths = torch.tensor(lengths)
    mask = (torch.arange(params.max_new_tokens)[None, :] < lengths[:, None]).float()
    return RolloutBatch(torch.arange(len(prompts)).repeat_interleave(params.n), torch.stack(ids), mask,
                        torch.zeros_like(mask), lengths, ["length"] * len(lengths))


def steered_accuracy(key: str) -> torch.Tensor:
    """[GROUP] accuracies of one prompt's group: all right, all wrong, or one of two mixed patterns."""
    kind = zlib.crc32(key.encode()) % 4
    if kind < 2:
        return torch.full((GROUP,), float(kind))
    return torch.tensor([1.0, 0.0, 0.0, 0.0] if kind == 2 else [1.0, 1.0, 0.0, 1.0])


def papo_d_step(train_dir: str, run_dir: str, overrides: tuple = ()):
    """One PAPO-D step; what was kept where, the step's loss and gradient norm, and (rank 0) the weights
    before and after it."""
    from papo_mega import train
    from papo_mega.config import load_config
    from papo_mega.distributed import init_distributed
    from papo_mega.distributed.sharding import gather_full_tensors

    cfg = load_config(None, [*recipe(train_dir, run_dir), *overrides])
    groups = init_distributed({}, seed=1)
    cfg.check_algorithm(groups.layout.dp_size)
    trainer = train.PapoTrainer(cfg, groups)
    trainer.engine.generate = prompt_generate
    real_rollout, real_gather = trainer._rollout, trainer._gather_groups
    kept_per_round: list[int] = []  # this rank's informative groups in each round
    chosen: list[list[str]] = []

    def rollout(prompts, step, attempt):
        out = real_rollout(prompts, step, attempt)
        out.accuracy = torch.cat([steered_accuracy(p.key) for p in prompts])
        out.rewards = out.accuracy.clone()
        kept_per_round.append(int(train.dynamic_sampling_keep(out.accuracy, GROUP).sum()))
        return out

    def gather(step):
        out, stats = real_gather(step)
        chosen.append([p.key for p in out.prompts])
        return out, stats

    trainer._rollout, trainer._gather_groups = rollout, gather
    before = gather_full_tensors(trainer.chunks, groups, kind="param")
    metrics = trainer.step(0)
    params = gather_full_tensors(trainer.chunks, groups, kind="param")
    return {"kept_per_round": kept_per_round, "chosen": chosen[0], "loss": metrics["loss/total"],
            "kl_prcp": metrics["loss/kl_prcp"], "grad_norm": metrics["optim/grad_norm"],
            "resampled": metrics["dapo/resampled"], "kept_fraction": metrics["dapo/kept_fraction"],
            "before": before if groups.rank == 0 else None, "params": params if groups.rank == 0 else None}
