"""Workers for the SFT tests (module level: the harness pickles them into spawned ranks)."""

from __future__ import annotations

import json

import torch.distributed as dist


def sft_job(overrides: list[str]) -> dict | None:
    """run_sft on the tiny preset under the harness's launcher env; rank 0 returns its step log."""
    from papo_mega.config import load_config
    from papo_mega.sft import LOG_NAME, run_sft

    out = run_sft(load_config(None, ["preset=tiny", *overrides]))
    # run_sft has shut the process groups down; the launcher's RANK says who reports.
    from papo_mega.distributed import detect_launch

    if detect_launch().rank != 0:
        return None
    return {"out": str(out), "log": json.loads((out / LOG_NAME).read_text())}


def greedy_scores(model_dir: str | None, shards: str, questions: int, seed: int) -> dict | None:
    """Greedy answers to the first questions of `shards`: format rate and accuracy.

    model_dir None: the random initialisation run_sft starts from (tiny preset, train.seed=seed).
    """
    from dataclasses import replace

    from papo_mega.config import load_config
    from papo_mega.data.tokenizer import load_tokenizer
    from papo_mega.distributed import init_distributed
    from papo_mega.evaluate import evaluate
    from papo_mega.model_dir import load_model_dir
    from papo_mega.models.qwen_vl import build_model_chunks
    from papo_mega.rollout.engine import MegatronEngine

    cfg = load_config(None, ["preset=tiny", f"train.seed={seed}", "rollout.temperature=0",
                             "rollout.max_new_tokens=24"])
    groups = init_distributed({}, seed=seed)
    if model_dir is None:
        chunks, model, vision = build_model_chunks(cfg.model, cfg.vision, groups, seed), cfg.model, cfg.vision
    else:
        chunks, _, model, vision = load_model_dir(model_dir, groups)
    cfg = replace(cfg, model=model, vision=vision)
    for chunk in chunks:
        chunk.eval()
    tokenizer = load_tokenizer("", model)
    engine = MegatronEngine(chunks, groups, model, vision.spatial_merge_size, [tokenizer.eos_id], tokenizer.pad_id)
    result = evaluate(engine, tokenizer, cfg, groups, shards, k=1, max_samples=questions, batch_prompts=questions,
                      views=("original",), show_progress=False)
    if dist.get_rank() != 0:
        return None
    return {"format": result["format_rate"]["original"], "accuracy": result["accuracy"]["original"]["overall"]}
