"""`papo-mega sft` keeps its work (issue 16.10, 16.9): checkpoints in RUN_DIR/sft_run (not where
RL's `--resume auto` looks), metrics.jsonl + TensorBoard + plots there, an interrupted run resumed
with resume=auto repeats the uninterrupted one exactly (losses, grad norms, final weights; DP2),
and a fresh start over a finished SFT refuses unless told to overwrite."""

from pathlib import Path

import pytest

from papo_mega.checkpoint import CHECKPOINTS, newest_intact_checkpoint
from papo_mega.errors import PapoError
from papo_mega.sft import SFT_RUN
from tests.distributed.harness import assert_tensors_close, run_distributed
from tests.distributed.sft_workers import sft_job
from tests.distributed.test_sft import _overrides, shards  # noqa: F401 (fixture)

STEPS = 6
CRASH_AT = 4  # the 4th step fails: the checkpoint of step 2 is the last one (save_every=2)


def _args(shards, tmp_path: Path, *extra: str) -> list[str]:  # noqa: F811
    return [*_overrides(shards, tmp_path / "sft", STEPS), "checkpoint.save_every=2", *extra]


def crashing_sft_job(overrides: list[str], crash_at: int) -> str | None:
    """run_sft whose `crash_at`-th step raises on every rank (a stop mid-run); the error text."""
    from papo_mega import sft

    real, calls = sft.forward_backward, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == crash_at:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    sft.forward_backward = failing
    try:
        sft_job(overrides)
    except RuntimeError as err:
        return str(err)
    return None


def refused_sft_job(overrides: list[str]) -> str | None:
    try:
        sft_job(overrides)
    except PapoError as err:
        return str(err)
    return None


def model_weights(model_dir: str) -> dict:
    from papo_mega.distributed import init_distributed
    from papo_mega.distributed.sharding import gather_full_tensors
    from papo_mega.model_dir import load_model_dir

    groups = init_distributed({}, seed=1)
    chunks = load_model_dir(model_dir, groups)[0]
    return gather_full_tensors(chunks, groups, kind="param")


def _curve(log: list[dict]) -> list[tuple]:
    return [(row["step"], row["loss"], row["grad_norm"]) for row in log]  # wall_s differs by nature


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("sft_full")
    return run_distributed(sft_job, 2, args=(_args(shards, root),), timeout_s=300)[0]


def test_interrupted_sft_resumes_exactly_where_it_stopped(shards, uninterrupted, tmp_path):  # noqa: F811
    args = _args(shards, tmp_path)
    crashed = run_distributed(crashing_sft_job, 2, args=(args, CRASH_AT), timeout_s=300)
    assert crashed == ["simulated crash"] * 2
    run_dir = tmp_path / SFT_RUN
    assert newest_intact_checkpoint(run_dir).name == "step_00000002"
    import torch

    # The skip totals travel with the checkpoint, so max_skip_fraction judges the whole run after a resume.
    saved = torch.load(newest_intact_checkpoint(run_dir) / "rank_state" / "rank_00000.pt", weights_only=False)
    assert saved["user"]["skips"]["samples_read"] > 0
    assert not (tmp_path / CHECKPOINTS).exists() and not (tmp_path / "metrics.jsonl").exists()  # RL's places

    resumed = run_distributed(sft_job, 2, args=(args,), timeout_s=300)[0]
    assert _curve(resumed["log"]) == _curve(uninterrupted["log"])
    assert_tensors_close(run_distributed(model_weights, 1, args=(resumed["out"],))[0],
                         run_distributed(model_weights, 1, args=(uninterrupted["out"],))[0], 0.0, "final weights")
    from papo_mega.metrics import read_metrics

    assert [s for s, _ in read_metrics(run_dir)["loss/sft"]] == list(range(1, STEPS + 1))
    assert list((run_dir / "tb").iterdir()) and list((run_dir / "plots").glob("*.png"))


def test_sft_over_a_finished_sft_refuses_unless_overwrite(shards, uninterrupted):  # noqa: F811
    out = Path(uninterrupted["out"])
    args = [*_overrides(shards, out, STEPS), "checkpoint.save_every=2",
            "checkpoint.resume=none"]
    error = run_distributed(refused_sft_job, 1, args=(args,), timeout_s=300)[0]
    assert error is not None and "--overwrite" in error and "--resume auto" in error and "\n" not in error
    assert (out / "sft_log.json").is_file()
