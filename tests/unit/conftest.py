"""Fixtures shared by the unit tests."""

import pytest
import torch

from papo_mega.distributed import cpu_mode


@pytest.fixture
def cpu_mode_on():
    """megatron's CUDA calls redirected to the CPU for the test (papo_mega.distributed.cpu_mode)."""
    if torch.cuda.is_available():
        pytest.skip("cpu mode is never enabled on a CUDA machine")
    cpu_mode.enable_cpu_mode()
    yield
    cpu_mode.disable_cpu_mode()
