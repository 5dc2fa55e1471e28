"""The CUDA->CPU redirections: what they change, that they undo, and that CUDA machines refuse them."""

import pytest
import torch

from papo_mega.distributed import cpu_mode


def test_cuda_device_arguments_go_to_cpu(cpu_mode_on):
    assert torch.zeros(3, device="cuda").device.type == "cpu"
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.ones(2).to("cuda").device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"
    assert torch.nn.Linear(2, 2).cuda().weight.device.type == "cpu"
    torch.cuda.synchronize()  # a no-op, not an error


def test_tensor_type_names_match_megatrons_checks(cpu_mode_on):
    assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
    assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.zeros(1).type("torch.cuda.HalfTensor").dtype == torch.float16


def test_megatron_rng_tracker_forks_the_cpu_generator(cpu_mode_on):
    from megatron.core.tensor_parallel import random as mp_random

    mp_random.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0)
    tracker = mp_random.get_cuda_rng_tracker()
    torch.manual_seed(0)
    outside_before = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outside_before), "fork must restore the default stream"
    with tracker.fork():
        second = torch.rand(3)
    assert not torch.equal(first, second), "the tracked stream must advance between forks"
    # Re-seeding reproduces the tracked stream.
    mp_random.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0, force_reset_rng=True)
    with mp_random.get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(3), first)


def test_disable_restores_everything():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    original_cuda = torch.Tensor.cuda
    cpu_mode.enable_cpu_mode()
    assert cpu_mode.is_cpu_mode()
    cpu_mode.disable_cpu_mode()
    assert not cpu_mode.is_cpu_mode()
    assert torch.Tensor.cuda is original_cuda
    assert torch.zeros(1).type() == "torch.FloatTensor"


def test_refuses_on_cuda_machines(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="must never be enabled on a machine with CUDA"):
        cpu_mode.enable_cpu_mode()
    assert not cpu_mode.is_cpu_mode()
