"""On one GPU with nccl (TP1/DP1): the same loss, gradients and training as the CPU/gloo path."""

import pytest
import torch

from tests.distributed.harness import assert_tensors_close, run_distributed
from tests.distributed.workers import loss_and_grads, train_weights

CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(autouse=True)
def exact_fp32():
    # TF32 would change the arithmetic the CPU reference does.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def test_nccl_single_gpu_loss_and_grads_match_cpu():
    cpu = run_distributed(loss_and_grads, 1, args=({},), env=CPU_ONLY)[0]
    gpu = run_distributed(loss_and_grads, 1, args=({},), env={"NVIDIA_TF32_OVERRIDE": "0"},
                          use_cuda=True)[0]
    assert gpu["loss"] == pytest.approx(cpu["loss"], abs=1e-4)
    assert_tensors_close(gpu["grads"], cpu["grads"], 1e-4, "nccl vs gloo gradients")


def test_nccl_single_gpu_training_matches_cpu():
    cpu = run_distributed(train_weights, 1, args=({}, 3, True), env=CPU_ONLY)[0]
    gpu = run_distributed(train_weights, 1, args=({}, 3, True), env={"NVIDIA_TF32_OVERRIDE": "0"},
                          use_cuda=True)[0]
    assert gpu["losses"] == pytest.approx(cpu["losses"], abs=1e-4)
    assert_tensors_close(gpu["weights"], cpu["weights"], 1e-4, "nccl vs gloo weights after 3 steps")
