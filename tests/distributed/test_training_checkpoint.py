"""Full training checkpoints: exact resume after SIGKILL, crashes inside a save, keep_last and the
latest pointer, a full disk, loading at other layouts, wrong inputs, and the DP replica check.

Runs are tiny (4-layer GPT, 6 steps) but real: megatron DDP + DistributedOptimizer, warmup +
cosine LR, a ShardStream per DP rank and RNG draws every step (tests/distributed/ckpt_workers.py).
"""

import json
import math
import os

import pytest
import torch
from PIL import Image

from papo_mega.checkpoint import (
    LATEST,
    MARKER,
    latest_checkpoint,
    read_marker,
    resolve_resume,
    save_training_checkpoint,
)
from papo_mega.data.shard_writer import Sample, encode_png, write_shards
from papo_mega.errors import PapoError
from tests.distributed.ckpt_workers import (
    failing_saves,
    load_cases,
    make_config,
    perturbed_replica,
    save_for_layouts,
    train_run,
)
from tests.distributed.harness import DistributedTestFailure, run_distributed

DP2 = ({"tp_size": 1, "pp_size": 1}, 2)
TP2PP2 = ({"tp_size": 2, "pp_size": 2}, 4)
# A SIGKILLed rank: the parent sees it die, or first sees a peer fail on the broken connection.
KILLED = "died with exit code -9|Connection closed by peer|Connection reset by peer"


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """21 tiny samples in 5 shards: a DP rank's 4 rows a step cross epoch boundaries within 6 steps."""
    directory = tmp_path_factory.mktemp("shards")
    samples = (Sample(f"k{i:04d}", encode_png(Image.new("RGB", (4, 4), (i, 2 * i, 0))), "png",
                      {"question": f"q{i}", "answer": str(i)}) for i in range(21))
    write_shards(samples, directory, 5)
    return str(directory)


def _steps(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name != LATEST)


def _pointer(run_dir) -> str:
    return (run_dir / "checkpoints" / LATEST).read_text().strip()


@pytest.fixture(scope="module")
def reference_dp2(tmp_path_factory, shard_dir):
    """The uninterrupted DP2 run: 6 steps, a checkpoint every 2, keep_last=2."""
    run_dir = tmp_path_factory.mktemp("ref_dp2")
    layout, world = DP2
    result = run_distributed(train_run, world, args=(make_config(str(run_dir), layout, resume="none"), shard_dir),
                             timeout_s=240)[0]
    return run_dir, result


def _assert_same_run(resumed: dict, reference: dict, first_step: int) -> None:
    for step in range(first_step, 7):
        # Bit-identical: the same losses, LRs and sample ids, not merely close ones.
        assert resumed["losses"][step] == reference["losses"][step], (step, resumed["losses"], reference["losses"])
        assert resumed["lrs"][step] == reference["lrs"][step]
    assert set(resumed["weights"]) == set(reference["weights"])
    for name, value in reference["weights"].items():
        assert torch.equal(resumed["weights"][name], value), name


def _kill_and_resume(tmp_path, shard_dir, layout, world, reference):
    run_dir = tmp_path / "run"
    cfg = make_config(str(run_dir), layout, resume="auto")
    # SIGKILL the last rank as step 5 starts (the checkpoint of step 4 is published by then).
    with pytest.raises(DistributedTestFailure, match=KILLED):
        run_distributed(train_run, world, args=(cfg, shard_dir, {"step": 4, "rank": world - 1}), timeout_s=240)
    assert _pointer(run_dir) == "step_00000004"
    resumed = run_distributed(train_run, world, args=(cfg, shard_dir), timeout_s=240)[0]
    assert resumed["start"] == 4
    _assert_same_run(resumed, reference, first_step=5)
    # The samples of steps 5-6 are those the uninterrupted run drew (its last 2 * 4 on rank 0).
    assert resumed["samples"] == reference["samples"][-len(resumed["samples"]):]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_exact_resume_after_sigkill_dp2(tmp_path, shard_dir, reference_dp2):
    ref_dir, reference = reference_dp2
    # keep_last=2: steps 4 and 6 remain, and the pointer names the newest.
    assert _steps(ref_dir) == ["step_00000004", "step_00000006"]
    assert _pointer(ref_dir) == "step_00000006" and latest_checkpoint(ref_dir) == ref_dir / "checkpoints/step_00000006"
    # Through megatron's optimizer param groups: warmup from 0 over 2 updates, then cosine to
    # min_lr at update 6 (lrs[k] is the lr of update k-1, 0-based).
    lr, min_lr = 1e-2, 1e-4
    for k, got in reference["lrs"].items():
        u = k - 1
        want = lr * u / 2 if u <= 2 else min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (u - 2) / 4))
        assert got == pytest.approx(want, rel=1e-12), (k, got, want)
    _kill_and_resume(tmp_path, shard_dir, *DP2, reference)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_exact_resume_after_sigkill_tp2pp2(tmp_path, shard_dir):
    layout, world = TP2PP2
    ref_dir = tmp_path / "ref"
    reference = run_distributed(train_run, world, args=(make_config(str(ref_dir), layout, resume="none"), shard_dir),
                                timeout_s=300)[0]
    meta = read_marker(ref_dir / "checkpoints/step_00000006")
    assert meta["layout"]["tp_size"] == 2 and meta["layout"]["pp_size"] == 2 and len(meta["ranks"]) == 4
    assert sorted(os.listdir(ref_dir / "checkpoints/step_00000006/rank_state")) == [
        f"rank_{r:05d}.pt" for r in range(4)]
    _kill_and_resume(tmp_path, shard_dir, layout, world, reference)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_crash_inside_save_keeps_previous_checkpoint(tmp_path, shard_dir, reference_dp2):
    _, reference = reference_dp2
    layout, world = DP2
    run_dir = tmp_path / "run"
    cfg = make_config(str(run_dir), layout, resume="auto")
    ckpts = run_dir / "checkpoints"

    # 1. Killed after every rank wrote its shards and state, before the marker and the rename.
    with pytest.raises(DistributedTestFailure, match=KILLED):
        run_distributed(train_run, world, args=(cfg, shard_dir, None, {"phase": "shards_written", "step": 4,
                                                                         "rank": 0}), timeout_s=240)
    stale = [p.name for p in ckpts.iterdir() if p.name.startswith("step_00000004.tmp-")]
    assert len(stale) == 1 and (ckpts / stale[0] / "metadata.json").is_file()
    assert not (ckpts / stale[0] / MARKER).exists()
    assert _pointer(run_dir) == "step_00000002" and latest_checkpoint(run_dir) == ckpts / "step_00000002"

    # 2. Killed after the rename, before the pointer: the pointer (updated last) still wins.
    with pytest.raises(DistributedTestFailure, match=KILLED):
        run_distributed(train_run, world, args=(cfg, shard_dir, None, {"phase": "published", "step": 4, "rank": 0}),
                        timeout_s=240)
    assert read_marker(ckpts / "step_00000004") is not None
    assert _pointer(run_dir) == "step_00000002" and latest_checkpoint(run_dir) == ckpts / "step_00000002"

    # 3. Resume (from step 2) to the end: the same run as the uninterrupted one, and later saves
    #    clean up the stale temporary directory, the superseded step 4 and step 2 (keep_last=2).
    resumed = run_distributed(train_run, world, args=(cfg, shard_dir), timeout_s=240)[0]
    assert resumed["start"] == 2
    _assert_same_run(resumed, reference, first_step=3)
    assert _steps(run_dir) == ["step_00000004", "step_00000006"]
    assert _pointer(run_dir) == "step_00000006"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_disk_full_is_one_line_error_and_nothing_published(tmp_path, shard_dir):
    layout, world = DP2
    run_dir = tmp_path / "run"
    out = run_distributed(failing_saves, world, args=(make_config(str(run_dir), layout), shard_dir),
                          timeout_s=240)[0]
    for message, step, intact in zip(out["messages"], (4, 6), ("step_00000002", "step_00000004")):
        # rank 1's own write, then megatron's shard writer on rank 1: the same one-line error on rank 0
        assert message is not None and "\n" not in message, message
        assert f"step {step}" in message and str(run_dir / "checkpoints") in message
        assert f"previous checkpoint {run_dir / 'checkpoints' / intact} is intact" in message
        assert "No space left on device" in message, message
    # Nothing half-written stays behind; the save retried after the first failure was published.
    assert out["final"].endswith("step_00000004")
    assert _steps(run_dir) == ["step_00000002", "step_00000004"]
    assert _pointer(run_dir) == "step_00000004"


# -- layouts ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_at_tp2(tmp_path_factory, shard_dir):
    """Checkpoints of step 2 written at TP2 (dp 1): DistributedOptimizer in megatron's default
    dp_reshardable format, in fully_reshardable format, and with the plain optimizer."""
    base = tmp_path_factory.mktemp("tp2")
    layout = {"tp_size": 2, "pp_size": 1}
    cases = [(make_config(str(base / "distopt"), layout), "dp_reshardable"),
             (make_config(str(base / "full"), layout), "fully_reshardable"),
             (make_config(str(base / "plain"), layout, distopt=False), "dp_reshardable")]
    results = run_distributed(save_for_layouts, 2, args=(cases, shard_dir), timeout_s=300)[0]
    paths = {name: base / name / "checkpoints" / "step_00000002" for name in ("distopt", "full", "plain")}
    return paths, dict(zip(("distopt", "full", "plain"), results))


def _close(a, b, atol):
    return a.shape == b.shape and (a - b).abs().max().item() <= atol


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_load_at_tp1_and_other_model(tmp_path, saved_at_tp2):
    paths, saved = saved_at_tp2
    cases = [(make_config(str(tmp_path), {}), str(paths["distopt"]), False),
             (make_config(str(tmp_path), {}, model={"hidden_size": 64}), str(paths["distopt"]), False)]
    weights_only, other_model = run_distributed(load_cases, 1, args=(cases,), timeout_s=240)[0]
    torch.testing.assert_close(weights_only["loaded"], saved["distopt"]["saved"], rtol=0, atol=1e-5)
    assert weights_only["step"] == 2 and weights_only["num_steps"] == 2  # the LR schedule continues
    assert weights_only["rank_state"]["step"] == 2  # TP2 -> TP1 keeps dp=1: the state of DP rank 0
    message = other_model["error"]
    assert "\n" not in message and "model.hidden_size 32 in the checkpoint, 64 now" in message


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_load_at_pp2_optimizer_resharding(tmp_path, saved_at_tp2):
    paths, saved = saved_at_tp2
    pp2 = {"tp_size": 1, "pp_size": 2}
    cases = [(make_config(str(tmp_path), pp2), str(paths["distopt"]), False),
             (make_config(str(tmp_path), pp2), str(paths["distopt"]), True),
             (make_config(str(tmp_path), pp2), str(paths["full"]), True),
             (make_config(str(tmp_path), pp2, distopt=False), str(paths["plain"]), True),
             (make_config(str(tmp_path), pp2, distopt=False), str(paths["distopt"]), True)]
    weights_only, dp_resh, full, plain, kind_mismatch = run_distributed(load_cases, 2, args=(cases,),
                                                                         timeout_s=240)[0]
    # Weights reshard TP2 -> PP2 exactly (up to reduction order).
    torch.testing.assert_close(weights_only["loaded"], saved["distopt"]["saved"], rtol=0, atol=1e-5)
    assert weights_only["rank_state"] == {"step": 2, "stream": weights_only["rank_state"]["stream"]}
    # Without the optimizer moments the next update goes elsewhere.
    assert not _close(weights_only["after"], saved["distopt"]["after"], 1e-3)
    # dp_reshardable distributed-optimizer state cannot follow TP2 -> PP2: a one-line message.
    assert "\n" not in dp_resh["error"] and "checkpoint.load_optimizer=false" in dp_resh["error"]
    assert "reshards only across the data-parallel size" in dp_resh["error"]
    # fully_reshardable and the plain optimizer's model-space state do.
    assert _close(full["after"], saved["full"]["after"], 1e-4)
    assert _close(plain["after"], saved["plain"]["after"], 1e-4)
    assert "distributed optimizer" in kind_mismatch["error"] and "load_optimizer=false" in kind_mismatch["error"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_distributed_optimizer_reshards_across_dp(tmp_path, saved_at_tp2):
    paths, saved = saved_at_tp2
    cases = [(make_config(str(tmp_path), {"tp_size": 2, "pp_size": 1}), str(paths["distopt"]), True)]
    (result,) = run_distributed(load_cases, 4, args=(cases,), timeout_s=300)[0]
    assert "error" not in result, result
    assert _close(result["after"], saved["distopt"]["after"], 1e-4)
    assert result["rank_state"] is None  # dp 1 -> 2: data positions do not carry over


# -- inputs, pointers, replicas --------------------------------------------------------------------


def _fake_checkpoint(root, step: int, complete: bool = True):
    path = root / "checkpoints" / f"step_{step:08d}"
    path.mkdir(parents=True)
    if complete:
        (path / MARKER).write_text(json.dumps({"complete": True, "step": step}))
    return path


def test_latest_pointer_and_fallbacks(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    two = _fake_checkpoint(tmp_path, 2)
    four = _fake_checkpoint(tmp_path, 4)
    _fake_checkpoint(tmp_path, 6, complete=False)  # no marker: never complete
    tmp = tmp_path / "checkpoints" / "step_00000008.tmp-0123abcd"
    tmp.mkdir()
    (tmp / MARKER).write_text(json.dumps({"complete": True}))  # an unpublished save, even with a marker
    assert latest_checkpoint(tmp_path) == four  # no pointer: the newest complete step
    (tmp_path / "checkpoints" / LATEST).write_text("step_00000002\n")
    assert latest_checkpoint(tmp_path) == two  # the pointer wins
    for corrupt in ("step_00000006", "garbage", "step_00000008.tmp-0123abcd", ""):
        (tmp_path / "checkpoints" / LATEST).write_text(corrupt)
        assert latest_checkpoint(tmp_path) == four, corrupt


def test_resolve_resume_modes_and_bad_paths(tmp_path):
    run_dir = tmp_path / "run"
    cfg = make_config(str(run_dir), {}, resume="auto")
    assert resolve_resume(cfg) is None  # a fresh run
    two = _fake_checkpoint(run_dir, 2)
    assert resolve_resume(cfg) == two
    cfg.checkpoint.resume = "none"
    assert resolve_resume(cfg) is None
    cfg.checkpoint.resume = str(two)
    assert resolve_resume(cfg) == two
    plain = tmp_path / "not_a_checkpoint"
    plain.mkdir()
    for bad, why in [(tmp_path / "missing", "does not exist"), (plain, "no checkpoint.json"),
                     (run_dir, "looks like a run directory"), (_fake_checkpoint(run_dir, 4, complete=False), "no ")]:
        cfg.checkpoint.resume = str(bad)
        with pytest.raises(PapoError, match=why) as info:
            resolve_resume(cfg)
        assert "\n" not in str(info.value)


def test_save_signature_is_stable():
    # The positional API the trainer calls (papo_mega/train.py).
    import inspect

    params = list(inspect.signature(save_training_checkpoint).parameters)
    assert params[:8] == ["run_dir", "step", "chunks", "optimizer", "scheduler", "rank_state", "cfg", "groups"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_perturbed_replica_is_caught():
    out = run_distributed(perturbed_replica, 2, args=({"tp_size": 1, "pp_size": 1},), timeout_s=240)[0]
    assert out["clean"] is None
    assert out["nudged"] and out["perturbed"] is not None and "\n" not in out["perturbed"]
    assert f"parameter chunk0.{out['nudged']} differs between DP rank 0 and DP rank 1" in out["perturbed"]
