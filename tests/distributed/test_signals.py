"""SIGUSR1 / SIGTERM stop `papo-mega train` cleanly, without Slurm (torchrun, DP2, CPU).

Slurm's `--signal=USR1@T` warns before the time limit; preemption and scancel send TERM. The run
finishes the step in progress, all ranks agree to stop (the signal reaches only one rank here),
write a checkpoint of that step, exit 0 without a final model, and `--resume auto` finishes the
remaining steps.
"""

import os
import signal
import subprocess
import time

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


@pytest.mark.timeout(480)
def test_sigusr1_on_one_rank_checkpoints_the_step_and_exits_cleanly(shards, tmp_path):  # noqa: F811
    sig = signal.SIGUSR1
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
        workers[1].send_signal(sig)  # one rank only: the all-reduced flag must stop both
        code = proc.wait(timeout=300)
    text = log.read_text()
    assert code == 0, text[-3000:]
    # Rank 0 did not get the signal itself: it reports "stopped by a signal on another rank".
    line = next((ln for ln in text.splitlines() if "[papo-mega] stopped by" in ln), None)
    assert line is not None, text[-3000:]
    stopped = int(line.split(" after step ")[1].split()[0])
    assert 2 <= stopped < STEPS, line
    assert sorted(steps_logged(run_dir)) == list(range(1, stopped + 1))
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert checkpoints == [f"step_{stopped:08d}"], checkpoints
    assert not (run_dir / "final").exists(), "a stopped run must not publish a final model"

    resumed = subprocess.run(torchrun([*args, "--resume", "auto"]), env=ENV, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {stopped}" in next(ln for ln in resumed.stdout.splitlines() if "resumed from" in ln)
    assert sorted(steps_logged(run_dir)) == list(range(1, STEPS + 1))
    assert (run_dir / "final" / "papo_model.json").is_file()


def test_stop_request_ignores_a_repeated_usr1_and_dies_on_a_later_term():
    from papo_mega.train import StopRequest

    hits = []
    previous = {sig: signal.signal(sig, lambda signum, _: hits.append(signum))
                for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        stop = StopRequest()
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)  # e.g. Slurm's warning and the batch script's forward
        assert stop.signum == signal.SIGUSR1 and not hits
        os.kill(os.getpid(), signal.SIGTERM)  # out of time: the handler from before (default: die) runs
        assert hits == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGUSR1) is not stop._handle
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
