"""No process of ours outlives the process that started it (docs/training.md, "Stopping").

A SIGKILL runs no clean-up code, so what must die with a rank is arranged beforehand:

- forked children (DataLoader workers, megatron's checkpoint write processes) get
  PR_SET_PDEATHSIG=SIGKILL from an at-fork hook;
- megatron's checkpoint writer collects its results through a `multiprocessing.Manager` queue,
  whose server process (plus its resource tracker) otherwise stays behind, ~270 MB a rank, after
  every SIGKILL: we hand it a plain queue instead (`_no_writer_server`);
- a rank started by torchrun (or `spawn.run_distributed`) dies with that launcher.

The reward workers (`reward/_pool.py`) set the same signal themselves.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_fork: dict = {}
_hooked = False


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when the thread that started it exits (Linux; elsewhere nothing); exit
    now when `parent_pid` is already gone (it died before the request could be made)."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def _before_fork() -> None:
    # PDEATHSIG fires when the forking *thread* exits: only forks from the main thread (which lives
    # as long as the process) may use it; a fork from a short-lived thread would die with that thread.
    _fork.update(parent=os.getpid(), main=threading.current_thread() is threading.main_thread())


def _after_fork_in_child() -> None:
    if _fork.get("main"):
        die_with_parent(_fork["parent"])


def tie_children_to_this_process(launcher: str) -> None:
    """Arrange (once per process) that this process's children die with it, and, under torchrun,
    that this rank dies with its launcher."""
    global _hooked
    if not _hooked:
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _hooked = True
        if launcher == "torchrun":  # torchrun's agent starts the ranks from its main thread
            die_with_parent(os.getppid())
    _no_writer_server()


def _no_writer_server() -> None:
    """megatron 0.16.1, dist_checkpointing/strategies/filesystem_async.py:

        def _get_write_results_queue():
            global _results_queue
            if _results_queue is None:
                ctx = mp.get_context("spawn")
                _results_queue = ctx.Manager().Queue()
            return _results_queue

    The Manager is a spawned server process that nothing ever stops. Our saves are synchronous
    (checkpoint.py calls dist_checkpointing.save with a sync strategy: `AsyncRequest.execute_sync`
    runs the writer in this process, which puts and gets the results itself), so a thread queue
    serves. An async save would fail loudly with it (`results_queue should not be empty`, or a
    pickling error), not hang."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
