"""Evaluation: avg@k accuracy, format rate and accuracy among well-formed answers per task and
image view, the chance level, and format-aware vision reliance (eval_metrics.py defines them).

Every question is answered k times with the original image, the PAPO-masked image and a blank
(all-black) image. A model that looks at the image scores clearly higher on the original among
well-formed answers; one that answers from the text alone scores the same on all three. A view
whose answers lose the format gets no reliance figure: that is format breakage, not perception.
Writes eval.json and eval.md.

    papo-mega eval --ckpt MODEL_DIR --data SHARDS [--k 8] [--max-samples N] [--config RECIPE] [overrides]

MODEL_DIR is a model directory (RUN_DIR/final, sft output, a converted model) or a training
checkpoint (RUN_DIR/checkpoints/step_N); its stored image, prompt, rollout and reward settings and
its tokenizer apply unless the recipe or an override sets them (model_dir.config_from_model).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch.distributed as dist
from tqdm import tqdm

from papo_mega.config import Config
from papo_mega.data.image import BadImage
from papo_mega.data.prepare import PreparedPrompt, prepare_prompt
from papo_mega.data.prompts import PromptTooLong
from papo_mega.data.shards import ShardStream
from papo_mega.data.synthetic_shards import synthetic_chance
from papo_mega.distributed.runtime import ParallelGroups
from papo_mega.eval_metrics import OVERALL, add_answer, markdown_table, merge_counts, new_cell, tables
from papo_mega.reward import score_batch

EVAL_VIEWS = ("original", "masked", "blank")
EVAL_STEP = 0
"""Masks in evaluation are drawn as at step 0: every evaluation of a run sees the same masks."""


def _batches(stream, size: int):
    batch = []
    for item in stream:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _view_prompts(prepared: list[PreparedPrompt], view: str):
    if view == "original":
        return [p.prompt for p in prepared]
    return [replace(p.prompt, pixel_values=p.views[view]) for p in prepared]


def evaluate(engine, tokenizer, cfg: Config, groups: ParallelGroups, shards: str, k: int,
             max_samples: int | None = None, batch_prompts: int = 8, views: tuple[str, ...] = EVAL_VIEWS,
             show_progress: bool = True) -> dict:
    """Accuracy tables on every rank (DP ranks split the questions; sums are all-gathered)."""
    # k answers per question; a chunk holds at least one question's k rows (rollout.max_batch_rows < k
    # would otherwise be refused mid-training, e.g. n=5 chunks of 5 with eval_k=8).
    rows = cfg.rollout.max_batch_rows and max(cfg.rollout.max_batch_rows, k)
    params = replace(cfg.rollout, n=k, max_batch_rows=rows)
    if max_samples is not None:  # a total over data-parallel ranks, which split the questions
        dp, rank = groups.layout.dp_size, groups.dp_rank
        max_samples = max_samples // dp + (1 if rank < max_samples % dp else 0)
    stream = ShardStream(shards, dp_rank=groups.dp_rank, dp_size=groups.layout.dp_size, seed=cfg.train.seed,
                         shuffle_buffer=0, epochs=1, max_skip_fraction=cfg.data.max_skip_fraction)
    sums: dict = defaultdict(lambda: defaultdict(new_cell))  # eval_metrics.new_cell says what a cell counts
    skipped = defaultdict(int)
    seen = 0
    total = min(stream.epoch_length, max_samples or stream.epoch_length)
    bar = tqdm(total=total, desc="eval", unit="q", disable=not (show_progress and groups.rank == 0))
    for items in _batches(stream, batch_prompts):
        if max_samples is not None:
            items = items[: max(0, max_samples - seen)]
        if not items:
            break
        prepared = []
        for item in items:
            try:
                prepared.append(prepare_prompt(item, tokenizer, cfg.data, cfg.vision, cfg.train.seed, EVAL_STEP,
                                               views=tuple(v for v in views if v != "original")))
            except (PromptTooLong, BadImage) as err:
                skipped[type(err).__name__] += 1
                stream.reject(item, str(err))  # data.max_skip_fraction, as in training
        seen += len(items)
        bar.update(len(items))
        if not prepared:
            continue
        for view in views:
            out = engine.generate(_view_prompts(prepared, view), params, seed=cfg.train.seed, step=EVAL_STEP)
            texts = [tokenizer.decode(out.response_ids[r, : int(out.lengths[r])].tolist())
                     for r in range(len(out.lengths))]
            truths = [prepared[int(g)].answer for g in out.prompt_index]
            for g, result in zip(out.prompt_index.tolist(), score_batch(texts, truths, cfg.reward)):
                for task in (prepared[g].task, OVERALL):
                    add_answer(sums[view][task], result.accuracy, result.format)
        if max_samples is not None and seen >= max_samples:
            break
    bar.close()
    local = {view: {task: list(cell) for task, cell in tasks.items()} for view, tasks in sums.items()}
    gathered = [None] * groups.layout.dp_size
    dist.all_gather_object(gathered, {"sums": local, "skipped": dict(skipped)}, group=groups.dp)
    return _tables(gathered, k, views, synthetic_chance(shards))


def _tables(gathered: list[dict], k: int, views: tuple[str, ...], chance: dict[str, float | None]) -> dict:
    skipped: dict = defaultdict(int)
    for part in gathered:
        for reason, count in part["skipped"].items():
            skipped[reason] += count
    result = tables(merge_counts([part["sums"] for part in gathered]), k, views, chance)
    return {**result, "skipped": dict(skipped)}


def write_results(result: dict, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    (out / "eval.md").write_text(markdown_table(result))
    return out


def run_eval_cli(ckpt: str, data: str, k: int, cfg: Config, max_samples: int | None, out_dir: str | None,
                 batch_prompts: int) -> dict:
    """`papo-mega eval`: load the model directory (or training checkpoint) at the configured layout,
    evaluate with its stored settings where the config leaves them unset, write tables."""
    from papo_mega.data.tokenizer import load_tokenizer
    from papo_mega.distributed import detect_launch, init_distributed, shutdown_distributed
    from papo_mega.errors import PapoError
    from papo_mega.model_dir import init_from_model, read_model_source
    from papo_mega.rollout.engine import MegatronEngine

    if not Path(data).is_dir():
        raise PapoError(f"--data {data} is not a directory of shards; make one with tools/make_synthetic.py or make_shards.py")
    if k < 1:
        raise PapoError(f"--k {k} must be >= 1")
    read_model_source(ckpt)  # a wrong path fails before any process group starts
    launch = detect_launch()
    groups = init_distributed(cfg.parallel.layout_sizes(), launch=launch, timeout_s=cfg.parallel.timeout_s,
                              seed=cfg.train.seed)
    try:
        cfg, chunks = init_from_model(cfg, ckpt, groups)
        tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.model)
        for chunk in chunks:
            chunk.eval()
        engine = MegatronEngine(chunks, groups, cfg.model, cfg.vision.spatial_merge_size, [tokenizer.eos_id],
                                tokenizer.pad_id, decode=tokenizer.decode)
        result = evaluate(engine, tokenizer, cfg, groups, data, k, max_samples, batch_prompts,
                          show_progress=sys.stderr.isatty())
        if groups.rank == 0:
            where = write_results(result, out_dir or Path(cfg.run.run_dir) / "eval")
            print(markdown_table(result), flush=True)
            print(f"[papo-mega] eval results in {where}/eval.json and eval.md", flush=True)
        return result
    finally:
        shutdown_distributed()
