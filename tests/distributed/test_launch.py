"""The same 2-rank smoke job started by torchrun and by Open MPI's mpirun; launcher errors."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from papo_mega.distributed.launcher import find_free_port

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "examples" / "tiny_lm.yaml")
SMOKE = ["-m", "papo_mega.cli", "smoke", RECIPE, "parallel.tp_size=2", "train.steps=2", "train.log_every=1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
MPIRUN = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")


def _run(cmd, tmp_path, timeout=240, env=None):
    proc = subprocess.run(cmd, cwd=tmp_path, env=env or ENV, capture_output=True, text=True, timeout=timeout)
    return proc


def _result(run_dir: Path) -> dict:
    return json.loads((run_dir / "smoke_result.json").read_text())


def test_torchrun_and_mpirun_reach_the_same_layout_and_losses(tmp_path):
    if MPIRUN is None:
        pytest.skip("mpirun not installed (pip install papo_mega[mpi])")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                f"--master-port={find_free_port()}", *SMOKE, f"run.run_dir={tmp_path / 'torchrun'}"]
    proc = _run(torchrun, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # mpirun gives no rendezvous address: rank 0 picks one and mpi4py broadcasts it.
    mpi_env = {k: v for k, v in ENV.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    mpi_env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    mpirun = [MPIRUN, "-n", "2", "--oversubscribe", "--bind-to", "none", "-x", "OMP_NUM_THREADS",
              sys.executable, *SMOKE, f"run.run_dir={tmp_path / 'mpirun'}"]
    proc = _run(mpirun, tmp_path, env=mpi_env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    by_torchrun, by_mpirun = _result(tmp_path / "torchrun"), _result(tmp_path / "mpirun")
    assert (by_torchrun["launcher"], by_mpirun["launcher"]) == ("torchrun", "mpirun")
    assert by_torchrun["layout"] == by_mpirun["layout"] == "tp2 pp1 dp1 (world 2)"
    assert len(by_torchrun["losses"]) == 2
    assert by_mpirun["losses"] == pytest.approx(by_torchrun["losses"], abs=1e-6)


def test_wrong_world_size_is_a_one_line_error(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={find_free_port()}",
           "-m", "papo_mega.cli", "smoke", RECIPE, "parallel.tp_size=4", f"run.run_dir={tmp_path}"]
    proc = _run(cmd, tmp_path)
    assert proc.returncode != 0
    assert "papo-mega: error: world size 2 is not divisible by tp*pp*cp = 4*1*1 = 4" in proc.stderr
    assert "Traceback" not in proc.stderr.split("papo-mega: error")[0][-500:]


def test_port_in_use_is_a_one_line_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        proc = _run([sys.executable, *SMOKE[:4], f"run.run_dir={tmp_path}"], tmp_path, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("papo-mega: error")]
    assert lines == [f"papo-mega: error: port {port} on 127.0.0.1 is in use; set MASTER_PORT to a free port "
                     f"(or --master-port for torchrun)"]
    assert "Traceback" not in proc.stderr


def test_missing_launcher_variable_is_a_one_line_error(tmp_path):
    env = {k: v for k, v in ENV.items() if k != "WORLD_SIZE"}
    env["RANK"] = "0"
    proc = _run([sys.executable, *SMOKE[:4], f"run.run_dir={tmp_path}"], tmp_path, env=env, timeout=120)
    assert proc.returncode == 2
    assert "papo-mega: error: WORLD_SIZE is not set; start with torchrun" in proc.stderr


def test_mpirun_trains_the_tiny_vlm_with_data_parallel_2(tmp_path):
    """`mpirun -n 2 papo-mega train` works like torchrun: DP2 steps, metrics and a checkpoint."""
    if MPIRUN is None:
        pytest.skip("mpirun not installed (pip install papo_mega[mpi])")
    from papo_mega.checkpoint import is_complete_checkpoint, latest_checkpoint

    proc = _run([sys.executable, str(REPO / "tools" / "make_synthetic.py"), "--split", "train", "--num", "32",
                 "--out", str(tmp_path / "train"), "--samples-per-shard", "16"], tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = tmp_path / "run"
    overrides = [f"data.train_shards={tmp_path / 'train'}", "data.eval_shards=", "data.max_prompt_len=256",
                 "data.min_pixels=3136", "data.max_pixels=3136", "algo.prompts_per_step=4", "rollout.n=2",
                 "rollout.max_new_tokens=8", "train.micro_batch_size=2", "train.global_batch_size=8",
                 "train.steps=2", "checkpoint.save_every=2", f"run.run_dir={run_dir}", "run.tensorboard=false"]
    mpi_env = {k: v for k, v in ENV.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    mpi_env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    papo_mega = str(Path(sys.executable).parent / "papo-mega")
    cmd = [MPIRUN, "-n", "2", "--oversubscribe", "--bind-to", "none", "-x", "OMP_NUM_THREADS",
           papo_mega, "train", str(REPO / "examples" / "tiny_cpu.yaml"), *overrides]
    proc = _run(cmd, tmp_path, timeout=400, env=mpi_env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert sorted(row["step"] for row in rows) == [1, 2]
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None and ckpt.name == "step_00000002" and is_complete_checkpoint(ckpt)
    # One job of two data-parallel ranks, not two single-rank jobs.
    assert "train papo_g: tp1 pp1 dp2 (world 2)" in proc.stdout, proc.stdout[-2000:]
