#!/usr/bin/env python
"""FP8 vs bf16 on one GPU: step time and loss of LM training steps on a Qwen2.5-VL-7B-shaped slice.

    python tools/bench_fp8.py [--layers 4] [--steps 20] [--seq 2048] [--recipe tensorwise|delayed]

Issue 9's GPU check (docs/scaling.md, "FP8"). Builds the 7B preset's language model cut to --layers
decoder layers twice - model.precision bf16 and fp8 (Transformer Engine, --recipe scaling) - from
the same seed, trains each for --steps LM steps on the same synthetic batches (lm_step.make_lm_batch)
and prints the median step time after 3 warm-up steps, the fp8/bf16 time ratio, and both loss
curves with their largest gap. Needs CUDA and Transformer Engine; anything else is a one-line exit.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

WARMUP = 3


def run(precision: str, args) -> dict:
    import torch

    from papo_mega.config import TrainConfig, load_config
    from papo_mega.distributed import init_distributed, shutdown_distributed
    from papo_mega.lm_step import make_lm_batch, train_step
    from papo_mega.models.qwen_vl import build_model_chunks
    from papo_mega.optim import attach_grad_finalisation, build_optimizer, wrap_ddp

    overrides = ["preset=qwen2.5-vl-7b", f"model.num_layers={args.layers}", "vision.enabled=false",
                 f"model.precision={precision}", f"model.fp8_recipe={args.recipe}"]
    cfg = load_config(None, overrides)
    groups = init_distributed({}, seed=1)
    chunks = wrap_ddp(build_model_chunks(cfg.model, None, groups, seed=7), groups, use_distributed_optimizer=True)
    attach_grad_finalisation(chunks)
    train = TrainConfig(seq_len=args.seq, micro_batch_size=1, global_batch_size=args.batch, lr=1e-5, seed=3)
    optimizer = build_optimizer(chunks, train, True, precision)
    losses, times = [], []
    for step in range(args.steps + WARMUP):
        batch = make_lm_batch(args.batch, args.seq, cfg.model.vocab_size, 3, step)
        torch.cuda.synchronize()
        start = time.perf_counter()
        metrics = train_step(chunks, optimizer, batch, groups, 1)
        torch.cuda.synchronize()
        if step >= WARMUP:
            times.append(time.perf_counter() - start)
            losses.append(float(metrics["loss"]))
    peak = torch.cuda.max_memory_allocated()
    shutdown_distributed()
    return {"step_s": statistics.median(times), "losses": losses, "peak_gb": peak / 1e9}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="timed steps after 3 warm-up steps")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (micro-batches of 1)")
    parser.add_argument("--recipe", default="tensorwise", help="model.fp8_recipe (tensorwise | delayed | ...)")
    args = parser.parse_args()

    import torch

    from papo_mega.distributed.spawn import run_distributed
    from papo_mega.models.gpt import transformer_engine_usable

    if not torch.cuda.is_available() or not transformer_engine_usable():
        print("bench_fp8: needs CUDA and Transformer Engine (pip install papo_mega[gpu] on a GPU machine)",
              file=sys.stderr)
        return 2
    results = {p: run_distributed(run, 1, args=(p, args), timeout_s=1800, use_cuda=True)[0] for p in ("bf16", "fp8")}
    bf16, fp8 = results["bf16"], results["fp8"]
    for name, r in results.items():
        print(f"{name:>5}: {r['step_s'] * 1e3:.0f} ms/step, peak {r['peak_gb']:.1f} GB, loss "
              f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}")
    gap = max(abs(a - b) for a, b in zip(bf16["losses"], fp8["losses"]))
    print(f"fp8 / bf16 step time: {fp8['step_s'] / bf16['step_s']:.2f}x; largest loss gap {gap:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
