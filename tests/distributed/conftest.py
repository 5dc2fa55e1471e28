import pytest

from tests.distributed.harness import run_distributed
from tests.distributed.workers import loss_and_grads, train_weights


@pytest.fixture(scope="session")
def single_process_grads():
    """The reference: loss and full gradients of the tiny GPT on one process."""
    return run_distributed(loss_and_grads, 1, args=({},))[0]


@pytest.fixture(scope="session")
def single_process_training():
    """The reference: 3 optimizer steps on one process (plain optimizer)."""
    return run_distributed(train_weights, 1, args=({}, 3, False))[0]
