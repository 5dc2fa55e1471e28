"""The device-tagging emulation itself (`papo_mega.distributed.device_check`): it raises where CUDA
and NCCL would, lets through what they allow, and leaves nothing patched behind.

CUDA's rule: operands of one op on one device ("Expected all tensors to be on the same device"),
0-dim CPU tensors excepted; NCCL's: ProcessGroupNCCL.cpp, check_gpu_single_tensor, "Tensors must
be CUDA and dense". The end-to-end checks (LM step, full logits) are in
tests/distributed/test_device_placement.py.
"""

import pytest
import torch
import torch.distributed as dist

from papo_mega.distributed.device_check import DEVICE, EMULATED_DEVICE, HOST, device_tagging, place_of

SAME_DEVICE = "Expected all tensors to be on the same device"


@pytest.fixture
def one_rank_gloo():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_refuses_without_cpu_mode():
    with pytest.raises(RuntimeError, match="CPU mode"), device_tagging():
        pass


def test_places_follow_factories_moves_and_ops(cpu_mode_on):
    weight = torch.nn.Parameter(torch.ones(3))
    with device_tagging([torch.nn.ParameterList([weight])]):
        host = torch.zeros(3)
        moved = host.to(EMULATED_DEVICE)
        assert (place_of(host), place_of(moved)) == (HOST, DEVICE)  # a copy: the source stays put
        assert place_of(torch.zeros(3, device="cuda")) == place_of(torch.empty(2, device=0)) == DEVICE
        assert place_of(torch.ones(2).cuda()) == DEVICE
        assert place_of(weight * 2) == DEVICE and place_of(moved.cpu()) == HOST
        assert weight.device == EMULATED_DEVICE and host.device.type == "cpu"
        assert place_of(torch.arange(3, device=weight.device)) == DEVICE


def test_mixing_device_and_host_tensors_raises_as_cuda_does(cpu_mode_on):
    with device_tagging():
        device, host = torch.ones(3, device="cuda"), torch.ones(3)
        with pytest.raises(RuntimeError, match=SAME_DEVICE):
            device + host
        with pytest.raises(RuntimeError, match=SAME_DEVICE):
            host += device
        with pytest.raises(RuntimeError, match=SAME_DEVICE):
            torch.stack([device, host])
        # What CUDA allows: 0-dim host tensors, copies across devices, host index tensors.
        assert place_of(device * torch.tensor(2.0)) == DEVICE
        device.copy_(host)
        assert place_of(host.to(device)) == DEVICE
        assert device[torch.tensor([0, 2])].shape == (2,)


def test_collectives_reject_host_tensors_as_nccl_does(cpu_mode_on, one_rank_gloo):
    with device_tagging():
        with pytest.raises(ValueError, match="Tensors must be CUDA and dense"):
            dist.all_reduce(torch.ones(2))
        with pytest.raises(ValueError, match="Tensors must be CUDA and dense"):
            dist.broadcast(torch.empty(2, 3), src=0)
        on_device = torch.ones(2, device="cuda")
        dist.all_reduce(on_device)
        gathered = [torch.empty(2, device="cuda")]
        dist.all_gather(gathered, on_device)
        with pytest.raises(ValueError, match="Tensors must be CUDA and dense"):
            dist.all_gather([torch.empty(2)], on_device)
        dist.broadcast_object_list([{"a": 1}], src=0)  # object collectives: NCCL moves the pickles itself
    assert torch.equal(gathered[0], torch.ones(2))


def test_nothing_stays_patched(cpu_mode_on):
    before = (dist.all_reduce, dist.isend, torch.Tensor.cuda)
    with device_tagging():
        assert dist.all_reduce is not before[0]
    assert (dist.all_reduce, dist.isend, torch.Tensor.cuda) == before
    assert place_of(torch.zeros(2) + 1) is None  # no mode left: nothing is tagged
