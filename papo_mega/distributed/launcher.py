"""Who started us: torchrun, Slurm's srun, Open MPI's mpirun, or a plain single process.

`detect_launch(env)` reads only the environment (plus mpi4py when mpirun gives no rendezvous
address), so it is unit-tested with fake environments.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from papo_mega.errors import LaunchError

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class LaunchInfo:
    """This process's place in the job, as the launcher described it."""

    launcher: str
    """'torchrun', 'srun', 'mpirun' or 'single'."""
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int


def _int_var(env: Mapping[str, str], name: str, hint: str) -> int:
    value = env.get(name)
    if value is None:
        raise LaunchError(f"{name} is not set; {hint}")
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{name}={value!r} is not an integer; {hint}") from None


def _port(env: Mapping[str, str], default: int) -> int:
    raw = env.get("MASTER_PORT")
    if raw is None:
        return default
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise LaunchError(f"MASTER_PORT={raw!r} is not a port number; set it to a free port in 1024-65535")
    return int(raw)


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed host list: 'gpu[001-003,7],login' -> gpu001 gpu002 gpu003 gpu7 login."""
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", nodelist):
        hosts.extend(_expand_host(item))
    return hosts


def _expand_host(pattern: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    out = []
    for part in match.group(1).split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            width = len(lo)
            for i in range(int(lo), int(hi) + 1):
                out.extend(_expand_host(f"{head}{i:0{width}d}{tail}"))
        else:
            out.extend(_expand_host(f"{head}{part}{tail}"))
    return out


def _from_torchrun(env: Mapping[str, str]) -> LaunchInfo:
    hint = "start with torchrun, or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT together"
    world_size = _int_var(env, "WORLD_SIZE", hint)
    return LaunchInfo(
        launcher="torchrun",
        rank=_int_var(env, "RANK", hint),
        world_size=world_size,
        local_rank=int(env.get("LOCAL_RANK", 0)),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", world_size)),
        master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
        master_port=_port(env, DEFAULT_PORT),
    )


def _from_srun(env: Mapping[str, str]) -> LaunchInfo:
    hint = "run under srun (not plain sbatch), or launch with torchrun"
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist and "MASTER_ADDR" not in env:
        raise LaunchError(f"SLURM_JOB_NODELIST is not set; {hint}")
    master_addr = env.get("MASTER_ADDR") or expand_slurm_nodelist(nodelist)[0]
    # Jobs sharing a node must not share a port: derive it from the job id unless given.
    job_port = 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
    tasks_on_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0] or env.get("SLURM_STEP_TASKS_PER_NODE", "1").split("(")[0]
    return LaunchInfo(
        launcher="srun",
        rank=_int_var(env, "SLURM_PROCID", hint),
        world_size=_int_var(env, "SLURM_NTASKS", hint),
        local_rank=_int_var(env, "SLURM_LOCALID", hint),
        local_world_size=int(tasks_on_node) if tasks_on_node.isdigit() else 1,
        master_addr=master_addr,
        master_port=_port(env, job_port),
    )


def _from_mpirun(env: Mapping[str, str]) -> LaunchInfo:
    hint = "launch with mpirun from Open MPI, or use torchrun"
    rank = _int_var(env, "OMPI_COMM_WORLD_RANK", hint)
    world_size = _int_var(env, "OMPI_COMM_WORLD_SIZE", hint)
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if addr is None or port is None:
        addr, port = _share_rendezvous_with_mpi(addr, port)
    return LaunchInfo(
        launcher="mpirun",
        rank=rank,
        world_size=world_size,
        local_rank=int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)),
        local_world_size=int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", world_size)),
        master_addr=addr,
        master_port=_port({"MASTER_PORT": str(port)}, DEFAULT_PORT),
    )


def _share_rendezvous_with_mpi(addr: str | None, port: str | None) -> tuple[str, str]:
    """Rank 0 picks its host name and a free port; mpi4py broadcasts them to every rank."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise LaunchError(
            "mpirun launch without MASTER_ADDR/MASTER_PORT needs mpi4py; "
            "install papo_mega[mpi] or export MASTER_ADDR and MASTER_PORT"
        ) from None
    comm = MPI.COMM_WORLD
    chosen = None
    if comm.Get_rank() == 0:
        chosen = (addr or socket.gethostname(), port or str(find_free_port()))
    return comm.bcast(chosen, root=0)


def find_free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def detect_launch(env: Mapping[str, str] | None = None) -> LaunchInfo:
    """Describe this process's place in the job from the launcher's environment variables."""
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env or "TORCHELASTIC_RUN_ID" in env:
        return _from_torchrun(env)
    if "OMPI_COMM_WORLD_RANK" in env or "OMPI_COMM_WORLD_SIZE" in env:
        return _from_mpirun(env)
    if "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        return _from_srun(env)
    return LaunchInfo("single", 0, 1, 0, 1, env.get("MASTER_ADDR") or "127.0.0.1", _port(env, find_free_port()))
