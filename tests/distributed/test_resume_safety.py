"""`papo-mega train` never loses saved work and never drifts silently on resume (issue 16.3, 16.9,
16.11), on the tiny VLM (CPU, gloo, the harness's processes):

- a resume whose config changes the algorithm or the learning rate is refused on every rank, with
  the difference named, and RUN_DIR/config.yaml is left as it was; a resume that only extends
  train.steps goes on and keeps the earlier config.yaml as config.step_N.yaml;
- --resume none over a finished run refuses and leaves it intact; --overwrite moves it aside;
- a damaged latest checkpoint (truncated shard, truncated rank_state, corrupt checkpoint.json) is
  reported with its cause and resume=auto falls back to the newest intact one, also in a real run.
"""

import json
import shutil
from pathlib import Path

import pytest

from papo_mega.checkpoint import CHECKPOINTS, MARKER, RANK_STATE, newest_intact_checkpoint, resolve_resume
from papo_mega.config import load_config, read_yaml
from papo_mega.errors import PapoError
from tests.distributed.harness import run_distributed
from tests.distributed.test_train import recipe, shards  # noqa: F401 (fixture)

STEPS = 2


def train_job(overrides: list[str], kwargs: dict) -> dict:
    """run_train on this rank; {'error': the PapoError's text} or {'steps': steps logged}."""
    from papo_mega.config import load_config
    from papo_mega.train import run_train

    try:
        run_train(load_config(None, overrides), **kwargs)
    except PapoError as err:
        return {"error": str(err)}
    return {"error": None}


def unchecked_train_job(overrides: list[str], kwargs: dict) -> dict:
    """train_job with the pre-load check switched off: damage it cannot see reaches the load."""
    from papo_mega import checkpoint

    checkpoint.checkpoint_problem = lambda path: None
    return train_job(overrides, kwargs)


def _run(root: Path, run_dir: Path, *extra: str, nproc: int = 1, job=train_job, **kwargs) -> list[dict]:
    overrides = [*recipe(root), f"train.steps={STEPS}", "checkpoint.save_every=1", f"run.run_dir={run_dir}", *extra]
    return run_distributed(job, nproc, args=(overrides, kwargs), timeout_s=300)


@pytest.fixture(scope="module")
def finished(shards, tmp_path_factory):  # noqa: F811
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert _run(shards, run_dir) == [{"error": None}]
    return run_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


def _metrics(run_dir: Path) -> str:
    return (run_dir / "metrics.jsonl").read_text()


@pytest.mark.parametrize("change, named", [
    (("algo.name=grpo", "loss.prcp_coef=0", "loss.masked_entropy_coef=0"), "algo.name 'papo_g' -> 'grpo'"),
    (("train.lr=0.5",), "train.lr 0.001 -> 0.5"),
], ids=["algorithm", "lr"])
def test_resume_with_a_changed_run_is_refused_on_every_rank(shards, finished, tmp_path, change, named):  # noqa: F811
    run_dir = _copy(finished, tmp_path)
    config_before = (run_dir / "config.yaml").read_text()
    out = _run(shards, run_dir, f"train.steps={STEPS + 1}", *change, nproc=2)
    assert all(r["error"] and named in r["error"] and "--allow-config-change" in r["error"] for r in out), out
    assert len({r["error"] for r in out}) == 1 and "\n" not in out[0]["error"]
    assert (run_dir / "config.yaml").read_text() == config_before
    assert not list(run_dir.glob("config.step_*.yaml")) and not (run_dir / "checkpoints/step_00000003").exists()


def test_resume_extending_steps_goes_on_and_keeps_the_config_history(shards, finished, tmp_path):  # noqa: F811
    run_dir = _copy(finished, tmp_path)
    assert _run(shards, run_dir, f"train.steps={STEPS + 1}") == [{"error": None}]
    assert read_yaml(run_dir / "config.yaml")["train"]["steps"] == STEPS + 1
    assert read_yaml(run_dir / f"config.step_{STEPS:08d}.yaml")["train"]["steps"] == STEPS
    assert [json.loads(line)["step"] for line in _metrics(run_dir).splitlines()][-1] == STEPS + 1


def test_allow_config_change_accepts_a_changed_learning_rate(shards, finished, tmp_path):  # noqa: F811
    run_dir = _copy(finished, tmp_path)
    assert _run(shards, run_dir, f"train.steps={STEPS + 1}", "train.lr=0.002",
                allow_config_change=True) == [{"error": None}]
    assert read_yaml(run_dir / "config.yaml")["train"]["lr"] == 0.002
    assert read_yaml(run_dir / f"config.step_{STEPS:08d}.yaml")["train"]["lr"] == 0.001


def test_resume_none_over_a_run_refuses_then_overwrite_moves_it_aside(shards, finished, tmp_path):  # noqa: F811
    run_dir = _copy(finished, tmp_path)
    before = {p.relative_to(run_dir): p.stat().st_size for p in run_dir.rglob("*") if p.is_file()}
    out = _run(shards, run_dir, "checkpoint.resume=none", nproc=2)
    assert all(r["error"] and "--resume auto" in r["error"] and "--overwrite" in r["error"] for r in out), out
    after = {p.relative_to(run_dir): p.stat().st_size for p in run_dir.rglob("*") if p.is_file()}
    assert after == before  # nothing cut, overwritten or deleted
    assert _run(shards, run_dir, "checkpoint.resume=none", overwrite=True) == [{"error": None}]
    (aside,) = run_dir.glob("replaced-*")
    assert _metrics(aside) == _metrics(finished)
    assert sorted(p.name for p in (aside / CHECKPOINTS).glob("step_*")) == ["step_00000001", "step_00000002"]
    assert (aside / "final" / "papo_model.json").is_file() and (run_dir / "final" / "papo_model.json").is_file()


def _damage(ckpt: Path, what: str) -> str:
    """Damage one file of a checkpoint as a crash or a full disk would; return the expected cause."""
    if what == "shard":
        target = next(ckpt.glob("*.distcp"))
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
        return f"shard file {target.name} is truncated"
    if what == "rank_state":
        target = ckpt / RANK_STATE / "rank_00000.pt"
        target.write_bytes(target.read_bytes()[:100])
        return f"{RANK_STATE}/rank_00000.pt is unreadable"
    (ckpt / MARKER).write_text('{"complete": tr')
    return f"{MARKER} is not valid JSON"


@pytest.mark.parametrize("what", ["shard", "rank_state", "marker"])
def test_damaged_latest_checkpoint_is_reported_and_auto_takes_the_intact_one(finished, tmp_path, what):
    run_dir = _copy(finished, tmp_path)
    latest, earlier = run_dir / CHECKPOINTS / "step_00000002", run_dir / CHECKPOINTS / "step_00000001"
    cause = _damage(latest, what)
    notes: list[str] = []
    assert newest_intact_checkpoint(run_dir, notes) == earlier
    assert len(notes) == 1 and str(latest) in notes[0] and cause in notes[0] and str(earlier) in notes[0]
    cfg = load_config(None, [f"checkpoint.resume={latest}"])
    with pytest.raises(PapoError, match="damaged") as err:
        resolve_resume(cfg)
    assert "\n" not in str(err.value)
    _damage(earlier, what)
    with pytest.raises(PapoError, match="no intact checkpoint") as err:
        newest_intact_checkpoint(run_dir)
    assert "step_00000001" in str(err.value) and "step_00000002" in str(err.value)


def test_resume_auto_past_a_truncated_shard_finishes_the_run(shards, finished, tmp_path):  # noqa: F811
    run_dir = _copy(finished, tmp_path)
    _damage(run_dir / CHECKPOINTS / "step_00000002", "shard")
    assert _run(shards, run_dir) == [{"error": None}]  # resumes at step 1, redoes step 2
    steps = [json.loads(line)["step"] for line in _metrics(run_dir).splitlines()]
    assert steps == list(range(1, STEPS + 1))
    assert newest_intact_checkpoint(run_dir) == run_dir / CHECKPOINTS / "step_00000002"  # re-saved intact


@pytest.mark.parametrize("what", ["shard", "rank_state"])
def test_a_failing_load_names_the_earlier_intact_checkpoint(shards, finished, tmp_path, what):  # noqa: F811
    run_dir = _copy(finished, tmp_path)
    latest = run_dir / CHECKPOINTS / "step_00000002"
    _damage(latest, what)
    (out,) = _run(shards, run_dir, f"checkpoint.resume={latest}", job=unchecked_train_job)
    error = out["error"]
    assert error and "\n" not in error and f"checkpoint.resume={run_dir / CHECKPOINTS / 'step_00000001'}" in error
    assert "load_optimizer" not in error and (what != "rank_state" or "rank_00000.pt" in error)
