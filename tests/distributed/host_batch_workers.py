"""Workers for test_host_microbatches.py and test_gpu_syncs.py: host-to-device bytes and host syncs under device tagging."""

from __future__ import annotations

import torch
import torch.distributed as dist

from papo_mega.algo.policy import attach_old_logprobs, papo_forward_backward
from papo_mega.config import load_config
from papo_mega.distributed import init_distributed
from papo_mega.distributed.device_check import (
    EMULATED_DEVICE,
    HOST,
    device_tagging,
    emulated_groups,
    place_of,
    set_place,
)
from papo_mega.models.qwen_vl import build_model_chunks
from papo_mega.optim import attach_grad_finalisation, wrap_ddp
from papo_mega.types import LOSS_FIELDS, MODEL_FIELDS, PIXEL_FIELDS, PolicyMicroBatch
from tests.distributed.algo_workers import _concat, _loss_config, papo_batch

MICRO_BATCH = 2


def _nbytes(mb: PolicyMicroBatch, fields: tuple[str, ...]) -> int:
    return sum(t.numel() * t.element_size() for t in (getattr(mb, f) for f in fields) if isinstance(t, torch.Tensor))


def _on_host(mb: PolicyMicroBatch) -> PolicyMicroBatch:
    """Tag every field as a host tensor, as train.py's PolicyMicroBatch.to_host leaves them."""
    for value in vars(mb).values():
        if isinstance(value, torch.Tensor):
            set_place(value, HOST)
    return mb


def policy_bytes_per_forward_step(layout: dict) -> dict:
    """The no-grad log-prob forward and the PAPO update on host micro-batches under device tagging:
    host-to-device bytes between consecutive forward steps of this rank, and what each field group of
    one micro-batch weighs."""
    cfg = load_config(None, ["preset=tiny"])
    loss_cfg = _loss_config({})
    groups = init_distributed(layout, seed=1234)
    chunks = wrap_ddp(build_model_chunks(cfg.model, cfg.vision, groups, seed=11), groups, use_distributed_optimizer=False)
    attach_grad_finalisation(chunks)
    pieces = papo_batch(cfg.model, cfg.vision)
    host = [_on_host(_concat(pieces[i : i + MICRO_BATCH])) for i in range(0, len(pieces), MICRO_BATCH)]
    on_device = emulated_groups(groups)
    with device_tagging(chunks) as tags:
        marks: list[int] = []
        hooks = [c.register_forward_pre_hook(lambda *_: marks.append(tags.moved_bytes)) for c in chunks]
        filled = attach_old_logprobs(chunks, on_device, host, loss_cfg, with_masked=True)
        nograd_steps = len(marks)
        logprobs_on_host = all(place_of(mb.old_logp) == HOST and place_of(mb.masked_logp) == HOST for mb in filled)
        # ref_logp as the reference model's forward would attach it (on the host, like old_logp).
        filled = [_on_host(mb.__class__(**{**vars(mb), "ref_logp": mb.old_logp.clone()})) for mb in filled]
        papo_forward_backward(chunks, on_device, filled, loss_cfg)
        for hook in hooks:
            hook.remove()
        total = tags.moved_bytes
    steps = [b - a for a, b in zip([0, *marks], marks)]
    mb = filled[0]
    return {
        "rank": dist.get_rank(), "first": groups.is_first_stage, "last": groups.is_last_stage,
        "nograd_steps": steps[:nograd_steps], "update_steps": steps[nograd_steps:], "total": total,
        "count": len(host), "model": _nbytes(mb, MODEL_FIELDS), "pixels": _nbytes(mb, PIXEL_FIELDS),
        "loss": _nbytes(mb, LOSS_FIELDS), "targets": _nbytes(mb, ("targets",)),
        "logprobs_on_host": logprobs_on_host,
    }


def vision_tower_host_syncs(depths: tuple[int, ...]) -> dict[int, int]:
    """depth -> host syncs of one vision-tower forward on host-made pixels, under device tagging."""
    from papo_mega.config import VisionConfig
    from papo_mega.models.vision import QwenVisionTower
    from tests.distributed.vision_workers import CASES, make_images

    groups = init_distributed({}, seed=1234)
    case = CASES["a"]
    syncs = {}
    for depth in depths:
        vision_cfg = VisionConfig(enabled=True, **{**case["vision"], "depth": depth, "fullatt_block_indexes": [depth - 1]})
        tower = QwenVisionTower(vision_cfg, case["out_hidden_size"], groups, seed=3)
        pixels, grid = make_images(case)
        with device_tagging([tower]) as tags:
            set_place(pixels, HOST)
            set_place(grid, HOST)
            with torch.no_grad():
                tower(pixels.to(EMULATED_DEVICE), grid.to(EMULATED_DEVICE))
        syncs[depth] = tags.host_syncs
    return syncs


def grad_check_host_syncs() -> dict:
    """train.nonfinite_grad_flag on DDP chunks under device tagging: host syncs and the flag, with
    finite gradients and with one inf planted in the last parameter's main_grad."""
    from papo_mega.train import nonfinite_grad_flag

    cfg = load_config(None, ["preset=tiny"])
    groups = init_distributed({}, seed=1234)
    chunks = wrap_ddp(build_model_chunks(cfg.model, cfg.vision, groups, seed=11), groups, use_distributed_optimizer=False)
    params = [p for c in chunks for p in c.parameters() if getattr(p, "main_grad", None) is not None]
    out = {"params": len(params)}
    with device_tagging(chunks) as tags:
        finite = nonfinite_grad_flag(chunks, EMULATED_DEVICE)
        out["syncs"] = tags.host_syncs
        out["flag_device"] = place_of(finite)
        params[-1].main_grad.view(-1)[0] = float("inf")
        out["finite_flag"], out["inf_flag"] = finite.item(), nonfinite_grad_flag(chunks, EMULATED_DEVICE).item()
    return out
