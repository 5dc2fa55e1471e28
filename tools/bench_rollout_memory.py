#!/usr/bin/env python
"""Rollout memory with and without chunks (rollout.max_batch_rows), measured against the planner.

    .venv/bin/python tools/bench_rollout_memory.py [--prompts 16] [--n 8] [--rows 32] [--prompt-len 128] [--new 128]

One process per case (a fresh peak): builds a text-only fp32 decoder (8 layers, hidden 512, GQA
8 heads / 4 groups, vocab 4096), warms the engine up on one prompt, then records how far one
`generate` of prompts x n rows (sampled, no stop token: every row runs to --new tokens) raises the
process's peak resident memory above that baseline - once decoding all rows together, once in
chunks of --rows. Prints it next to the planner's rollout terms (KV cache + prefill transient,
`cpu` profile), and the chunked / whole ratios.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODEL = dict(num_layers=8, hidden_size=512, ffn_hidden_size=1408, num_attention_heads=8, num_query_groups=4,
             vocab_size=4096, max_seq_len=2048)


def measure(prompts: int, n: int, rows: int, prompt_len: int, new: int) -> dict:
    """Added peak RSS (bytes) and seconds of one generate call on one process."""
    import gc
    import warnings

    import torch

    from papo_mega.metrics import peak_rss_bytes, rss_bytes

    warnings.filterwarnings("ignore")
    from papo_mega.config import ModelConfig, RolloutConfig
    from papo_mega.distributed import init_distributed
    from papo_mega.models.qwen_vl import build_model_chunks
    from papo_mega.rollout.engine import MegatronEngine
    from papo_mega.types import RolloutPrompt

    groups = init_distributed({}, seed=1)
    cfg = ModelConfig(**MODEL)
    chunks = build_model_chunks(cfg, None, groups)
    for chunk in chunks:
        chunk.eval()
    engine = MegatronEngine(chunks, groups, cfg, 2, [], 0)
    gen = torch.Generator().manual_seed(0)
    batch = [RolloutPrompt(torch.randint(10, MODEL["vocab_size"], (prompt_len - i % 4,), generator=gen), None, None)
             for i in range(prompts)]
    engine.generate(batch[:1], RolloutConfig(n=1, max_new_tokens=4), seed=0, step=0)  # warm-up
    gc.collect()
    baseline = rss_bytes()
    start = time.perf_counter()
    engine.generate(batch, RolloutConfig(n=n, top_p=1.0, max_new_tokens=new, max_batch_rows=rows), seed=0, step=1)
    seconds = time.perf_counter() - start
    return {"added": peak_rss_bytes() - baseline, "s": seconds}


def planned(prompts: int, n: int, rows: int, prompt_len: int, new: int) -> float:
    from papo_mega.config import ModelConfig
    from papo_mega.plan import DEVICES, Layout, Workload, estimate_memory

    work = Workload(seq_len=prompt_len + new, micro_batch_rows=1, nograd_rows=0, rows_per_update=prompts * n,
                    updates=1, rollout_prompts=prompts, rollout_n=n, rollout_batch_rows=rows,
                    prompt_len=prompt_len, max_new_tokens=new)
    e = estimate_memory(ModelConfig(**MODEL), None, Layout(1, 1, 1), work, DEVICES["cpu"])
    return e.kv_cache + e.rollout_transient


def main() -> None:
    from papo_mega.distributed.spawn import run_distributed

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--rows", type=int, default=32, help="rollout.max_batch_rows of the chunked case")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    args = parser.parse_args()
    shape = (args.prompts, args.n)
    results = {}
    for rows in (0, args.rows):
        case = (*shape, rows, args.prompt_len, args.new)
        measured = run_distributed(measure, 1, args=case, timeout_s=3600, use_cuda=True)[0]
        results[rows] = (measured, planned(*case))
        label = "all rows" if rows == 0 else f"chunks of {rows} rows"
        print(f"{label:>18}: measured +{measured['added'] / 1e6:.0f} MB in {measured['s']:.0f} s, "
              f"planner (KV + prefill) {results[rows][1] / 1e6:.0f} MB", flush=True)
    (whole, whole_plan), (chunked, chunked_plan) = results[0], results[args.rows]
    print(f"chunked / all rows: measured memory {chunked['added'] / whole['added']:.2f}x, planner "
          f"{chunked_plan / whole_plan:.2f}x, time {chunked['s'] / whole['s']:.2f}x")


if __name__ == "__main__":
    main()
