"""GPU tier: Transformer Engine spec vs local spec in bf16, and an FP8 forward+backward (tiny preset)."""

import pytest
import torch

from tests.distributed.harness import run_distributed

pytest.importorskip("transformer_engine.pytorch", reason="needs Transformer Engine (pip install papo_mega[gpu])")


def _loss_with(precision: str, force_local: bool):
    import torch.distributed as dist

    from papo_mega.config import load_config
    from papo_mega.distributed import init_distributed
    from papo_mega.lm_step import forward_backward
    from papo_mega.models import gpt
    from papo_mega.models.qwen_vl import build_model_chunks
    from papo_mega.optim import attach_grad_finalisation, wrap_ddp
    from tests.distributed.workers import vlm_microbatches

    if force_local:
        gpt.transformer_engine_usable = lambda: False
    cfg = load_config(None, ["preset=tiny", f"model.precision={precision}", "vision.enabled=false"])
    groups = init_distributed({}, seed=1)
    chunks = wrap_ddp(build_model_chunks(cfg.model, None, groups, seed=3), groups, False)
    attach_grad_finalisation(chunks)
    text_only = [mb.to(groups.device) for mb in vlm_microbatches(cfg.model, cfg.vision, 2)]
    for mb in text_only:  # no images: replace placeholders by ordinary tokens
        mb.tokens[mb.tokens == cfg.model.image_token_id] = 1
        mb.pixel_values = mb.image_grid_thw = None
    loss = forward_backward(chunks, text_only, groups)
    norm = sum(float(p.main_grad.float().norm() ** 2) for c in chunks for p in c.parameters()) ** 0.5
    return {"loss": loss, "grad_norm": norm} if dist.get_rank() == 0 else None


def test_te_spec_matches_local_spec_in_bf16():
    te = run_distributed(_loss_with, 1, args=("bf16", False), use_cuda=True)[0]
    local = run_distributed(_loss_with, 1, args=("bf16", True), use_cuda=True)[0]
    assert te["loss"] == pytest.approx(local["loss"], rel=2e-2)
    assert te["grad_norm"] == pytest.approx(local["grad_norm"], rel=5e-2)


def test_fp8_forward_backward_runs_and_stays_close_to_bf16():
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("FP8 needs Hopper or newer")
    fp8 = run_distributed(_loss_with, 1, args=("fp8", False), use_cuda=True)[0]
    bf16 = run_distributed(_loss_with, 1, args=("bf16", False), use_cuda=True)[0]
    assert torch.isfinite(torch.tensor(fp8["loss"]))
    assert fp8["loss"] == pytest.approx(bf16["loss"], rel=5e-2)
