"""The harness itself: failures, hangs and broken reductions are caught, not passed."""

import os
import time

import pytest

from tests.distributed.harness import DistributedTestFailure, max_abs_diff_report, run_distributed
from tests.distributed.test_layouts import GRAD_TOL, LOSS_TOL, WEIGHT_TOL
from tests.distributed.workers import loss_and_grads, train_weights


def _raise_on_rank_one():
    if os.environ["RANK"] == "1":
        raise ValueError("boom on purpose")
    return "fine"


def _hang_on_rank_zero():
    if os.environ["RANK"] == "0":
        time.sleep(600)
    return "done"


def _parent_and_threads():
    import torch

    return {"parent": os.getppid(), "threads": torch.get_num_threads(), "cuda": os.environ["CUDA_VISIBLE_DEVICES"]}


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_ranks_fork_from_the_preloaded_server_unless_told_to_spawn(method, monkeypatch):
    """Ranks start from the fork server that imported torch and megatron-core (their parent is that
    server, not this process), with one thread and no CUDA as spawned ranks have; PAPO_SPAWN=spawn
    (and use_cuda=True, checked on _context directly) give plain spawned children of this process."""
    from papo_mega.distributed import spawn

    monkeypatch.setenv("PAPO_SPAWN", method)
    out = run_distributed(_parent_and_threads, 2, timeout_s=180)
    assert [o["threads"] for o in out] == [1, 1] and [o["cuda"] for o in out] == ["", ""]
    parents = {o["parent"] for o in out}
    if method == "spawn":
        assert parents == {os.getpid()}
    else:
        assert len(parents) == 1 and os.getpid() not in parents, "ranks were not forked from the server"
    assert spawn._context(use_cuda=True).get_start_method() == "spawn"


def test_worker_exception_shows_rank_and_traceback():
    with pytest.raises(DistributedTestFailure, match=r"(?s)rank 1 of 2.*ValueError: boom on purpose"):
        # Generous: under a loaded machine spawning two ranks and importing torch can take a minute.
        run_distributed(_raise_on_rank_one, 2, timeout_s=180)


def test_hang_fails_fast_with_the_stuck_rank():
    start = time.monotonic()
    with pytest.raises(DistributedTestFailure, match=r"did not finish within 20s; ranks still running: \[0\]"):
        run_distributed(_hang_on_rank_zero, 2, timeout_s=20)
    assert time.monotonic() - start < 60


def test_skipped_tensor_parallel_allreduce_is_detected(single_process_grads):
    """Row-parallel outputs that are not summed across TP ranks must fail the equivalence check."""
    out = run_distributed(loss_and_grads, 2, args=({"tp_size": 2}, None, None, "tp_allreduce"))[0]
    worst, _ = max_abs_diff_report(out["grads"], single_process_grads["grads"])
    assert abs(out["loss"] - single_process_grads["loss"]) > LOSS_TOL or worst > GRAD_TOL
    assert worst > 100 * GRAD_TOL


def test_skipped_data_parallel_grad_sync_is_detected(single_process_training):
    """Gradients that are not reduced across DP ranks leave the weights off the reference."""
    out = run_distributed(train_weights, 2, args=({}, 3, False, None, None, "dp_grad_sync"))[0]
    worst, _ = max_abs_diff_report(out["weights"], single_process_training["weights"])
    assert worst > 20 * WEIGHT_TOL
