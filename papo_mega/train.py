"""`papo-mega train`: the rollout-and-update loop, stages in data-flow order (docs/training.md).

    stream prompts -> views -> rollout -> rewards and advantages -> one no-grad forward for old,
    masked and reference log-probs -> PPO updates (both views batched) -> checkpoint and metrics

Every step is a pure function of (weights, optimizer state, data position, step index): the
rollout draws from (seed, step, DP rank), masks from (seed, step, sample key), so a run resumed
from a checkpoint repeats exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from papo_mega.algo.advantage import GroupPick, dynamic_sampling_keep, fill_informative, grpo_advantages
from papo_mega.algo.losses import loss_config_at
from papo_mega.algo.policy import attach_old_logprobs, compute_logprobs, papo_forward_backward
from papo_mega.config import Config, config_to_dict, save_config
from papo_mega.data.image import BadImage
from papo_mega.data.prepare import PreparedPrompt, prepare_prompt
from papo_mega.data.prompts import PromptTooLong
from papo_mega.data.shards import ShardStream
from papo_mega.distributed.runtime import ParallelGroups
from papo_mega.errors import PapoError
from papo_mega.metrics import (
    LOSS_ENTROPY,
    LOSS_KL_PRCP,
    LOSS_MASKED_ENTROPY,
    decode_prompt,
    flatten_step_metrics,
)
from papo_mega.reward import reward_summary, score_batch
from papo_mega.rollout.assemble import assemble_policy_rows, longest_sequence
from papo_mega.rollout.engine import MegatronEngine
from papo_mega.types import PolicyMicroBatch, RolloutBatch


@dataclass
class RolloutGroups:
    """This rank's prompts for one step and their G responses each, scored."""

    prompts: list[PreparedPrompt]
    rollout: RolloutBatch
    rewards: torch.Tensor
    accuracy: torch.Tensor
    format: torch.Tensor
    summary: dict = field(default_factory=dict)


EVAL_BATCH_PROMPTS = 32
"""Questions generated together during in-training evaluation (k answers each)."""


def eval_due(cfg: Config, done: int) -> bool:
    """Whether to evaluate after `done` steps: before the first, every algo.eval_every, after the last."""
    if not cfg.data.eval_shards:
        return False
    return done in (0, cfg.train.steps) or bool(cfg.algo.eval_every and done % cfg.algo.eval_every == 0)


STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
"""Signals that stop training cleanly: Slurm's warning before the time limit (`--signal=USR1@T`), the
TERM of preemption, scancel or torchrun's shutdown, and Ctrl-C. The step in progress finishes, a
checkpoint of it is written, and `papo-mega train` exits 0 without a final model; `--resume auto` continues."""
URGENT_SIGNALS = (signal.SIGTERM, signal.SIGINT)
"""After any stop signal, one of these ends the process at once (exit 128 + signal number)."""


class StopRequest:
    """Remembers a STOP_SIGNALS delivery (the handler only sets a flag); `agreed()` is collective.

    Only some ranks may get the signal (Slurm signals tasks node by node; a user may `kill` one PID),
    so every step ends with a MAX all-reduce of the local flag over the world group: all ranks stop
    after the same step. The handler only sets a flag, so it cannot raise where an exception is
    swallowed (a KeyboardInterrupt inside logging's at-fork handler once let a Ctrl-C'd run finish).
    A repeated USR1 is ignored (a batch script forwarding the warning to srun may double it); a TERM
    or INT after any stop signal ends the process at once. That is done by a watcher thread reading
    the signal wakeup fd, not by the handler: Python runs handlers only between bytecodes of the main
    thread, which never come while it waits in a collective (C++). `restore()` on exit."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}
        self._wakeup: tuple[int, int] | None = None  # (fd set before us, our pipe's write end)
        try:
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            self._watch()
        except ValueError:  # not the main thread (e.g. run_train called from a worker thread)
            self.restore()

    def _handle(self, signum, _frame) -> None:
        self.signum = self.signum or signum

    def _watch(self) -> None:
        read, write = os.pipe()
        os.set_blocking(write, False)  # the C-level handler must never block on a full pipe
        self._wakeup = (signal.set_wakeup_fd(write, warn_on_full_buffer=False), write)
        threading.Thread(target=self._watcher, args=(read,), name="papo-stop-watch", daemon=True).start()

    def _watcher(self, read: int) -> None:
        """Counts stop signals as they arrive (even while the main thread is blocked in C)."""
        seen: list[int] = []
        with os.fdopen(read, "rb", buffering=0) as pipe:
            while data := pipe.read(64):  # b"" once restore() closes the write end
                seen += [signum for signum in data if signum in STOP_SIGNALS]
                # Not "the second one is urgent": a handler interrupted by the next signal writes its
                # byte after that one's, so two signals sent together can arrive in either order.
                urgent = [signum for signum in seen if signum in URGENT_SIGNALS]
                if len(seen) >= 2 and urgent:
                    names = " and ".join(signal.Signals(signum).name for signum in seen[:2])
                    print(f"papo-mega: {names}: stopping now, without a checkpoint of the step in progress",
                          file=sys.stderr, flush=True)
                    os._exit(128 + urgent[-1])

    def agreed(self, device) -> bool:
        flag = torch.tensor([0.0 if self.signum is None else 1.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def raise_if_requested(self, doing: str) -> None:
        """PapoError (exit 2) naming the signal when one came: for waits that may never end."""
        if self.signum is not None:
            raise PapoError(f"stopped by {signal.Signals(self.signum).name} while {doing}; nothing of this step "
                            f"is saved, the last checkpoint is intact (rerun with --resume auto)")

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if self._wakeup is not None:
            previous, write = self._wakeup
            self._wakeup = None
            signal.set_wakeup_fd(previous)
            os.close(write)


def _timer():
    start = time.perf_counter()
    return lambda: time.perf_counter() - start


class PapoTrainer:
    """Owns the model replicas, optimizer, data stream and engine of one training run."""

    def __init__(self, cfg: Config, groups: ParallelGroups, stop: StopRequest | None = None):
        from papo_mega.data.tokenizer import load_tokenizer
        from papo_mega.model_dir import init_from_model
        from papo_mega.models.qwen_vl import build_model_chunks
        from papo_mega.optim import attach_grad_finalisation, build_optimizer, build_scheduler, wrap_ddp

        self.cfg, self.groups = cfg, groups
        if not cfg.data.train_shards or not Path(cfg.data.train_shards).is_dir():
            raise PapoError(f"data.train_shards={cfg.data.train_shards!r} is not a shard directory; make one with "
                            f"tools/make_synthetic.py or tools/make_shards.py")
        if cfg.data.eval_shards and not Path(cfg.data.eval_shards).is_dir():
            raise PapoError(f"data.eval_shards={cfg.data.eval_shards} is not a shard directory; make one with "
                            f"tools/make_synthetic.py --split test, or set data.eval_shards='' for no evaluation")
        if cfg.algo.init_from:
            # The model directory's architecture, settings and tokenizer fill what the config leaves
            # unset; in place, because run_train saves and checkpoints this same cfg object.
            resolved, chunks = init_from_model(cfg, cfg.algo.init_from, groups)
            vars(cfg).update(vars(resolved))
        else:
            chunks = build_model_chunks(cfg.model, cfg.vision, groups, seed=cfg.train.seed)
        use_distopt = cfg.parallel.use_distributed_optimizer
        self.chunks = wrap_ddp(chunks, groups, use_distopt)
        for chunk in self.chunks:
            # Non-finite gradients are a guarded, counted event here (skip the update), not a crash.
            chunk.ddp_config.check_for_nan_in_grad = False
        attach_grad_finalisation(self.chunks)
        self.optimizer = build_optimizer(self.chunks, cfg.train, use_distopt, cfg.model.precision)
        self.updates_per_step = cfg.train.ppo_epochs * (cfg.algo.prompts_per_step * cfg.rollout.n
                                                         // cfg.train.global_batch_size)
        self.scheduler = build_scheduler(self.optimizer, cfg.train, cfg.train.steps * self.updates_per_step)
        self.reference = self._build_reference() if cfg.loss.kl_coef > 0 else None
        self.tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.model)
        self.engine = MegatronEngine(self.chunks, groups, cfg.model, cfg.vision.spatial_merge_size,
                                     [self.tokenizer.eos_id], self.tokenizer.pad_id, decode=self.tokenizer.decode)
        self.stop = stop
        # Checkpointed per rank; the stream adds its skip totals (samples_read / samples_skipped).
        self.counters = {"skipped_updates": 0, "nonfinite_streak": 0}
        self.stream = ShardStream(cfg.data.train_shards, dp_rank=groups.dp_rank, dp_size=groups.layout.dp_size,
                                  seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                                  num_workers=cfg.data.num_workers, max_skip_fraction=cfg.data.max_skip_fraction,
                                  skip_totals=self.counters)
        self.samples = iter(self.stream)
        self.stage_seconds: defaultdict[str, float] = defaultdict(float)  # this step's time by stage

    def _build_reference(self):
        """The frozen reference policy at the same layout: the starting weights, never updated."""
        from papo_mega.model_dir import load_model_dir
        from papo_mega.models.qwen_vl import build_model_chunks

        cfg = self.cfg
        if cfg.algo.init_from:
            chunks = load_model_dir(cfg.algo.init_from, self.groups, model=cfg.model, vision=cfg.vision)[0]
        else:  # layout-invariant init from the same seed = the policy's starting weights
            chunks = build_model_chunks(cfg.model, cfg.vision, self.groups, seed=cfg.train.seed)
        for chunk in chunks:
            chunk.eval()
            chunk.requires_grad_(False)
        return chunks

    # -- stages 1-2: stream prompts and prepare views -----------------------------------------
    def _next_prompts(self, count: int, step: int) -> list[PreparedPrompt]:
        """`count` prepared prompts. An unusable sample counts against data.max_skip_fraction (a
        PapoError past it), and a stop signal ends a search that keeps skipping: no endless loop."""
        views = ("masked",) if self.cfg.loss.needs_masked_view else ()
        out = []
        while len(out) < count:
            clock = _timer()
            item = next(self.samples)
            self.stage_seconds["stream"] += clock()
            clock = _timer()
            try:
                out.append(prepare_prompt(item, self.tokenizer, self.cfg.data, self.cfg.vision, self.cfg.train.seed,
                                          step, views=views))
            except (PromptTooLong, BadImage) as err:
                self.stream.reject(item, str(err))
                if self.stop is not None:  # skipping: this step may never get its prompts
                    self.stop.raise_if_requested(f"step {step + 1} was skipping unusable samples")
            finally:
                self.stage_seconds["prepare"] += clock()
        return out

    # -- stages 3-4: rollout and reward ----------------------------------------------------------
    def _rollout(self, prompts: list[PreparedPrompt], step: int, attempt: int) -> RolloutGroups:
        for chunk in self.chunks:
            chunk.eval()
        clock = _timer()
        # attempt > 0 (DAPO re-sampling) must draw differently from attempt 0 of the same step.
        out = self.engine.generate([p.prompt for p in prompts], self.cfg.rollout, seed=self.cfg.train.seed + attempt,
                                   step=step)
        self.stage_seconds["rollout"] += clock()  # += : DAPO rolls out several times per step
        for chunk in self.chunks:
            chunk.train()
        clock = _timer()
        texts = [self.tokenizer.decode(out.response_ids[r, : int(out.lengths[r])].tolist())
                 for r in range(len(out.lengths))]
        truths = [prompts[int(g)].answer for g in out.prompt_index]
        results = score_batch(texts, truths, self.cfg.reward)
        self.stage_seconds["reward"] += clock()
        as_tensor = lambda key: torch.tensor([getattr(r, key) for r in results], dtype=torch.float32)  # noqa: E731
        return RolloutGroups(prompts, out, as_tensor("reward"), as_tensor("accuracy"), as_tensor("format"),
                             reward_summary(results))

    def _gather_groups(self, step: int) -> tuple[RolloutGroups, dict]:
        """This rank's share of the step's prompts, rolled out. DAPO: the first algo.prompts_per_step
        informative groups of the whole job (bounded re-sampling, advantage.fill_informative), in the
        order one process would pick them, dealt round-robin over DP like the stream deals samples."""
        per_rank = self.cfg.algo.prompts_per_step // self.groups.layout.dp_size
        if not self.cfg.algo.dynamic_sampling:
            groups = self._rollout(self._next_prompts(per_rank, step), step, 0)
            return groups, {"dapo/kept_fraction": 1.0, "dapo/resampled": 0.0}
        rollouts: list[RolloutGroups] = []

        def draw_round(attempt: int) -> torch.Tensor:
            rollouts.append(self._rollout(self._next_prompts(per_rank, step), step, attempt))
            return self._keep_over_dp(rollouts[-1])

        picks, rounds = fill_informative(draw_round, self.cfg.algo.prompts_per_step, self.cfg.algo.max_resample)
        stats = {"dapo/kept_fraction": sum(float(m.sum()) for m in rounds) / sum(m.numel() for m in rounds),
                 "dapo/resampled": float(len(rounds) - 1)}
        return self._rebalance(rollouts, picks), stats

    def _keep_over_dp(self, groups: RolloutGroups) -> torch.Tensor:
        """[dp, per_rank] bool: every DP rank's dynamic_sampling_keep of its round, the same on all ranks."""
        keep = dynamic_sampling_keep(groups.accuracy, self.cfg.rollout.n).to(torch.int32).to(self.groups.device)
        table = [torch.empty_like(keep) for _ in range(self.groups.layout.dp_size)]
        dist.all_gather(table, keep, group=self.groups.dp)
        return torch.stack(table).bool().cpu()

    def _rebalance(self, rollouts: list[RolloutGroups], picks: list[GroupPick]) -> RolloutGroups:
        """Rank r trains picks r, r + dp, ... (ranks keep different numbers of groups; this gives each
        the same count, and the updates the groups a single process would put in them). Groups that
        change rank travel as objects over the DP group: one all_gather_object, skipped (on every
        rank alike) when none moves."""
        n, dp, me = self.cfg.rollout.n, self.groups.layout.dp_size, self.groups.dp_rank
        moving = {k: pick for k, pick in enumerate(picks) if pick.rank != k % dp}
        arrived: dict[int, RolloutGroups] = {}
        if moving:
            outgoing = {k: _select_groups([(rollouts[p.round], p.index)], n) for k, p in moving.items() if p.rank == me}
            gathered: list[dict] = [{} for _ in range(dp)]
            dist.all_gather_object(gathered, outgoing, group=self.groups.dp)
            arrived = {k: g for sent in gathered for k, g in sent.items() if k % dp == me}
        mine = [(arrived[k], 0) if k in arrived else (rollouts[picks[k].round], picks[k].index)
                for k in range(me, len(picks), dp)]
        return _select_groups(mine, n)

    # -- stage 5: one no-grad forward for old, masked and reference log-probs ----------------
    def _policy_batches(self, groups: RolloutGroups, advantages: torch.Tensor) -> list[PolicyMicroBatch]:
        cfg = self.cfg
        prompts = [p.prompt for p in groups.prompts]
        masked = [p.views.get("masked") for p in groups.prompts] if cfg.loss.needs_masked_view else None
        seq_len = longest_sequence(prompts, groups.rollout, cfg.model)  # fp8: padded to TE's token multiple
        rows = len(groups.rollout.lengths)
        mbs = cfg.train.micro_batch_size
        batches = [assemble_policy_rows(prompts, groups.rollout, advantages, cfg.model, cfg.vision.spatial_merge_size,
                                        self.tokenizer.pad_id, masked, seq_len, range(lo, min(lo + mbs, rows)))
                   for lo in range(0, rows, mbs)]
        # On the host (pinned on CUDA): the forward steps move each micro-batch when they reach it.
        batches = [b.to_host(self.groups.device) for b in batches]
        batches = attach_old_logprobs(self.chunks, self.groups, batches, cfg.loss)
        if self.reference is not None:
            refs = compute_logprobs(self.reference, self.groups, batches, cfg.loss.temperature, views=("original",))
            for batch, ref in zip(batches, refs):
                batch.ref_logp = ref["original"]
        return batches

    # -- stage 6-7: PPO updates ---------------------------------------------------------------
    def _grads_finite(self) -> bool:
        bad = nonfinite_grad_flag(self.chunks, self.groups.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank takes the same decision
        return bad.item() == 0.0  # the one host sync

    def _update(self, batches: list[PolicyMicroBatch], step: int) -> list[dict]:
        """PPO epochs x updates of global_batch_size responses; one metrics dict per update."""
        cfg = self.cfg
        loss_cfg = loss_config_at(cfg.loss, step, cfg.train.steps)  # loss.prcp_schedule at this step
        per_update = cfg.train.global_batch_size // self.groups.layout.dp_size // cfg.train.micro_batch_size
        updates = []
        for _ in range(cfg.train.ppo_epochs):
            for lo in range(0, len(batches), per_update):
                for chunk in self.chunks:
                    chunk.zero_grad_buffer()
                self.optimizer.zero_grad()
                metrics = papo_forward_backward(self.chunks, self.groups, batches[lo : lo + per_update], loss_cfg)
                if not (math.isfinite(metrics["loss"]) and self._grads_finite()):
                    self.counters["skipped_updates"] += 1
                    updates.append({"update_ok": False})
                    continue
                _, grad_norm, _ = self.optimizer.step()
                self.scheduler.step(increment=1)
                updates.append({**metrics, "grad_norm": float(grad_norm or 0.0), "update_ok": True})
        ok = any(u["update_ok"] for u in updates)
        self.counters["nonfinite_streak"] = 0 if ok else self.counters["nonfinite_streak"] + 1
        return updates

    # -- held-out evaluation (algo.eval_*) ------------------------------------------------------
    def evaluate(self) -> dict:
        """avg@k accuracy on data.eval_shards with the original, masked and blank image (evaluate.py)."""
        from papo_mega.evaluate import evaluate

        for chunk in self.chunks:
            chunk.eval()
        try:
            return evaluate(self.engine, self.tokenizer, self.cfg, self.groups, self.cfg.data.eval_shards,
                            self.cfg.algo.eval_k, self.cfg.algo.eval_samples, batch_prompts=EVAL_BATCH_PROMPTS,
                            show_progress=False)
        finally:
            for chunk in self.chunks:
                chunk.train()

    # -- one whole step -----------------------------------------------------------------------
    def step(self, step: int, sample_rows: int = 0) -> dict:
        """Run one step; its scalars under the standard tags (time/<stage>_s for each of TIME_STAGES
        but checkpoint, which run_train adds). `sample_rows` > 0: keep that many decoded sample
        generations of this rank in `self.last_samples` (metrics.SAMPLE_FIELDS)."""
        cfg = self.cfg
        whole = _timer()
        self.stage_seconds.clear()  # stream / prepare / rollout / reward add up over DAPO's re-samples
        groups, dapo = self._gather_groups(step)
        times = {stage: self.stage_seconds[stage] for stage in ("stream", "prepare", "rollout", "reward")}
        self.last_samples = self._sample_rows(groups, sample_rows)
        advantages = grpo_advantages(groups.rewards, cfg.rollout.n, cfg.algo.normalise_std)
        clock = _timer()
        batches = self._policy_batches(groups, advantages)
        times["logprobs"] = clock()
        clock = _timer()
        update = self._update(batches, step)
        times["update"] = clock()
        if self.counters["nonfinite_streak"] >= cfg.train.nonfinite_patience:
            raise PapoError(f"{self.counters['nonfinite_streak']} steps in a row had a NaN/inf loss or gradient "
                            f"(train.nonfinite_patience); stopped with the last good checkpoint intact - "
                            f"lower train.lr or check the data")
        local = torch.tensor([float(groups.rewards.sum()), float(groups.accuracy.sum()), float(groups.format.sum()),
                              float(groups.rollout.lengths.sum()),
                              float(sum(r == "length" for r in groups.rollout.finish_reason)),
                              float(len(groups.rewards))], dtype=torch.float64, device=self.groups.device)
        dist.all_reduce(local, group=self.groups.dp)
        reward, accuracy, fmt, generated, truncated, rows = local.tolist()
        rows = max(rows, 1.0)
        times["step"] = whole()
        return flatten_step_metrics(
            update, reward=reward / rows, accuracy=accuracy / rows, format_reward=fmt / rows,
            response_length=generated / rows, truncated_frac=truncated / rows,
            lr=self.optimizer.param_groups[0]["lr"], skipped_updates=self.counters["skipped_updates"],
            tokens_per_s=generated / max(times["step"], 1e-9), times=times,
            extra={**dapo, "data/skipped_prompts": float(self.stream.skips.skipped),
                   "data/skip_fraction": self.stream.skips.fraction},
        )

    def _sample_rows(self, groups: RolloutGroups, count: int) -> list[dict]:
        """The first response to each of the first `count` prompts, decoded, with its scores."""
        n, rows = self.cfg.rollout.n, []
        for g, prompt in enumerate(groups.prompts[:count]):
            r = g * n  # rows [g*n, (g+1)*n) answer prompt g
            response = groups.rollout.response_ids[r, : int(groups.rollout.lengths[r])].tolist()
            rows.append({"key": prompt.key, "prompt": decode_prompt(self.tokenizer, prompt.prompt.input_ids.tolist()),
                         "response": self.tokenizer.decode(response), "reward": float(groups.rewards[r]),
                         "accuracy": float(groups.accuracy[r]), "format": float(groups.format[r]),
                         "ground_truth": prompt.answer})
        return rows


def nonfinite_grad_flag(chunks, device) -> torch.Tensor:
    """[1] float on `device`: 1.0 if any parameter's main_grad holds a NaN/inf, else 0.0.

    One device-side reduction with no host sync (a per-parameter bool() waits for the GPU once
    per parameter); the caller reads it once, after the all-reduce.
    """
    grads = [p.main_grad for chunk in chunks for p in chunk.parameters() if getattr(p, "main_grad", None) is not None]
    if not grads:
        return torch.zeros(1, device=device)
    finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
    return torch.logical_not(finite).float().reshape(1).to(device)


def _select_groups(kept: list[tuple[RolloutGroups, int]], n: int) -> RolloutGroups:
    """Concatenate chosen prompt groups (from possibly several rollouts) into one RolloutGroups."""
    prompts, ids, masks, logps, lengths, finish, rewards, acc, fmt = [], [], [], [], [], [], [], [], []
    width = max(g.rollout.response_ids.shape[1] for g, _ in kept)

    def pad(t: torch.Tensor, value) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    for groups, g in kept:
        rows = slice(g * n, (g + 1) * n)
        prompts.append(groups.prompts[g])
        ids.append(pad(groups.rollout.response_ids[rows], 0))
        masks.append(pad(groups.rollout.response_mask[rows], 0.0))
        logps.append(pad(groups.rollout.logprobs[rows], 0.0))
        lengths.append(groups.rollout.lengths[rows])
        finish.extend(groups.rollout.finish_reason[rows])
        rewards.append(groups.rewards[rows])
        acc.append(groups.accuracy[rows])
        fmt.append(groups.format[rows])
    rollout = RolloutBatch(torch.arange(len(kept)).repeat_interleave(n), torch.cat(ids), torch.cat(masks),
                           torch.cat(logps), torch.cat(lengths), finish)
    return RolloutGroups(prompts, rollout, torch.cat(rewards), torch.cat(acc), torch.cat(fmt))


def run_train(cfg: Config, *, overwrite: bool = False, allow_config_change: bool = False) -> dict:
    """Train cfg.train.steps steps under whichever launcher started us; resumable; returns the last metrics.

    `overwrite`: a fresh start may move an earlier run in run.run_dir aside; `allow_config_change`: a
    resume may change what defines the run (checkpoint.prepare_resume)."""
    from papo_mega.checkpoint import (
        latest_checkpoint,
        load_training_checkpoint,
        prepare_resume,
        run_files,
        save_training_checkpoint,
    )
    from papo_mega.config_diff import BENIGN_TRAIN
    from papo_mega.distributed import init_job, shutdown_distributed
    from papo_mega.eval_metrics import scalar_tags as eval_scalars
    from papo_mega.evaluate import write_results
    from papo_mega.metrics import (
        SAMPLES_PER_LOG,
        CollapseDetector,
        MetricsLogger,
        ProgressBar,
        config_banner,
        samples_due,
        time_tag,
    )
    from papo_mega.model_dir import save_model_dir
    from papo_mega.plots import plot_run
    from papo_mega.sanity import check_replicas

    groups = init_job(cfg)
    cfg.check_algorithm(groups.layout.dp_size)
    stop = StopRequest()
    running = None  # the step in progress, for the resume hint if it fails
    try:
        trainer = PapoTrainer(cfg, groups, stop)
        is_main = groups.rank == 0
        start = 0
        evidence, outputs = run_files(cfg.run.run_dir)
        resume = prepare_resume(cfg, cfg.run.run_dir, evidence=evidence, outputs=outputs, benign=BENIGN_TRAIN,
                                overwrite=overwrite, allow_config_change=allow_config_change)
        if resume is not None:
            state = load_training_checkpoint(resume, trainer.chunks, trainer.optimizer, trainer.scheduler, groups,
                                             load_optimizer=cfg.checkpoint.load_optimizer)
            start = int(state["step"])
            rank_state = state.get("rank_state") or {}
            if "stream" in rank_state:
                trainer.stream.load_state_dict(rank_state["stream"])
                trainer.samples = iter(trainer.stream)
            trainer.counters.update(rank_state.get("counters", {}))
            if is_main:
                print(f"[papo-mega] resumed from {resume} at step {start}", flush=True)
        if is_main:
            save_config(cfg, cfg.run.run_dir)
            print(f"[papo-mega] train {cfg.algo.name}: {groups.layout.describe()}, backend {groups.backend}",
                  flush=True)
        if is_main:
            print(config_banner(cfg), flush=True)
        tracker, samples_every = cfg.run.tracker, cfg.run.samples_every
        # Steps are logged 1-based (after step k, k steps are done): the first line this process writes.
        # A fresh run logs its step-0 evaluation; a resumed one continues after its last step.
        logger = MetricsLogger(cfg.run.run_dir, cfg.run.tensorboard, is_main, start_step=start + 1 if start else 0,
                               tracker=tracker, config=config_to_dict(cfg), run_name=cfg.run.name)
        collapse = CollapseDetector(cfg.run.collapse_window)
        bar = ProgressBar(cfg.train.steps, start, enabled=is_main, every=cfg.train.log_every)
        wall = _timer()
        metrics: dict = {}
        stopping = False

        def save(step: int) -> None:
            rank_state = {"stream": trainer.stream.state_dict(), "counters": dict(trainer.counters)}
            save_training_checkpoint(cfg.run.run_dir, step, trainer.chunks, trainer.optimizer, trainer.scheduler,
                                     rank_state, cfg, groups)

        def evaluate(done: int) -> dict:
            clock = _timer()
            result = trainer.evaluate()
            if is_main:
                write_results(result, Path(cfg.run.run_dir) / "eval" / f"step_{done:06d}")
                acc = result["accuracy"]
                bar.write(f"[papo-mega] eval after {done} steps (avg@{result['k']}, {result['questions']} questions): "
                          + "  ".join(f"{v} {acc[v].get('overall', 0.0):.3f} (format {result['format_rate'][v]:.2f})"
                                      for v in acc) + f"  ({clock():.0f} s)")
            return eval_scalars(result)

        if start == 0 and eval_due(cfg, 0):
            logger.log(0, evaluate(0))
        for step in range(start, cfg.train.steps):
            running, iteration = step + 1, _timer()
            want_samples = is_main and samples_due(step + 1, samples_every, cfg.train.steps)
            metrics = trainer.step(step, sample_rows=SAMPLES_PER_LOG if want_samples else 0)
            done = step + 1
            if eval_due(cfg, done):
                metrics.update(evaluate(done))
            if cfg.train.sanity_every and done % cfg.train.sanity_every == 0:
                check_replicas(trainer.chunks, groups)
            clock = _timer()
            stopping = stop.agreed(groups.device) and done < cfg.train.steps
            if (cfg.checkpoint.save_every and done % cfg.checkpoint.save_every == 0) or done == cfg.train.steps \
                    or stopping:
                save(done)
            metrics[time_tag("checkpoint")] = clock()
            metrics[time_tag("step")] = iteration()  # the whole step: evaluation and checkpoint included
            logger.log(done, metrics)
            logger.log_samples(done, trainer.last_samples)
            warning = collapse.update(done, metrics.get(LOSS_KL_PRCP), metrics.get(LOSS_ENTROPY),
                                      metrics.get(LOSS_MASKED_ENTROPY))
            if warning and is_main:
                bar.write(f"[papo-mega] WARNING step {done}: {warning}")
            bar.update(metrics)
            if stopping:
                break
        bar.close()
        logger.close()
        if stopping:
            if is_main:
                name = signal.Signals(stop.signum).name if stop.signum else "a signal on another rank"
                print(f"[papo-mega] stopped by {name} after step {done} of {cfg.train.steps}: checkpoint "
                      f"{latest_checkpoint(cfg.run.run_dir)}; rerun with --resume auto to continue", flush=True)
            return metrics
        final = save_model_dir(trainer.chunks, Path(cfg.run.run_dir) / "final", cfg.model, cfg.vision, groups,
                               cfg=cfg)
        if is_main:
            plots = plot_run(cfg.run.run_dir)
            print(_summary(cfg, start, wall(), metrics, final, plots), flush=True)
        return metrics
    except BaseException as err:
        # A PapoError is already the one line that names the fix; an unexpected failure gets the hint.
        if running is not None and groups.rank == 0 and not isinstance(err, PapoError):
            print(_crash_hint(cfg.run.run_dir, running), file=sys.stderr, flush=True)
        raise
    finally:
        stop.restore()
        shutdown_distributed()


def _summary(cfg: Config, start: int, seconds: float, metrics: dict, final: Path, plots: list[Path]) -> str:
    """The end-of-run report: what ran and where each output is (metrics.run_summary)."""
    from papo_mega.checkpoint import latest_checkpoint
    from papo_mega.metrics import METRICS_FILE, SAMPLES_FILE, TB_DIR, run_summary

    run_dir = Path(cfg.run.run_dir)
    samples = run_dir / SAMPLES_FILE
    places = {"model": final, "checkpoint": latest_checkpoint(run_dir),
              "TensorBoard": f"tensorboard --logdir {run_dir / TB_DIR}" if cfg.run.tensorboard else None,
              "plots": plots[0].parent if plots else None, "metrics": run_dir / METRICS_FILE,
              "samples": samples if samples.is_file() else None,
              "wandb": run_dir / "wandb" if cfg.run.tracker == "wandb" else None}
    return run_summary(start, cfg.train.steps, cfg.train.steps, seconds, metrics, places)


def _crash_hint(run_dir: str, step: int) -> str:
    """What to do after step `step` failed: resume from the newest checkpoint, which the message names."""
    from papo_mega.checkpoint import latest_checkpoint

    try:
        latest = latest_checkpoint(run_dir)
    except Exception as err:  # noqa: BLE001 - the hint must never hide the error being raised
        latest = f"unknown ({err})"
    if latest is None:
        return f"[papo-mega] train failed at step {step} before its first checkpoint; a rerun starts from step 0"
    return (f"[papo-mega] train failed at step {step}; the latest checkpoint is {latest}: "
            f"rerun with --resume auto to continue")
