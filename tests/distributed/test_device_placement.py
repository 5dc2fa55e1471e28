"""Device placement on the GPU path, checked on CPU.

* The LM step's loss accumulator and `compute_full_logits`' broadcast buffer live on
  `groups.device`: run under `papo_mega.distributed.device_check.device_tagging`, which emulates
  CUDA's same-device rule ("Expected all tensors to be on the same device") and NCCL's
  device-only collectives (ProcessGroupNCCL.cpp, check_gpu_single_tensor: "Tensors must be CUDA
  and dense") with `groups.device` faked as cuda:0. Before the fix the accumulator was a host
  `torch.zeros(2)` (an in-place add of the device loss into it raises) and a non-last stage
  broadcast a host `torch.empty(...)` (NCCL rejects it).
* Micro-batches stay on the host until the schedule reaches them: the bytes copied to the device
  between two forward steps are at most one micro-batch (before, `split_microbatches` copied all
  of them before the first forward).
* `run_distributed` workers see no CUDA unless the caller opts in, so `make test` on a GPU box
  runs tests/distributed on gloo instead of putting every rank on cuda:0 under nccl.
* nccl jobs create no gloo copies of megatron's groups (nothing we run reads them).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from papo_mega.distributed.device_check import device_tagging, emulated_groups
from papo_mega.lm_step import forward_backward, make_lm_batch, split_microbatches
from papo_mega.models.forward import compute_full_logits
from papo_mega.types import ModelInputs
from tests.distributed.harness import run_distributed
from tests.distributed.workers import TINY_TRAIN, _setup

MBS = TINY_TRAIN["micro_batch_size"]


def _batch(vocab_size: int) -> torch.Tensor:
    return make_lm_batch(TINY_TRAIN["global_batch_size"], TINY_TRAIN["seq_len"], vocab_size, TINY_TRAIN["seed"], 0)


def lm_step_under_tagging(layout: dict) -> dict | None:
    """The LM step's loss without the emulation (forward only) and with it (forward and backward)."""
    groups, model_cfg, chunks = _setup(layout, {})
    plain = forward_backward(chunks, split_microbatches(_batch(model_cfg.vocab_size), groups, MBS), groups,
                             forward_only=True)
    on_device = emulated_groups(groups)
    with device_tagging(chunks):
        batch = _batch(model_cfg.vocab_size)  # made inside the mode: a host tensor
        tagged = forward_backward(chunks, split_microbatches(batch, on_device, MBS), on_device)
    return {"plain": plain, "tagged": tagged} if dist.get_rank() == 0 else None


def full_logits_under_tagging(layout: dict) -> dict | None:
    """compute_full_logits with and without the emulation; every rank returns its copy."""
    groups, model_cfg, chunks = _setup(layout, {})
    tokens = make_lm_batch(2, 12, model_cfg.vocab_size, 99, 0)[:, :-1]
    inputs = ModelInputs(tokens, torch.arange(tokens.shape[1]).expand_as(tokens).contiguous())
    plain = compute_full_logits(chunks, groups, inputs, model_cfg.vocab_size)
    with device_tagging(chunks):
        tagged = compute_full_logits(chunks, emulated_groups(groups), inputs, model_cfg.vocab_size)
    return {"plain": plain, "tagged": tagged, "last_stage": groups.is_last_stage}


def bytes_moved_per_forward_step(layout: dict) -> dict:
    """Host-to-device bytes copied before each forward step, and one micro-batch's size."""
    groups, model_cfg, chunks = _setup(layout, {})
    on_device = emulated_groups(groups)
    with device_tagging(chunks) as tags:
        marks: list[int] = []
        hooks = [c.register_forward_pre_hook(lambda *_: marks.append(tags.moved_bytes)) for c in chunks]
        microbatches = split_microbatches(_batch(model_cfg.vocab_size), on_device, MBS)
        forward_backward(chunks, microbatches, on_device)
        for hook in hooks:
            hook.remove()
    one = sum(t.numel() * t.element_size() for t in vars(microbatches[0]).values() if t is not None)
    steps = [b - a for a, b in zip([0, *marks], marks)]
    return {"per_step": steps, "one_microbatch": one, "count": len(microbatches)}


@pytest.mark.parametrize("layout", [{}, {"pp_size": 2}], ids=["single", "pp2"])
def test_lm_step_reduces_on_the_groups_device(layout):
    world = 2 if layout else 1
    out = run_distributed(lm_step_under_tagging, world, args=(layout,), timeout_s=180)[0]
    assert out["tagged"] == pytest.approx(out["plain"], abs=1e-6)


def test_full_logits_broadcast_from_a_device_buffer_on_every_stage():
    results = run_distributed(full_logits_under_tagging, 2, args=({"pp_size": 2},), timeout_s=180)
    assert [r["last_stage"] for r in results] == [False, True]
    for r in results:
        assert torch.equal(r["tagged"], r["plain"])
    assert torch.equal(results[0]["tagged"], results[1]["tagged"])


def test_microbatches_move_to_the_device_one_forward_step_at_a_time():
    out = run_distributed(bytes_moved_per_forward_step, 1, args=({},), timeout_s=180)[0]
    assert len(out["per_step"]) == out["count"] == 4
    assert all(0 < moved <= out["one_microbatch"] for moved in out["per_step"]), out


def cuda_as_the_worker_sees_it() -> dict:
    from papo_mega.distributed.runtime import default_backend

    return {"visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "count": torch.cuda.device_count(),
            "available": torch.cuda.is_available(), "backend": default_backend()}


def test_workers_see_no_cuda_by_default():
    seen = run_distributed(cuda_as_the_worker_sees_it, 2, timeout_s=120)
    assert all(s == {"visible": "", "count": 0, "available": False, "backend": "gloo"} for s in seen), seen


def test_workers_keep_cuda_when_asked(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")  # the parent's value passes through untouched
    assert run_distributed(cuda_as_the_worker_sees_it, 1, use_cuda=True, timeout_s=120)[0]["visible"] == "7"
    explicit = run_distributed(cuda_as_the_worker_sees_it, 1, env={"CUDA_VISIBLE_DEVICES": "3"}, timeout_s=120)
    assert explicit[0]["visible"] == "3"


def gloo_copies_for_an_nccl_job() -> bool:
    """Re-create megatron's groups as an nccl job would (over this gloo world): any gloo copies?"""
    from megatron.core import parallel_state

    from papo_mega.distributed.runtime import init_distributed, init_megatron_groups

    groups = init_distributed({})
    init_megatron_groups(groups.layout, groups.launch, "nccl", groups.device, seed=1)
    return parallel_state._DATA_PARALLEL_GROUP_GLOO is not None


def test_nccl_jobs_create_no_gloo_groups():
    assert run_distributed(gloo_copies_for_an_nccl_job, 1, timeout_s=120) == [False]
