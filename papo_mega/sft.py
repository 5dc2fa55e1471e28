"""`papo-mega sft`: a supervised warm start in the PAPO answer format, before RL.

    papo-mega sft examples/tiny_cpu.yaml sft.steps=200   # under torchrun / srun / mpirun

Each training sample becomes prompt + target, where the target is the answer in the format the
reward checks (`<think>...</think>` then `\\boxed{ANSWER}`) followed by the end-of-turn token:

    <think>\\nThe answer is ANSWER.\\n</think>\\n\\boxed{ANSWER}<|im_end|>

The loss is the token mean over target tokens only (the prompt is context, not a target). The
vision tower trains with the language model, so the model learns to read the image: a tiny model
learns the synthetic tasks well above chance while a blank image stays near chance (docs/sft.md).
It runs under any launcher and at any TP/PP/DP layout (megatron's schedules do the splitting) and
writes a model directory that `papo-mega eval` and RL training (`algo.init_from`) load.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from papo_mega.config import Config, ModelConfig, explicit_keys, save_config, set_explicit_keys
from papo_mega.data.image import BadImage
from papo_mega.data.prepare import prepare_prompt
from papo_mega.data.prompts import PromptTooLong
from papo_mega.data.shards import BadSample, ShardStream, load_index
from papo_mega.data.tokenizer import Tokenizer
from papo_mega.errors import PapoError
from papo_mega.lm_step import MicroBatch, forward_backward
from papo_mega.models.fp8_shapes import fp8_padded_length
from papo_mega.models.rope_index import compute_mrope_position_ids

LOG_NAME = "sft_log.json"
"""Per-step loss, grad norm and wall time, written next to the model (rank 0)."""
SFT_RUN = "sft_run"
"""RUN_DIR/sft_run: SFT's checkpoints, metrics.jsonl, TensorBoard, plots and config.yaml (RL's
`--resume auto` and metrics live in RUN_DIR itself; the demo runs both in one run directory)."""
LOSS_TAG = "loss/sft"


def sft_target(answer: str) -> str:
    """The response SFT teaches: the reward's format with a one-line templated reasoning.

    The reasoning is the same sentence for every task: the warm start teaches the format and the
    answer; RL later decides what to write between the think tags.
    """
    return f"<think>\nThe answer is {answer}.\n</think>\n\\boxed{{{answer}}}"


@dataclass
class Example:
    """One training sequence: prompt + target ids, where the target starts, and the image."""

    ids: torch.Tensor
    """[L] prompt ids, then target ids, then eos."""
    target_start: int
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor


def shows_blank(key: str, seed: int, blank_fraction: float) -> bool:
    """Whether sample `key` is shown with a blank image: a fixed share `blank_fraction` of the
    samples, chosen by a hash of (seed, key) - the same on every rank, layout, epoch and resume."""
    if blank_fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < blank_fraction


def make_example(item: dict, tokenizer: Tokenizer, cfg: Config) -> Example:
    """Stream item -> Example: the original image, or for a share sft.blank_fraction of the samples
    the blank view (every patch black) with the same, true answer. Trained on balanced answers, a
    blank image then yields the prior - chance - in the right format, where a model that never saw
    one answers nothing parseable. Unusable samples become skips the stream counts."""
    blank = shows_blank(str(item["key"]), cfg.train.seed, cfg.sft.blank_fraction)
    try:
        prepared = prepare_prompt(item, tokenizer, cfg.data, cfg.vision, cfg.train.seed, step=0,
                                  views=("blank",) if blank else ())
    except (PromptTooLong, BadImage) as err:
        raise BadSample(str(err)) from None
    prompt = prepared.prompt
    pixel_values = prepared.views["blank"] if blank else prompt.pixel_values
    target = tokenizer.encode(sft_target(prepared.answer)) + [tokenizer.eos_id]
    ids = torch.cat([prompt.input_ids, torch.tensor(target, dtype=torch.long)])
    if len(ids) > cfg.model.max_seq_len:
        raise BadSample(f"prompt + answer is {len(ids)} tokens, more than model.max_seq_len={cfg.model.max_seq_len}")
    return Example(ids, len(prompt.input_ids), pixel_values, prompt.image_grid_thw)


def step_seq_len(examples: list[Example], model: ModelConfig) -> int:
    """The step's common input length: the longest example's, padded to the fp8 token multiple under
    model.precision=fp8 (models/fp8_shapes.py; the padding is right padding with no loss)."""
    return fp8_padded_length(max(len(ex.ids) for ex in examples) - 1, model)


def collate(examples: list[Example], seq_len: int, pad_id: int, cfg: Config) -> MicroBatch:
    """Right-pad to seq_len (common to every micro-batch of a step: pipeline stages exchange
    fixed-shape activations). Column t predicts token t+1; the loss counts target columns only."""
    rows = len(examples)
    ids = torch.full((rows, seq_len + 1), pad_id, dtype=torch.long)
    real = torch.zeros(rows, seq_len, dtype=torch.long)
    loss_mask = torch.zeros(rows, seq_len)
    for r, ex in enumerate(examples):
        n = len(ex.ids)
        ids[r, :n] = ex.ids
        real[r, :n] = 1
        loss_mask[r, ex.target_start - 1 : n - 1] = 1.0  # predicting target tokens and eos
    tokens = ids[:, :-1]
    grids = torch.cat([ex.image_grid_thw for ex in examples])
    positions = compute_mrope_position_ids(tokens, grids, cfg.model.image_token_id, cfg.vision.spatial_merge_size,
                                           real)
    if not cfg.model.mrope_section:
        positions = positions[0]
    return MicroBatch(tokens=tokens.contiguous(), labels=ids[:, 1:].contiguous(), loss_mask=loss_mask,
                      position_ids=positions, pixel_values=torch.cat([ex.pixel_values for ex in examples]),
                      image_grid_thw=grids)


def check_train_shards(path: str) -> None:
    """One-line errors, before any process group starts, for a missing or empty shard directory."""
    if not path:
        raise PapoError("data.train_shards is empty; point it at a shard directory, e.g. "
                        "python tools/make_synthetic.py --split train --num 2000 --out data/synth/train")
    try:
        load_index(path)
    except PapoError as err:
        raise PapoError(f"data.train_shards={path}: {err}") from None


def sft_config(cfg: Config) -> Config:
    """The config the shared training pieces read: train.* takes the sft section's batch and LR."""
    s = cfg.sft
    # The schedule the sft.lr doc promises: 5% linear warmup, then cosine down to 10% of the peak.
    train = replace(cfg.train, steps=s.steps, lr=s.lr, micro_batch_size=s.micro_batch_size,
                    global_batch_size=s.global_batch_size, lr_schedule="cosine", warmup_steps=s.steps // 20,
                    min_lr=0.1 * s.lr)
    return set_explicit_keys(replace(cfg, train=train), explicit_keys(cfg))  # model directories need them


def sft_paths(cfg: Config) -> tuple[Path, Path]:
    """(the model directory sft writes, its run directory RUN_DIR/sft_run): checkpoints, metrics,
    TensorBoard, plots and config of SFT live apart from RL's, which shares run.run_dir."""
    return Path(cfg.sft.out or Path(cfg.run.run_dir) / "sft"), Path(cfg.run.run_dir) / SFT_RUN


def _resume(cfg: Config, run_dir: Path, out: Path, chunks, optimizer, scheduler, stream, groups, overwrite: bool,
            allow_config_change: bool) -> tuple[int, list[dict]]:
    """(the step to continue after, the step log so far): from RUN_DIR/sft_run's checkpoint, as train does."""
    from papo_mega.checkpoint import load_training_checkpoint, prepare_resume, run_files
    from papo_mega.config_diff import BENIGN_SFT

    evidence, outputs = run_files(run_dir, out)
    resume = prepare_resume(cfg, run_dir, evidence=evidence, outputs=outputs, benign=BENIGN_SFT, overwrite=overwrite,
                            allow_config_change=allow_config_change, command="sft")
    if resume is None:
        return 0, []
    state = load_training_checkpoint(resume, chunks, optimizer, scheduler, groups,
                                     load_optimizer=cfg.checkpoint.load_optimizer)
    rank_state = state.get("rank_state") or {}
    if "stream" in rank_state:
        stream.load_state_dict(rank_state["stream"])
    stream.skips.totals.update(rank_state.get("skips", {}))  # max_skip_fraction judges the whole run
    if groups.rank == 0:
        print(f"[papo-mega] sft: resumed from {resume} at step {state['step']}", flush=True)
    return int(state["step"]), log_from_metrics(run_dir, int(state["step"]))


def log_from_metrics(run_dir: Path, upto: int) -> list[dict]:
    """The sft_log.json rows of steps 1..upto, read back from RUN_DIR/sft_run/metrics.jsonl (JSON
    floats round-trip exactly, so a resumed log equals the uninterrupted one)."""
    from papo_mega.metrics import METRICS_FILE

    path = run_dir / METRICS_FILE
    rows = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if record.get("step", 0) <= upto and LOSS_TAG in record:
            rows[record["step"]] = {"step": record["step"], "loss": record[LOSS_TAG],
                                    "grad_norm": record["optim/grad_norm"], "wall_s": record["time/elapsed_s"]}
    return [rows[k] for k in sorted(rows)]


def _train_step(chunks, optimizer, scheduler, groups, examples: list[Example], pad_id: int, cfg: Config):
    """One optimizer step on this rank's examples: (loss, grad norm)."""
    mbs = cfg.sft.micro_batch_size
    seq_len = step_seq_len(examples, cfg.model)
    microbatches = [collate(examples[i : i + mbs], seq_len, pad_id, cfg)  # on the host: the forward step moves each
                    for i in range(0, len(examples), mbs)]
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    loss = forward_backward(chunks, microbatches, groups)
    _, grad_norm, _ = optimizer.step()
    scheduler.step(increment=1)
    return loss, float(grad_norm or 0.0)


def run_sft(cfg: Config, *, overwrite: bool = False, allow_config_change: bool = False) -> Path:
    """Train cfg.sft.steps steps on cfg.data.train_shards; return the model directory written.

    Resumable like train (checkpoint.resume, default auto; checkpoints every checkpoint.save_every
    steps and at the end, in RUN_DIR/sft_run/checkpoints); `overwrite` / `allow_config_change` as
    for run_train (checkpoint.prepare_resume)."""
    from papo_mega.checkpoint import save_training_checkpoint
    from papo_mega.data.tokenizer import load_tokenizer
    from papo_mega.distributed import init_job, shutdown_distributed
    from papo_mega.metrics import MetricsLogger
    from papo_mega.model_dir import init_from_model, save_model_dir
    from papo_mega.models.qwen_vl import build_model_chunks
    from papo_mega.optim import attach_grad_finalisation, build_optimizer, build_scheduler, wrap_ddp
    from papo_mega.plots import plot_run

    check_train_shards(cfg.data.train_shards)
    cfg = sft_config(cfg)
    groups = init_job(cfg)
    try:
        is_main = groups.rank == 0
        out, run_dir = sft_paths(cfg)
        if is_main:
            print(f"[papo-mega] sft: {groups.layout.describe()}, {cfg.sft.steps} steps of "
                  f"{cfg.sft.global_batch_size} samples from {cfg.data.train_shards}", flush=True)
        if cfg.algo.init_from:  # the stored architecture, settings and tokenizer; explicit keys win
            cfg, chunks = init_from_model(cfg, cfg.algo.init_from, groups)
        else:
            chunks = build_model_chunks(cfg.model, cfg.vision, groups, cfg.train.seed)
        if not cfg.vision.enabled:
            raise PapoError("sft trains on images; set vision.enabled=true (or preset=tiny / a Qwen2.5-VL preset)")
        use_distopt = cfg.parallel.use_distributed_optimizer
        chunks = wrap_ddp(chunks, groups, use_distopt)
        attach_grad_finalisation(chunks)
        optimizer = build_optimizer(chunks, cfg.train, use_distopt, cfg.model.precision)
        scheduler = build_scheduler(optimizer, cfg.train, cfg.sft.steps)
        tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.model)

        # Every TP/PP rank of one replica reads the same DP share, so all of them see the same samples.
        stream = ShardStream(cfg.data.train_shards, dp_rank=groups.dp_rank, dp_size=groups.layout.dp_size,
                             seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                             num_workers=cfg.data.num_workers, max_skip_fraction=cfg.data.max_skip_fraction,
                             transform=partial(make_example, tokenizer=tokenizer, cfg=cfg))
        start, log = _resume(cfg, run_dir, out, chunks, optimizer, scheduler, stream, groups, overwrite,
                             allow_config_change)
        if is_main:
            save_config(cfg, run_dir)
        samples = iter(stream)
        per_rank = cfg.sft.global_batch_size // groups.layout.dp_size
        elapsed = log[-1]["wall_s"] if log else 0.0
        logger = MetricsLogger(run_dir, cfg.run.tensorboard, is_main, start_step=start + 1)
        bar = tqdm(range(start, cfg.sft.steps), desc="sft", disable=not (is_main and sys.stderr.isatty()))
        for step in bar:
            began = time.perf_counter()
            loss, grad_norm = _train_step(chunks, optimizer, scheduler, groups,
                                          [next(samples) for _ in range(per_rank)], tokenizer.pad_id, cfg)
            step_s = time.perf_counter() - began
            elapsed = round(elapsed + step_s, 3)
            log.append({"step": step + 1, "loss": loss, "grad_norm": grad_norm, "wall_s": elapsed})
            # Logged before the checkpoint: metrics.jsonl always reaches the checkpoint's step.
            logger.log(step + 1, {LOSS_TAG: loss, "optim/grad_norm": grad_norm,
                                  "optim/lr": optimizer.param_groups[0]["lr"], "time/step_s": step_s,
                                  "time/elapsed_s": elapsed})
            done = step + 1
            if (cfg.checkpoint.save_every and done % cfg.checkpoint.save_every == 0) or done == cfg.sft.steps:
                save_training_checkpoint(run_dir, done, chunks, optimizer, scheduler,
                                         {"stream": stream.state_dict(), "skips": dict(stream.skips.totals)}, cfg, groups)
            bar.set_postfix(loss=f"{loss:.4f}")
            if is_main and done % cfg.train.log_every == 0:
                tqdm.write(f"sft step {done:4d}/{cfg.sft.steps}  loss {loss:.4f}  grad_norm {grad_norm:.3f}",
                           file=sys.stdout)
        bar.close()
        logger.close()
        save_model_dir(chunks, out, cfg.model, cfg.vision, groups, cfg=cfg)
        if is_main:
            (out / LOG_NAME).write_text(json.dumps(log, indent=1))
            plot_run(run_dir)
            curve = f" (loss {log[0]['loss']:.3f} -> {log[-1]['loss']:.3f})" if log else ""
            print(f"[papo-mega] sft: model directory {out}{curve}; checkpoints, metrics, TensorBoard and plots in "
                  f"{run_dir}", flush=True)
        return out
    finally:
        shutdown_distributed()
