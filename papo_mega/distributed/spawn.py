"""Run a function in N local processes (gloo on CPU), hard-timed and fail-fast.

Used by the multi-process tests and by tools that start their own local job (conversion,
parity checks) when not launched by torchrun/srun/mpirun.

    results = run_distributed(worker_fn, world_size=4, args=(...), timeout_s=120)

Each process gets torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT on a
free port) and one thread, and sees no CUDA (CUDA_VISIBLE_DEVICES="", so gloo and the CPU mode)
unless the caller passes use_cuda=True or its own CUDA_VISIBLE_DEVICES in env: on a GPU machine
the ranks would otherwise pick nccl and all share cuda:0. `results[rank]` is what the function returned on that rank. A worker
exception fails the test with that rank's traceback; a hang past timeout_s fails it naming the
ranks that never finished. Workers must be module-level functions (they are pickled). Ranks fork
from a server that has imported torch and megatron-core once (_context), not from a fresh
interpreter each: the imports were most of a short multi-process test's time.
`DistributedTestFailure` is an AssertionError so that pytest reports it as a test failure.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import time
import traceback

from papo_mega.distributed.launcher import find_free_port
from papo_mega.errors import PapoError


class DistributedTestFailure(AssertionError):
    """A rank raised, or the job did not finish in time."""


def _worker(payload: bytes, rank: int, world_size: int, port: int, env: dict, results) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            **env,
        }
    )
    try:
        import torch

        if os.environ.get("CUDA_VISIBLE_DEVICES") == "" and torch.cuda.is_initialized():
            raise RuntimeError("CUDA was initialised before the worker could hide it")
        torch.set_num_threads(1)
        # Unpickled only now, under the environment above: importing fn's module may load CUDA
        # libraries, which read CUDA_VISIBLE_DEVICES once.
        fn, args = pickle.loads(payload)
        value = fn(*args)
        # Plain pickle: tensors travel by value, not as shared-memory handles that die with us.
        results.put(("ok", rank, pickle.dumps(value)))
    except PapoError as err:  # a user mistake: the parent re-raises it as the one-line error it is
        results.put(("user_error", rank, pickle.dumps(err)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put(("error", rank, traceback.format_exc()))
    finally:
        try:
            from papo_mega.distributed.runtime import shutdown_distributed

            shutdown_distributed()
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass


PRELOAD = ("torch", "megatron.core", "megatron.core.models.gpt")
"""Imported once by the fork server: ~8 s of CPU per rank that a spawned rank pays again."""


def _context(use_cuda: bool):
    """A fork server that has imported PRELOAD (ranks fork from it with torch and megatron-core
    loaded), or plain spawn for ranks that use CUDA or when PAPO_SPAWN=spawn.

    The server is started with CUDA hidden and one OpenMP thread, so it never initialises CUDA
    or a thread pool that a fork would copy half-made; each rank then sets its own environment
    before it unpickles (and so imports) its function, as a spawned rank does."""
    if use_cuda or os.environ.get("PAPO_SPAWN") == "spawn":
        return mp.get_context("spawn")
    from multiprocessing import forkserver

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))
    saved = {key: os.environ.get(key) for key in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")}
    os.environ.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    try:
        forkserver.ensure_running()  # started once per process; later calls return at once
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return ctx


def run_distributed(fn, world_size: int, args: tuple = (), timeout_s: float = 180.0, env: dict | None = None,
                    use_cuda: bool = False) -> list:
    """Run fn(*args) on world_size ranks; return the per-rank results or raise DistributedTestFailure.

    env is added to each rank's environment; use_cuda=True keeps the GPUs this process sees
    visible to the ranks (by default they see none)."""
    ctx = _context(use_cuda)
    results = ctx.Queue()
    port = find_free_port()
    env = {**({} if use_cuda else {"CUDA_VISIBLE_DEVICES": ""}), **(env or {})}
    payload = pickle.dumps((fn, args))
    procs = [
        # Not daemonic: like a real launcher's ranks, workers may start children (checkpoint writers).
        ctx.Process(target=_worker, args=(payload, rank, world_size, port, env, results))
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    outputs: dict[int, object] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(outputs) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(outputs))
                raise DistributedTestFailure(
                    f"{fn.__name__} on {world_size} ranks did not finish within {timeout_s:.0f}s; "
                    f"ranks still running: {missing} (a hang, e.g. a collective one rank skipped)"
                )
            try:
                status, rank, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in outputs]
                if dead:
                    raise DistributedTestFailure(
                        f"{fn.__name__}: rank {dead[0]} died with exit code {procs[dead[0]].exitcode} "
                        f"without reporting (killed, or crashed in native code)"
                    ) from None
                continue
            if status == "user_error":
                raise pickle.loads(value)
            if status == "error":
                raise DistributedTestFailure(f"{fn.__name__} failed on rank {rank} of {world_size}:\n{value}")
            outputs[rank] = pickle.loads(value)
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
    return [outputs[r] for r in range(world_size)]
