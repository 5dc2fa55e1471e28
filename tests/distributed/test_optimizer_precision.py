"""bf16 and fp8 models keep bf16 parameters; the optimizer must step fp32 master copies of them,
with and without the distributed optimizer (the planner counts that copy)."""

import pytest

from tests.distributed.harness import run_distributed
from tests.distributed.workers import optimizer_step_dtypes


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
@pytest.mark.parametrize("distopt", [False, True], ids=["plain", "distopt"])
def test_optimizer_steps_fp32_masters_of_bf16_params(precision, distopt):
    assert run_distributed(optimizer_step_dtypes, 1, args=(precision, distopt))[0] == ["torch.float32"]
