"""Children die with a SIGKILLed parent (issue 16, finding 7): forked children of a rank
(DataLoader workers, megatron's checkpoint write processes) and math-verify reward workers, even
one busy in a check. The megatron Manager server is covered end to end by
tests/distributed/test_no_hang.py."""

import os
import signal
import subprocess
import sys

import psutil
import pytest

FORKED_CHILD = """
import multiprocessing, time
from papo_mega.distributed.lifetime import tie_children_to_this_process
tie_children_to_this_process("single")
child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(600,))
child.start()
print(child.pid, flush=True)
time.sleep(600)
"""

BUSY_REWARD_WORKER = """
import threading, time
from papo_mega.reward._pool import VerifyPool
pool = VerifyPool(num_workers=1)
threading.Thread(target=pool.check, args=("1", "1", 600.0), kwargs={"_sleep_s": 600.0}, daemon=True).start()
while not (pool._live and next(iter(pool._live)).ready):
    time.sleep(0.05)
time.sleep(1)  # the check's request follows "ready" at once: the worker is asleep in it, not idle
print(next(iter(pool._live)).proc.pid, flush=True)
time.sleep(600)
"""


def _child_outlives_a_killed_parent(script: str) -> list[str]:
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child = psutil.Process(int(parent.stdout.readline()))
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    _, alive = psutil.wait_procs([child], timeout=10)
    left = [" ".join(p.cmdline())[:100] for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:
        p.kill()
    return left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_forked_child_dies_with_its_parent():
    assert _child_outlives_a_killed_parent(FORKED_CHILD) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_busy_reward_worker_dies_with_its_parent():
    # Busy (sleeping in a check), it reads no stdin EOF and uses no CPU time: only PDEATHSIG ends it.
    assert _child_outlives_a_killed_parent(BUSY_REWARD_WORKER) == []


def test_forks_from_other_threads_are_left_alone():
    """PDEATHSIG fires when the forking *thread* exits: a fork from a short-lived thread must not use it."""
    import threading

    from papo_mega.distributed import lifetime

    seen = {}
    thread = threading.Thread(target=lambda: (lifetime._before_fork(), seen.update(lifetime._fork)))
    thread.start()
    thread.join()
    assert seen == {"parent": os.getpid(), "main": False}
