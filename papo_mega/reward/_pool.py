"""A small pool of math-verify worker processes with a hard time limit per check, from any thread.

math-verify's own timeouts use SIGALRM, which works only in the main thread and cannot interrupt
a long C call (sympy expanding `9^{9^{9^{9^9}}}` sits in integer arithmetic). So each check runs
in a worker process (`_worker.py`); a check that passes its limit gets its worker killed and
replaced, and returns (False, "timeout") at once.

Workers are plain `python _worker.py` subprocesses talking JSON lines over pipes rather than
multiprocessing 'spawn'/'forkserver' children: those re-import the trainer's main module (torch,
megatron) in every worker, and pickling is not needed for two strings. Workers start lazily, at
the first check that needs one, are reused, and are killed by `shutdown_pool` (run at exit). A
worker dies with this process even when it is SIGKILLed: it asks for PR_SET_PDEATHSIG, which fires
when the *thread* that started it exits, so every worker is started by one spawner thread that
lives as long as the pool (check() runs in short-lived executor threads).
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from papo_mega.errors import PapoError

WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_worker.py")
DEFAULT_MEMORY_LIMIT_MB = 4096
STARTUP_TIMEOUT_S = 60.0


class WorkerStartError(PapoError):
    """A math-verify worker could not start (math-verify missing, or the interpreter failed)."""


def default_num_workers() -> int:
    """Up to 4 workers, no more than the CPUs this process may run on."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


class _Worker:
    """One worker process; used by one thread at a time (the pool hands it out)."""

    def __init__(self, memory_limit_mb: int) -> None:
        env = dict(os.environ, PAPO_REWARD_WORKER_MEMORY_MB=str(memory_limit_mb),
                   PAPO_REWARD_PARENT_PID=str(os.getpid()))
        self.proc = subprocess.Popen([sys.executable, WORKER_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, close_fds=True, env=env)
        self._buffer = b""
        self.ready = False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _read_line(self, deadline: float) -> bytes | None:
        """The next line from the worker, or None at the deadline; EOFError when the worker died."""
        fd = self.proc.stdout.fileno()
        poller = select.poll()  # not select.select: a trainer can hold file descriptors above 1024
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            if not poller.poll(max(1, int(remaining * 1000))):
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise EOFError("math-verify worker exited")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def wait_ready(self, timeout_s: float) -> None:
        if self.ready:
            return
        try:
            line = self._read_line(time.monotonic() + timeout_s)
        except EOFError:
            line = b'{"ready": false, "error": "the worker process exited during start-up"}'
        if line is None:
            raise WorkerStartError(f"the math-verify worker did not start within {timeout_s:.0f} s; "
                                   f"check that `{sys.executable} {WORKER_SCRIPT}` runs")
        message = json.loads(line)
        if not message.get("ready"):
            raise WorkerStartError(f"the math-verify worker failed to start ({message.get('error')}); "
                                   f"install math-verify: `{sys.executable} -m pip install math-verify`")
        self.ready = True

    def request(self, payload: dict, timeout_s: float) -> dict | None:
        """The worker's reply, or None when it takes longer than timeout_s. Raises OSError/EOFError
        when the worker is gone."""
        self.proc.stdin.write((json.dumps(payload) + "\n").encode("utf-8"))
        self.proc.stdin.flush()
        line = self._read_line(time.monotonic() + timeout_s)
        return None if line is None else json.loads(line)

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not take this long
            pass


class VerifyPool:
    """`num_workers` lazily started worker processes; `check` is thread-safe and blocks for a free one."""

    def __init__(self, num_workers: int | None = None, memory_limit_mb: int = DEFAULT_MEMORY_LIMIT_MB,
                 startup_timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        self.num_workers = max(1, num_workers or default_num_workers())
        self.memory_limit_mb = memory_limit_mb
        self.startup_timeout_s = startup_timeout_s
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._free_changed = threading.Condition(self._lock)
        # Free slots: a started worker, or None for one not started yet.
        self._free: list[_Worker | None] = [None] * self.num_workers
        self._live: set[_Worker] = set()
        self._closed = False
        # One long-lived thread starts every worker (see the module docstring: PR_SET_PDEATHSIG).
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="papo-reward-spawner")
        self.restarts = 0
        """Workers killed after a timeout or a crash (for logging)."""

    @property
    def closed(self) -> bool:
        return self._closed

    def _acquire(self) -> _Worker | None:
        """A free slot, preferring a ready worker, then one already starting, then an empty slot."""
        with self._free_changed:
            while not self._free:
                self._free_changed.wait()
            for wanted in (lambda w: w is not None and w.ready, lambda w: w is not None):
                for i, worker in enumerate(self._free):
                    if wanted(worker):
                        return self._free.pop(i)
            return self._free.pop()

    def _release(self, worker: _Worker | None) -> None:
        with self._free_changed:
            self._free.append(worker)
            self._free_changed.notify()

    def _start_worker(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise RuntimeError("the math-verify pool is shut down")
            worker = self._spawner.submit(_Worker, self.memory_limit_mb).result()
            self._live.add(worker)
            return worker

    def _retire(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            self._live.discard(worker)

    def check(self, gold: str, pred: str, timeout_s: float, _sleep_s: float = 0.0) -> tuple[bool, str]:
        """(equivalent, reason) for one pair, reason in math_verify / wrong / unparsable_truth /
        timeout / error. `timeout_s` counts from handing the pair to a ready worker. `_sleep_s` is a
        test hook: the worker sleeps that long first."""
        worker = self._acquire()
        try:
            if worker is not None and not worker.alive():
                self._retire(worker)
                worker = None
            if worker is None:
                worker = self._start_worker()
            try:
                worker.wait_ready(self.startup_timeout_s)
            except WorkerStartError:
                self._retire(worker)
                worker = None
                raise
            # cpu_budget only matters if we die mid-check: it ends an orphaned, stuck worker.
            payload = {"gold": gold, "pred": pred, "cpu_budget": timeout_s + 30.0,
                       **({"sleep": _sleep_s} if _sleep_s else {})}
            try:
                reply = worker.request(payload, timeout_s)
            except (OSError, EOFError, ValueError):  # died mid-check (crash, out of memory)
                self._retire(worker)
                worker = None
                self.restarts += 1
                return False, "error"
            if reply is None:
                self._retire(worker)
                self.restarts += 1
                # Start the replacement now: it imports math-verify while the caller moves on.
                try:
                    worker = self._start_worker()
                except (RuntimeError, OSError):  # shut down meanwhile, or out of processes
                    worker = None
                return False, "timeout"
            return bool(reply.get("ok")), str(reply.get("reason", "error"))
        finally:
            if worker is not None and self._closed:
                self._retire(worker)
                worker = None
            self._release(worker)

    def check_many(self, pairs: Sequence[tuple[str, str]], timeout_s: float) -> list[tuple[bool, str]]:
        """`check` for every (gold, pred) pair, spread over the workers; results in input order."""
        if len(pairs) <= 1 or self.num_workers == 1:
            return [self.check(gold, pred, timeout_s) for gold, pred in pairs]
        with ThreadPoolExecutor(max_workers=min(self.num_workers, len(pairs)),
                                thread_name_prefix="papo-reward") as executor:
            return list(executor.map(lambda pair: self.check(pair[0], pair[1], timeout_s), pairs))

    def close(self) -> None:
        """Kill every worker; checks in flight return timeout/error, later checks raise."""
        with self._lock:
            self._closed = True
            workers = list(self._live)
            self._live.clear()
        for worker in workers:
            worker.kill()
        self._spawner.shutdown(wait=False)


_POOL: VerifyPool | None = None
_POOL_LOCK = threading.Lock()
_POOL_OPTIONS: dict = {}


def get_pool() -> VerifyPool:
    """The process-wide pool, created at first use (again after shutdown_pool, or in a forked child)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.closed or _POOL.pid != os.getpid():
            _POOL = VerifyPool(**_POOL_OPTIONS)
        return _POOL


def configure_pool(num_workers: int | None = None, memory_limit_mb: int = DEFAULT_MEMORY_LIMIT_MB) -> None:
    """Set the pool's size and per-worker memory cap (MiB, 0 for none); the current pool is shut down
    and the next check starts a new one."""
    shutdown_pool()
    with _POOL_LOCK:
        _POOL_OPTIONS.clear()
        _POOL_OPTIONS.update(num_workers=num_workers, memory_limit_mb=memory_limit_mb)


def shutdown_pool() -> None:
    """Kill the process-wide pool's workers (registered with atexit); a later check starts a new pool."""
    global _POOL
    with _POOL_LOCK:
        pool, _POOL = _POOL, None
    if pool is not None and pool.pid == os.getpid():
        pool.close()


atexit.register(shutdown_pool)
