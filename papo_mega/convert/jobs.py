"""Run a tool's per-rank function under the launcher that started us, or on local processes."""

from __future__ import annotations

import sys
from collections.abc import Callable

from papo_mega.distributed.launcher import detect_launch
from papo_mega.distributed.spawn import run_distributed
from papo_mega.errors import PapoError


def run_job(fn: Callable, world_size: int, args: tuple, timeout_s: float) -> list:
    """fn(*args) on world_size ranks: in this process when torchrun/srun/mpirun started the job
    with that many ranks, else on local spawned processes (gloo on CPU)."""
    launch = detect_launch()
    if launch.launcher != "single":
        if launch.world_size != world_size:
            raise PapoError(f"launched with {launch.world_size} ranks but the layout needs {world_size}; "
                            f"start {world_size} processes or change --tp/--pp")
        return [fn(*args)]
    return run_distributed(fn, world_size, args=args, timeout_s=timeout_s)


def run_tool(name: str, body: Callable[[], int]) -> int:
    """Run a tool's body; user mistakes become one line on stderr and exit code 2."""
    try:
        return body()
    except PapoError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
