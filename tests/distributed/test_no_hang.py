"""`papo-mega train` never spins or leaves processes behind (issue 16, findings 5, 6 and 7).

- data.max_prompt_len below every prompt: a one-line error (exit 2), not an endless search.
- some prompts too long: counted against data.max_skip_fraction (an error past it, the share
  logged as data/skip_fraction below it), not a run that silently trains on the short ones.
- kill -9 of a DP2 torchrun job (the launcher alone, or every process): no process of the job,
  checkpoint writers and resource trackers included, is alive 10 s later.
"""

import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.distributed.test_train import ENV, recipe, shards, steps_logged, torchrun  # noqa: F401 (fixture)


def _train(shards, run_dir, *overrides) -> subprocess.CompletedProcess:  # noqa: F811
    args = [sys.executable, "-m", "papo_mega.cli", "train", str(shards / "recipe.yaml"), *recipe(shards),
            f"run.run_dir={run_dir}", *overrides]
    return subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=400)


def _error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("papo-mega: error")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "train failed at step" not in proc.stderr, proc.stderr[-3000:]  # no crash hint beside the one line
    return lines[0]


@pytest.mark.timeout(450)
def test_max_prompt_len_below_every_prompt_is_one_line_error(shards, tmp_path):  # noqa: F811
    # max_skip_fraction=1 (never too many): only "a whole epoch skipped" can end the search.
    line = _error_line(_train(shards, tmp_path / "run", "data.max_prompt_len=8", "data.max_skip_fraction=1.0"))
    assert "were skipped, nothing is usable" in line and "raise data.max_prompt_len" in line, line


@pytest.mark.timeout(900)
def test_too_long_prompts_count_against_max_skip_fraction(shards, tmp_path):  # noqa: F811
    # The tiny tokenizer's synthetic prompts are 80-86 tokens: 84 drops 40% of them, 80 drops 60%.
    line = _error_line(_train(shards, tmp_path / "strict", "data.max_prompt_len=84"))
    assert "more than data.max_skip_fraction=0.01" in line and "prompt has" in line, line
    proc = _train(shards, tmp_path / "lenient", "data.max_prompt_len=80", "data.max_skip_fraction=0.9",
                  "train.steps=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = steps_logged(tmp_path / "lenient")[1]
    assert logged["data/skipped_prompts"] > 0 and 0 < logged["data/skip_fraction"] < 0.9, logged


def _family(proc: subprocess.Popen) -> list[psutil.Process]:
    return [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]


@pytest.mark.timeout(480)
@pytest.mark.parametrize("target", ["launcher", "every_process"])
def test_kill_9_of_a_dp2_train_leaves_no_process(shards, tmp_path, target):  # noqa: F811
    run_dir = tmp_path / "run"
    args = [str(shards / "recipe.yaml"), *recipe(shards), "train.steps=50", "checkpoint.save_every=1",
            f"run.run_dir={run_dir}"]
    log = tmp_path / "train.log"
    proc = subprocess.Popen(torchrun(args), env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    seen: dict[int, psutil.Process] = {}
    deadline = time.time() + 400
    # After a second step's checkpoint: megatron's writer has run (its children exist from the first save).
    while 2 not in steps_logged(run_dir) and time.time() < deadline and proc.poll() is None:
        seen.update({p.pid: p for p in _family(proc)})
        time.sleep(0.2)
    assert proc.poll() is None, f"the run ended before it was killed: {log.read_text()[-3000:]}"
    family = _family(proc)
    seen.update({p.pid: p for p in family})
    for member in family if target == "every_process" else family[:1]:
        member.send_signal(signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(list(seen.values()), timeout=10)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    left = [" ".join(p.cmdline())[:120] for p in alive]
    for p in alive:  # leave nothing behind for the next test either
        p.kill()
    assert not left, left
