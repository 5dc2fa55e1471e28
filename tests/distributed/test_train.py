"""`papo-mega train` end to end on the tiny VLM and synthetic shards (CPU, gloo).

- SIGKILL in the middle of a run, then `--resume auto`: the remaining steps' metrics are
  bit-identical to an uninterrupted run (DP2, torchrun).
- TensorBoard event files are readable with the tensorboard package and hold the standard tags.
- The NaN guard skips and counts bad updates, then stops cleanly after train.nonfinite_patience.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from papo_mega.distributed.launcher import find_free_port
from tests.distributed.harness import make_synthetic, run_distributed

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
VOLATILE = ("time/", "perf/")  # wall-clock figures differ between runs by nature
STEPS = 8


def recipe(root: Path) -> list[str]:
    return ["preset=tiny", f"data.train_shards={root / 'train'}", "data.max_prompt_len=256", "algo.name=papo_g",
            "algo.prompts_per_step=4", "rollout.n=4", "rollout.max_new_tokens=12", "train.micro_batch_size=4",
            "train.global_batch_size=8", "train.lr=0.001", f"train.steps={STEPS}", "checkpoint.save_every=2",
            "loss.entropy_coef=0.01", "loss.masked_entropy_coef=0.01"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    make_synthetic(root / "train", "train", 64, samples_per_shard=32)
    (root / "recipe.yaml").write_text("preset: tiny\n")  # the rest comes as overrides
    return root


def torchrun(args: list[str], nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--master-port={find_free_port()}", "-m", "papo_mega.cli", "train", *args]


def steps_logged(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    out = {}
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        out[row["step"]] = {k: v for k, v in row.items() if k not in ("step", "wall_time") and not k.startswith(VOLATILE)}
    return out


def test_sigkill_then_resume_auto_repeats_the_uninterrupted_run(shards, tmp_path):
    config = [str(shards / "recipe.yaml")]
    full = subprocess.run(torchrun([*config, *recipe(shards), f"run.run_dir={tmp_path / 'full'}"]), env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]
    expected = steps_logged(tmp_path / "full")
    assert sorted(expected) == list(range(1, STEPS + 1))

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(torchrun([*config, *recipe(shards), f"run.run_dir={run_dir}"]), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while 3 not in steps_logged(run_dir) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    # SIGKILL every process of the job (torchrun starts its workers in their own sessions).
    family = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    for member in family:
        member.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode != 0 and len(steps_logged(run_dir)) < STEPS, "the run ended before it was killed"
    resumed = subprocess.run(torchrun([*config, *recipe(shards), f"run.run_dir={run_dir}", "--resume", "auto"]),
                             env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    line = next(line for line in resumed.stdout.splitlines() if "resumed from" in line)
    start = int(line.rsplit(" ", 1)[1])
    assert 2 <= start < STEPS, line
    got = steps_logged(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(start + 1, STEPS + 1):
        assert got[step] == expected[step], f"step {step} differs after resume from step {start}"


def test_tensorboard_holds_the_standard_tags(shards, tmp_path):
    from papo_mega.metrics import read_tensorboard_scalars

    run_dir = tmp_path / "tb"
    proc = subprocess.run([sys.executable, "-m", "papo_mega.cli", "train", str(shards / "recipe.yaml"), *recipe(shards),
                           "train.steps=2", f"run.run_dir={run_dir}"], env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scalars = read_tensorboard_scalars(run_dir)
    for tag in ("reward/mean", "reward/accuracy", "reward/format", "loss/kl_prcp", "loss/entropy",
                "loss/masked_entropy", "clip/high", "clip/low", "loss/kl_ref", "optim/grad_norm", "optim/lr",
                "response/length_mean", "perf/tokens_per_s", "time/update_s"):
        assert tag in scalars and [s for s, _ in scalars[tag]] == [1, 2], tag
    assert (run_dir / "final" / "papo_model.json").is_file()
    assert list((run_dir / "plots").glob("*.png"))


def nan_guard_worker(train_dir: str, run_dir: str):
    """Updates whose loss is NaN are skipped and counted; patience steps in a row stop the run."""
    from papo_mega import train
    from papo_mega.config import load_config
    from papo_mega.distributed import init_distributed
    from papo_mega.distributed.sharding import gather_full_tensors
    from papo_mega.errors import PapoError

    cfg = load_config(None, [*recipe(Path(train_dir).parent), f"run.run_dir={run_dir}", "train.nonfinite_patience=2"])
    groups = init_distributed({}, seed=1)
    trainer = train.PapoTrainer(cfg, groups)
    before = gather_full_tensors(trainer.chunks, groups, kind="param")
    real = train.papo_forward_backward
    train.papo_forward_backward = lambda *a, **k: {**real(*a, **k), "loss": math.nan}
    metrics = trainer.step(0)
    skipped_after_one = metrics["optim/skipped_updates"]
    try:
        trainer.step(1)
        stopped = None
    except PapoError as err:
        stopped = str(err)
    after = gather_full_tensors(trainer.chunks, groups, kind="param")
    unchanged = all(bool((before[k] == after[k]).all()) for k in before)
    return {"skipped": skipped_after_one, "stopped": stopped, "unchanged": unchanged}


def test_nan_guard_skips_counts_and_stops(shards, tmp_path):
    out = run_distributed(nan_guard_worker, 1, args=(str(shards / "train"), str(tmp_path / "run")))[0]
    assert out["skipped"] == 2  # both updates of the step: 4 prompts x 4 responses / 8 per update
    assert out["unchanged"], "a skipped update changed the weights"
    assert out["stopped"] is not None and "nonfinite_patience" in out["stopped"]


def test_interleaved_pipeline_trains_end_to_end(shards, tmp_path):
    """PP2 x VPP2: rollout through the model chunks (engine._forward_virtual_chunks), log-probs and
    updates through megatron's interleaved schedule, checkpoint and final model."""
    config = [str(shards / "recipe.yaml")]
    run_dir = tmp_path / "vpp"
    proc = subprocess.run(torchrun([*config, *recipe(shards), "train.steps=2", "parallel.pp_size=2",
                                    "parallel.vpp_size=2", f"run.run_dir={run_dir}"]),
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = steps_logged(run_dir)
    assert sorted(logged) == [1, 2] and all(math.isfinite(row["loss/total"]) for row in logged.values())
    assert (run_dir / "final" / "papo_model.json").is_file()
