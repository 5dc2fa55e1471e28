"""SIGUSR1 / SIGTERM / SIGINT stop `papo-mega train` cleanly, without Slurm (torchrun, DP2, CPU).

Slurm's `--signal=USR1@T` warns before the time limit; preemption and scancel send TERM; Ctrl-C
sends INT. The run finishes the step in progress, all ranks agree to stop (the signal reaches only
one rank here), write a checkpoint of that step, exit 0 without a final model, and `--resume auto`
finishes the remaining steps. A TERM or INT after a stop signal ends a rank at once, even one
blocked in a collective (issue 16, finding 8).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.distributed.test_train import ENV, recipe, shards, steps_logged, torchrun  # noqa: F401 (fixture)

STEPS = 6


def _workers(proc: subprocess.Popen) -> dict[int, psutil.Process]:
    """torchrun's worker processes by rank."""
    out = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if rank is not None and "papo_mega.cli" in " ".join(child.cmdline()):
            out[int(rank)] = child
    return out


def _stop_one_rank(shards, tmp_path, sig: int, rank: int) -> tuple[list[str], Path, int, str]:  # noqa: F811
    """A DP2 run that gets `sig` on one rank after its second step: (args, run_dir, stopped step, stop line)."""
    run_dir = tmp_path / "run"
    args = [str(shards / "recipe.yaml"), *recipe(shards), f"train.steps={STEPS}", "checkpoint.save_every=0",
            f"run.run_dir={run_dir}"]
    log = tmp_path / "first.log"
    with log.open("w") as out:
        proc = subprocess.Popen(torchrun(args), env=ENV, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.time() + 300
        while 2 not in steps_logged(run_dir) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        workers = _workers(proc)
        assert sorted(workers) == [0, 1], f"workers not found: {workers}"
        workers[rank].send_signal(sig)  # one rank only: the all-reduced flag must stop both
        code = proc.wait(timeout=300)
    text = log.read_text()
    assert code == 0, text[-3000:]
    line = next((ln for ln in text.splitlines() if "[papo-mega] stopped by" in ln), None)
    assert line is not None, text[-3000:]
    stopped = int(line.split(" after step ")[1].split()[0])
    assert 2 <= stopped < STEPS, line
    assert sorted(steps_logged(run_dir)) == list(range(1, stopped + 1))
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert checkpoints == [f"step_{stopped:08d}"], checkpoints
    assert not (run_dir / "final").exists(), "a stopped run must not publish a final model"
    return args, run_dir, stopped, line


@pytest.mark.timeout(480)
def test_sigusr1_on_one_rank_checkpoints_the_step_and_exits_cleanly(shards, tmp_path):  # noqa: F811
    args, run_dir, stopped, line = _stop_one_rank(shards, tmp_path, signal.SIGUSR1, rank=1)
    # Rank 0 did not get the signal itself: it reports "stopped by a signal on another rank".
    assert "a signal on another rank" in line, line
    resumed = subprocess.run(torchrun([*args, "--resume", "auto"]), env=ENV, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {stopped}" in next(ln for ln in resumed.stdout.splitlines() if "resumed from" in ln)
    assert sorted(steps_logged(run_dir)) == list(range(1, STEPS + 1))
    assert (run_dir / "final" / "papo_model.json").is_file()


@pytest.mark.timeout(480)
def test_sigint_stops_like_sigterm_after_the_step_with_a_checkpoint(shards, tmp_path):  # noqa: F811
    """Ctrl-C (finding 8): the step finishes, both ranks checkpoint it, exit 0 - no KeyboardInterrupt."""
    _, _, _, line = _stop_one_rank(shards, tmp_path, signal.SIGINT, rank=0)
    assert "stopped by SIGINT" in line, line


def test_sigint_sets_the_flag_even_inside_an_at_fork_handler():
    """Finding 8: a KeyboardInterrupt raised in logging's at-fork handler is swallowed by Python and
    the run went on; a handler that only sets a flag cannot be swallowed."""
    from papo_mega.train import StopRequest

    armed = []
    os.register_at_fork(after_in_parent=lambda: armed and os.kill(os.getpid(), signal.SIGINT))
    stop = StopRequest()
    try:
        armed.append(True)
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        armed.clear()
        os.waitpid(pid, 0)
        assert stop.signum == signal.SIGINT
    finally:
        armed.clear()
        stop.restore()


def test_stop_request_ignores_a_repeated_usr1():
    from papo_mega.train import StopRequest

    stop = StopRequest()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)  # e.g. Slurm's warning and the batch script's forward
        assert stop.signum == signal.SIGUSR1
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR1) is not stop._handle


BLOCKED_RANK = """
import datetime, os, sys, time
import torch, torch.distributed as dist
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=300))
if rank == 1:
    time.sleep(300)  # never joins the collective
from papo_mega.train import StopRequest
stop = StopRequest()
print("blocked", flush=True)
dist.all_reduce(torch.zeros(1))  # waits in C++ for rank 1: no Python signal handler runs here
"""


@pytest.mark.timeout(240)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_second_stop_signal_ends_a_rank_blocked_in_a_collective(tmp_path, sig):
    from papo_mega.distributed.launcher import find_free_port

    script = tmp_path / "blocked.py"
    script.write_text(BLOCKED_RANK)
    port = str(find_free_port())
    ranks = [subprocess.Popen([sys.executable, str(script), str(r), port], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (1, 0)]
    try:
        assert ranks[1].stdout.readline().strip() == "blocked", ranks[1].stderr.read()[-2000:]
        time.sleep(1)  # into the all-reduce (nothing is timed: a signal sent earlier counts the same)
        ranks[1].send_signal(signal.SIGUSR1)  # the first stop signal: only a flag
        ranks[1].send_signal(sig)  # then TERM or INT: at once
        code = ranks[1].wait(timeout=120)
        assert code == 128 + sig, ranks[1].stderr.read()[-2000:]
        assert "stopping now, without a checkpoint" in ranks[1].stderr.read()
    finally:
        for proc in ranks:
            proc.kill()
            proc.wait()
