"""The foundation's end-to-end job: a tiny decoder LM trained for a few steps at any layout.

`papo-mega smoke RECIPE [overrides]` runs it under whichever launcher started us and writes
`smoke_result.json` (layout, launcher, losses) into the run directory (recipe: examples/tiny_lm.yaml).
The tests use it to check launchers and layouts; `papo-mega demo` is the PAPO job (demo.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm

from papo_mega.config import Config, save_config
from papo_mega.distributed import init_job, shutdown_distributed
from papo_mega.lm_step import make_lm_batch, train_step
from papo_mega.models.qwen_vl import build_model_chunks
from papo_mega.optim import attach_grad_finalisation, build_optimizer, wrap_ddp


def run_smoke(cfg: Config) -> dict:
    """Train cfg.train.steps steps; return (on every rank) the layout and the per-step losses."""
    groups = init_job(cfg)
    try:
        is_main = groups.rank == 0
        if is_main:
            save_config(cfg, cfg.run.run_dir)
            print(f"[papo-mega] {groups.launch.launcher}: {groups.layout.describe()}, backend {groups.backend}", flush=True)
        use_distopt = cfg.parallel.use_distributed_optimizer
        chunks = wrap_ddp(build_model_chunks(cfg.model, cfg.vision, groups, cfg.train.seed), groups, use_distopt)
        attach_grad_finalisation(chunks)
        optimizer = build_optimizer(chunks, cfg.train, use_distopt, cfg.model.precision)
        losses = []
        bar = tqdm(range(cfg.train.steps), desc="train", disable=not (is_main and sys.stderr.isatty()))
        for step in bar:
            batch = make_lm_batch(cfg.train.global_batch_size, cfg.train.seq_len, cfg.model.vocab_size,
                                  cfg.train.seed, step)
            metrics = train_step(chunks, optimizer, batch, groups, cfg.train.micro_batch_size)
            losses.append(metrics["loss"])
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            if is_main and (step + 1) % cfg.train.log_every == 0:
                tqdm.write(f"step {step + 1:4d}/{cfg.train.steps}  loss {metrics['loss']:.4f}  "
                           f"grad_norm {metrics['grad_norm']:.3f}", file=sys.stdout)
        result = {"launcher": groups.launch.launcher, "layout": groups.layout.describe(), "losses": losses}
        if is_main:
            path = Path(cfg.run.run_dir) / "smoke_result.json"
            path.write_text(json.dumps(result, indent=2))
        return result
    finally:
        shutdown_distributed()
