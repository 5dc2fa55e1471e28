"""Launcher detection from fake environments (no processes are started)."""

import pytest

from papo_mega.distributed.launcher import detect_launch, expand_slurm_nodelist
from papo_mega.errors import LaunchError


def test_torchrun_variables():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "node7", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "x"}
    info = detect_launch(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank, info.local_world_size) == ("torchrun", 3, 8, 1, 2)
    assert (info.master_addr, info.master_port) == ("node7", 29400)


def test_srun_variables_and_master_from_nodelist():
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
           "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu-a[007-008],gpu-b3", "SLURM_NTASKS_PER_NODE": "8"}
    info = detect_launch(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank, info.local_world_size) == ("srun", 9, 16, 1, 8)
    assert info.master_addr == "gpu-a007"
    assert info.master_port == 20000 + 123456 % 20000
    assert detect_launch({**env, "MASTER_PORT": "31000", "MASTER_ADDR": "head"}).master_port == 31000


def test_sbatch_shell_without_srun_is_a_single_process():
    # Inside the batch script (no job step) SLURM_PROCID is 0 of NTASKS: that is not a launch.
    info = detect_launch({"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_NODELIST": "n1"})
    assert (info.launcher, info.world_size) == ("single", 1)


def test_mpirun_variables_with_given_rendezvous():
    env = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_ADDR": "h0", "MASTER_PORT": "29000"}
    info = detect_launch(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank, info.master_addr) == ("mpirun", 2, 4, 0, "h0")


@pytest.mark.parametrize(
    "nodelist,hosts",
    [
        ("node1", ["node1"]),
        ("node[1-3]", ["node1", "node2", "node3"]),
        ("gpu[001-002,010],cpu5", ["gpu001", "gpu002", "gpu010", "cpu5"]),
        ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ],
)
def test_slurm_nodelist_expansion(nodelist, hosts):
    assert expand_slurm_nodelist(nodelist) == hosts


@pytest.mark.parametrize(
    "env,message",
    [
        ({"RANK": "0"}, "WORLD_SIZE is not set; start with torchrun"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
        ({"SLURM_PROCID": "0", "SLURM_STEP_ID": "1", "SLURM_NTASKS": "2"}, "SLURM_JOB_NODELIST is not set"),
        ({"SLURM_PROCID": "0", "SLURM_STEP_ID": "1", "SLURM_JOB_NODELIST": "n1"}, "SLURM_NTASKS is not set"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "99999"}, "MASTER_PORT='99999' is not a port number"),
    ],
)
def test_missing_or_broken_variables(env, message):
    with pytest.raises(LaunchError, match=message):
        detect_launch(env)
