"""A real one-node Slurm cluster on this machine for tests/slurm (Debian's slurm-wlm + munge).

The session fixture `slurm_cluster` installs slurm-wlm and munge with apt-get when `sbatch` is
missing, writes a slurm.conf for localhost under a temporary directory, starts munged, slurmctld
and slurmd as root in the foreground (children of this process, so teardown stops exactly them),
waits for the node to be idle and yields the environment clients need (SLURM_CONF). Tests skip
with the reason when that is impossible: not root, no apt-get, the install or start fails.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from papo_mega.distributed.launcher import find_free_port

PACKAGES = ["slurm-wlm", "munge"]


@dataclass
class SlurmCluster:
    root: Path
    env: dict
    timings: dict = field(default_factory=dict)
    procs: list = field(default_factory=list)

    def run(self, *args: str, timeout: float = 60, env_extra: dict | None = None, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env={**self.env, **(env_extra or {})}, capture_output=True, text=True,
                              timeout=timeout, **kw)

    def logs(self) -> str:
        out = []
        for log in sorted((self.root / "log").glob("*.log")):
            out.append(f"--- {log.name}\n" + log.read_text(errors="replace")[-3000:])
        return "\n".join(out)


def _install(timings: dict) -> str | None:
    """Install slurm-wlm + munge if sbatch is missing; a skip reason, or None when ready."""
    if all(shutil.which(tool) for tool in ("sbatch", "slurmctld", "slurmd", "munged")):
        timings["install_s"] = 0.0
        return None
    if os.geteuid() != 0:
        return "Slurm is not installed and installing it needs root (apt-get install slurm-wlm munge)"
    if shutil.which("apt-get") is None:
        return "Slurm is not installed and there is no apt-get to install it (apt-get install slurm-wlm munge)"
    start = time.perf_counter()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                                               *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            return f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()[-500:]}"
    timings["install_s"] = time.perf_counter() - start
    return None


def _slurm_conf(root: Path, host: str) -> str:
    cpus = max(os.cpu_count() or 1, 2)  # the tiny job needs 2 tasks; config_overrides accepts the count
    with open("/proc/meminfo") as f:
        mem_mb = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) // 1024
    return f"""\
ClusterName=papotest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={find_free_port()}
SlurmdPort={find_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
KillWait=10
MinJobAge=600
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={max(mem_mb * 3 // 4, 1000)} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _start(root: Path, timings: dict) -> SlurmCluster:
    start = time.perf_counter()
    host = socket.gethostname().split(".")[0]
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "munge").chmod(0o700)
    key = root / "munge" / "munge.key"
    subprocess.run(["mungekey", "--create", "--force", f"--keyfile={key}"], check=True, capture_output=True)
    key.chmod(0o400)
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, host))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for var in [v for v in env if v.startswith(("SLURM_", "SBATCH_", "SRUN_")) and v != "SLURM_CONF"]:
        env.pop(var)  # a test run inside a Slurm job must not leak its job's settings
    cluster = SlurmCluster(root, env, timings)
    logs = root / "log"

    def daemon(cmd: list[str], name: str) -> None:
        out = open(logs / f"{name}.stdout.log", "w")  # noqa: SIM115 (closed with the process)
        cluster.procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                              start_new_session=True))

    daemon(["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={root}/munge/munge.socket",
            f"--pid-file={root}/munge/munged.pid", f"--log-file={logs}/munged.log",
            f"--seed-file={root}/munge/munged.seed"], "munged")
    deadline = time.time() + 30
    while not (root / "munge" / "munge.socket").exists() and time.time() < deadline:
        time.sleep(0.1)
    daemon(["slurmctld", "-D", "-c", "-i", "-f", str(conf)], "slurmctld")
    daemon(["slurmd", "-D", "-f", str(conf), "-N", host], "slurmd")
    deadline = time.time() + 90
    state = ""
    while time.time() < deadline:
        if any(p.poll() is not None for p in cluster.procs):
            break
        proc = cluster.run("sinfo", "--noheader", "--Node", "--format=%t", timeout=20)
        state = proc.stdout.strip()
        if proc.returncode == 0 and state == "idle":
            timings["cluster_start_s"] = time.perf_counter() - start
            return cluster
        time.sleep(0.5)
    logs_text = cluster.logs()
    _stop(cluster)
    raise RuntimeError(f"the local Slurm node never became idle (sinfo: {state!r}):\n{logs_text}")


def _stop(cluster: SlurmCluster) -> None:
    cluster.run("scancel", "--full", "--user=root", timeout=20) if shutil.which("scancel") else None
    for proc in reversed(cluster.procs):  # slurmd, slurmctld, munged: only the daemons started here
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    timings: dict = {}
    reason = _install(timings)
    if reason is not None:
        pytest.skip(reason)
    # A short path: the munge socket path must fit a UNIX socket address (108 bytes).
    root = Path(tmp_path_factory.mktemp("slurm"))
    if len(str(root)) > 60:
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="papo-slurm-"))
    cluster = _start(root, timings)
    yield cluster
    _stop(cluster)
    print(f"\n[slurm] timings: {cluster.timings}")
