"""The batch scripts in slurm/ on a real (local, one-node) Slurm cluster: tests/slurm/conftest.py.

- every script parses (`bash -n`) and carries the #SBATCH headers a cluster run needs;
- `sbatch --wait slurm/papo_tiny.sh` trains the tiny VLM with 2 CPU tasks under srun to the end:
  checkpoints, TensorBoard logs and the final model exist;
- USR1 to the batch shell (what `--signal=B:USR1@T` does before the time limit) makes the tasks
  checkpoint and stop, the script requeues the job, and the second start resumes and finishes.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]  # a fresh clone anywhere: never a hard-coded path
SCRIPTS = ["papo_72b.sh", "papo_32b.sh", "papo_7b.sh", "papo_3b.sh", "papo_tiny.sh"]
HEADERS = ["--nodes=", "--ntasks-per-node=", "--time=", "--output=", "--requeue", "--signal="]
GPU_HEADERS = ["--gpus-per-node=", "--exclusive"]


def _headers(script: Path) -> list[str]:
    return [line.split(None, 1)[1].strip() for line in script.read_text().splitlines()
            if line.startswith("#SBATCH ")]


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_parses_and_has_the_sbatch_headers(name):
    script = REPO / "slurm" / name
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    headers = _headers(script)
    for want in HEADERS + (GPU_HEADERS if name != "papo_tiny.sh" else []):
        assert any(h.startswith(want) for h in headers), f"{name} lacks #SBATCH {want}"
    assert any(re.fullmatch(r"--output=\S*%x\S*%j\S*", h) for h in headers), headers
    assert "slurm/common.sh" in script.read_text()
    if name == "papo_72b.sh":
        text = script.read_text()
        assert "--nodes=4" in headers and "--ntasks-per-node=8" in headers and "--gpus-per-node=8" in headers
        assert 'PRECISION="${PRECISION-fp8}"' in text
        # The layout is the planner's best fit for the 72B recipe on 32 H100 80GB.
        from papo_mega.plan import plan

        best = plan("qwen2.5-vl-72b", 32, "h100-80gb", str(REPO / "examples" / "papo_g_72b.yaml")).fitting[0].layout
        assert f"parallel.tp_size={best.tp} parallel.pp_size={best.pp}" in text


def test_common_body_runs_one_srun_of_train_with_resume_auto():
    text = (REPO / "slurm" / "common.sh").read_text()
    assert len(re.findall(r"^srun ", text, flags=re.M)) == 1
    assert "papo_mega.cli train" in text and "--resume auto" in text and "scontrol requeue" in text
    assert "--container-image" in text
    proc = subprocess.run(["bash", "-n", str(REPO / "slurm" / "common.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _submit(cluster, tmp_path: Path, env: dict, *extra: str) -> int:
    proc = cluster.run("sbatch", "--parsable", f"--output={tmp_path}/%x-%j.out", *extra,
                       str(REPO / "slurm" / "papo_tiny.sh"), cwd=str(REPO), env_extra=env)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip().split(";")[0])


def _job(cluster, job: int) -> dict:
    proc = cluster.run("scontrol", "show", "job", "--oneliner", str(job))
    return dict(item.split("=", 1) for item in proc.stdout.split() if "=" in item)


def _wait(cluster, job: int, timeout: float, until=lambda info: info.get("JobState") in (
        "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")) -> dict:
    deadline = time.time() + timeout
    info: dict = {}
    while time.time() < deadline:
        info = _job(cluster, job)
        if until(info):
            return info
        time.sleep(1)
    raise AssertionError(f"job {job} still {info.get('JobState')} after {timeout} s:\n{cluster.logs()}")


def _job_env(tmp_path: Path) -> dict:
    return {"RUN_DIR": str(tmp_path / "run"), "DATA": str(tmp_path / "data"), "PAPO_PYTHON": sys.executable,
            "PAPO_REPO": str(REPO), "PYTHONWARNINGS": "ignore"}


@pytest.mark.timeout(420)
def test_sbatch_tiny_trains_to_the_end(slurm_cluster, tmp_path):
    start = time.perf_counter()
    job = _submit(slurm_cluster, tmp_path, _job_env(tmp_path))
    info = _wait(slurm_cluster, job, 300)
    slurm_cluster.timings["tiny_job_s"] = time.perf_counter() - start
    out = (tmp_path / f"papo-tiny-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out[-4000:]
    run = tmp_path / "run"
    assert "srun exited with 0" in out, out[-4000:]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert list((run / "tb").iterdir()), "no TensorBoard event files"
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*"))[-1] == "step_00000002"
    assert (run / "final" / "papo_model.json").is_file()
    assert (tmp_path / "data" / "train" / "manifest.json").is_file()


@pytest.mark.timeout(420)
def test_usr1_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    """What `--signal=B:USR1@T` does before the time limit, sent by hand mid-run."""
    steps = 5
    env = {**_job_env(tmp_path), "EVAL_SHARDS": "",
           "EXTRA": f"train.steps={steps} checkpoint.save_every=0"}
    start = time.perf_counter()
    job = _submit(slurm_cluster, tmp_path, env)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        assert _job(slurm_cluster, job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), cluster_log(
            slurm_cluster, tmp_path, job)
        time.sleep(0.5)
    proc = slurm_cluster.run("scancel", "--batch", "--signal=USR1", str(job))
    assert proc.returncode == 0, proc.stderr
    info = _wait(slurm_cluster, job, 240, until=lambda i: (i.get("Restarts", "0") != "0" and i.get("JobState") == "PENDING")
                 or i.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"))
    assert info.get("Restarts", "0") == "1", cluster_log(slurm_cluster, tmp_path, job)
    # Slurm holds a requeued batch job ~2 minutes (EligibleTime) so that the job credential slurmd
    # revoked at the requeue expires; a test need not wait that long, but slurmd rejects any
    # credential created in or before the second of the revocation (ctime <= revoked), which failed
    # the restart when StartTime=now fell in that second. A new credential 3 s later is accepted.
    time.sleep(3)
    slurm_cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    info = _wait(slurm_cluster, job, 240, until=lambda i: i.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"))
    slurm_cluster.timings["requeue_job_s"] = time.perf_counter() - start
    out = cluster_log(slurm_cluster, tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (
        f"{out}\n{info.get('Reason')}\n{slurm_cluster.logs()}")
    assert "requeueing job" in out and "resumed from" in out, out
    stopped = int(re.search(r"stopped by (?:SIG\w+|a signal on another rank) after step (\d+)", out).group(1))
    assert 1 <= stopped < steps, out
    rows = sorted({json.loads(line)["step"] for line in metrics.read_text().splitlines()})
    assert rows == list(range(1, steps + 1)), rows
    assert (tmp_path / "run" / "final" / "papo_model.json").is_file()


def cluster_log(cluster, tmp_path: Path, job: int) -> str:
    path = tmp_path / f"papo-tiny-{job}.out"
    return (path.read_text() if path.exists() else "(no job output)")[-5000:]
