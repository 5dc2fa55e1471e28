"""`papo-mega sweep` without training: the run matrix and each algorithm's settings, seed
aggregation and paired differences against a plain computation over eval.json files written
here, skipping finished runs, the report and plots, and the one-line errors (sweep.py,
sweep_report.py). The real end-to-end sweep: tests/distributed/test_sweep.py."""

import json
import math
import os
import sys
from pathlib import Path

import pytest

from papo_mega import sweep
from papo_mega.cli import main
from papo_mega.config import ALGORITHMS, load_config
from papo_mega.errors import PapoError
from papo_mega.sweep import ALGO_SETTINGS, SweepPlan, plan_runs, run_sweep
from papo_mega.sweep_report import build_results, format_results, last_eval, step_band

RECIPE = str(Path(__file__).resolve().parents[2] / "examples" / "tiny_cpu.yaml")
VIEWS = ("original", "masked", "blank")
TASKS = ("count", "compare_size")


def _plain_mean_std(values):
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None)


def _accuracy(algo: str, seed: int, view: str, task: str) -> float:
    """A made-up figure per run, different across algorithms, seeds, views and tasks."""
    return round(0.2 + 0.1 * ALGORITHMS.index(algo) + 0.07 * seed ** 2 + 0.05 * VIEWS.index(view)
                 + 0.02 * TASKS.index(task), 6)


def _eval_json(algo: str, seed: int, *, new_keys: bool = True) -> dict:
    acc = {v: {t: _accuracy(algo, seed, v, t) for t in TASKS} for v in VIEWS}
    for v in VIEWS:
        acc[v]["overall"] = sum(acc[v].values()) / len(TASKS)
    result = {"k": 2, "questions": 10, "accuracy": acc, "format_rate": {v: 0.9 for v in VIEWS}}
    if new_keys:
        wellformed = {v: {t: a + 0.01 for t, a in tasks.items()} for v, tasks in acc.items()}
        if seed == 1:  # no well-formed answer with a blank image on this seed: None, left out of the mean
            wellformed["blank"]["count"] = None
        result |= {"format": {v: {t: 0.9 for t in acc[v]} for v in VIEWS}, "wellformed_accuracy": wellformed,
                   "chance": {"count": 0.25, "compare_size": 0.5, "overall": 0.375},
                   "vision_reliance": {"original_minus_blank": 0.1 * seed, "original_minus_masked": None}}
    return result


def _write_run(run_dir: Path, algo: str, seed: int, steps: int = 2, *, finished: bool = True, new_keys=True) -> None:
    """What a train run leaves: an early and the last eval.json, metrics.jsonl, final model and
    the completion marker of its last checkpoint."""
    early = {**_eval_json(algo, seed, new_keys=new_keys), "accuracy": {v: {"overall": 0.0} for v in VIEWS}}
    for step, result in ((0, early), (steps, _eval_json(algo, seed, new_keys=new_keys))):
        (run_dir / "eval" / f"step_{step:06d}").mkdir(parents=True, exist_ok=True)
        (run_dir / "eval" / f"step_{step:06d}" / "eval.json").write_text(json.dumps(result))
    rows = [{"step": s, "wall_time": 0.0, "eval/original_accuracy": 0.1 * s + 0.01 * seed,
             "loss/kl_prcp": 0.01 * s, "loss/entropy": 1.0, "loss/masked_entropy": 1.1} for s in range(steps + 1)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        ckpt = run_dir / "checkpoints" / f"step_{steps:08d}"
        ckpt.mkdir(parents=True)
        (ckpt / "checkpoint.json").write_text(json.dumps({"complete": True, "step": steps}))
        (run_dir / "checkpoints" / "latest").write_text(ckpt.name)
        (run_dir / "final").mkdir()
        (run_dir / "final" / "papo_model.json").write_text("{}")


def _overrides_of(run) -> dict:
    return dict(item.split("=", 1) for item in run.overrides)


# --- the matrix ----------------------------------------------------------------------------------
def test_every_algorithm_has_published_settings_that_pass_its_own_checks():
    assert set(ALGO_SETTINGS) == set(ALGORITHMS)
    runs = plan_runs(Path("out"), list(ALGORITHMS), [3], True, ["train.steps=2"], {a: [] for a in ALGORITHMS})
    for run in runs[1:]:
        cfg = load_config(RECIPE, list(run.overrides))
        cfg.check_algorithm()
        assert cfg.algo.name == run.algo
        assert {k: getattr(cfg.loss, k.split(".")[1]) for k in ALGO_SETTINGS[run.algo]} == ALGO_SETTINGS[run.algo]
    # the published differences (docs/algorithm.md): GRPO without perception, DAPO/PAPO-D without a reference
    assert ALGO_SETTINGS["grpo"]["loss.prcp_coef"] == 0 and ALGO_SETTINGS["papo_g"]["loss.prcp_coef"] == 0.02
    assert ALGO_SETTINGS["dapo"]["loss.kl_coef"] == 0 and ALGO_SETTINGS["papo_d"]["loss.clip_high"] == 0.28


def test_matrix_shares_one_sft_per_seed_and_applies_per_algorithm_overrides():
    common, per_algo = sweep.split_overrides(["train.steps=2", "papo_g:loss.prcp_coef=0.04"], ["grpo", "papo_g"])
    assert common == ["train.steps=2"] and per_algo == {"grpo": [], "papo_g": ["loss.prcp_coef=0.04"]}
    runs = plan_runs(Path("out"), ["grpo", "papo_g"], [0, 1], True, common, per_algo)
    assert [r.name for r in runs] == ["sft_s0", "grpo_s0", "papo_g_s0", "sft_s1", "grpo_s1", "papo_g_s1"]
    for run in runs:
        o = _overrides_of(run)
        assert o["train.seed"] == str(run.seed) and o["run.run_dir"] == str(run.run_dir)
        assert o["checkpoint.resume"] == "auto" and o["train.steps"] == "2"
        if run.command == "sft":
            assert o["sft.out"] == str(Path("out") / f"sft_s{run.seed}" / "sft")
        else:  # the SFT of its own seed, shared by both algorithms
            assert o["algo.init_from"] == str(Path("out") / f"sft_s{run.seed}" / "sft")
            assert o["algo.name"] == run.algo
    papo = load_config(RECIPE, list(runs[2].overrides))
    assert papo.loss.prcp_coef == 0.04  # ALGO:key=value comes after the published setting and wins
    assert load_config(RECIPE, list(runs[1].overrides)).loss.prcp_coef == 0.0
    no_sft = plan_runs(Path("out"), ["grpo"], [0], False, [], {})
    assert [r.name for r in no_sft] == ["grpo_s0"] and "algo.init_from" not in _overrides_of(no_sft[0])


def test_sft_auto_follows_the_recipe(tmp_path):
    assert sweep.wants_sft(load_config(RECIPE), "auto")  # tiny_cpu: an sft: section, no init_from
    assert not sweep.wants_sft(load_config(RECIPE, ["algo.init_from=ckpt"]), "auto")
    bare = tmp_path / "bare.yaml"
    bare.write_text("preset: tiny\n")
    assert not sweep.wants_sft(load_config(bare), "auto") and sweep.wants_sft(load_config(bare), "yes")


@pytest.mark.parametrize("bad,match", [("grpo,ppo", "unknown ppo"), ("", "empty"), ("grpo,grpo", "twice")])
def test_bad_algos_are_one_line(bad, match):
    with pytest.raises(PapoError, match=match):
        sweep.parse_algos(bad)


@pytest.mark.parametrize("bad", ["", "0,x", "-1", "1,1"])
def test_bad_seeds_are_one_line(bad):
    with pytest.raises(PapoError, match="--seeds"):
        sweep.parse_seeds(bad)


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    assert main(["sweep", RECIPE, "--algos", "grpo,ppo"]) == 2
    assert main(["sweep", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert main(["sweep", RECIPE, "--algos", "grpo", "--out", str(tmp_path / "o"), "dapo:loss.kl_coef=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "unknown ppo" in err[0] and "missing.yaml does not exist" in err[1]
    assert "'dapo' is not one of the sweep's --algos" in err[2]


# --- the math and the report ---------------------------------------------------------------------
def test_seed_means_and_paired_effects_match_a_plain_computation(tmp_path):
    algos, seeds = ["grpo", "papo_g"], [0, 1, 2]
    runs = {a: {s: tmp_path / f"{a}_s{s}" for s in seeds} for a in algos}
    for a in algos:
        for s in seeds:
            _write_run(runs[a][s], a, s)
    results = build_results(runs, {"recipe": "r", "algos": algos, "seeds": seeds})
    assert set(results["eval_step"].values()) == {2}  # the last evaluation, not step 0
    for a in algos:
        for v in VIEWS:
            for t in TASKS:
                stats = results["summary"][a][f"accuracy/{v}/{t}"]
                mean, std = _plain_mean_std([_accuracy(a, s, v, t) for s in seeds])
                assert stats["n"] == 3 and stats["mean"] == pytest.approx(mean) and stats["std"] == pytest.approx(std)
                diff = results["effects"]["papo_g-grpo"][f"accuracy/{v}/{t}"]
                mean, std = _plain_mean_std([_accuracy("papo_g", s, v, t) - _accuracy("grpo", s, v, t)
                                             for s in seeds])
                assert diff["mean"] == pytest.approx(mean) and diff["std"] == pytest.approx(std, abs=1e-9)
    # seed 1 has no well-formed blank answer on count: the mean is over seeds 0 and 2
    wf = results["summary"]["grpo"]["wellformed_accuracy/blank/count"]
    mean, std = _plain_mean_std([_accuracy("grpo", s, "blank", "count") + 0.01 for s in (0, 2)])
    assert wf["n"] == 2 and wf["mean"] == pytest.approx(mean) and wf["std"] == pytest.approx(std)
    reliance = results["summary"]["papo_g"]["vision_reliance/original_minus_blank"]
    assert reliance["mean"] == pytest.approx(0.1) and results["summary"]["papo_g"][
        "vision_reliance/original_minus_masked"]["n"] == 0
    assert results["chance"]["count"] == 0.25 and "papo_d-dapo" not in results["effects"]
    text = format_results(results)
    assert "| grpo | count | 25.0 |" in text and "## Effect papo_g minus grpo" in text
    mean, std = _plain_mean_std([_accuracy("grpo", s, "original", "count") for s in seeds])
    assert f"{100 * mean:.1f} ± {100 * std:.1f}" in text


def test_old_eval_json_and_a_run_without_evaluation_are_tolerated(tmp_path):
    _write_run(tmp_path / "grpo_s0", "grpo", 0, new_keys=False)
    results = build_results({"grpo": {0: tmp_path / "grpo_s0", 1: tmp_path / "grpo_s1"}}, {})
    assert results["missing"] == ["grpo_s1"]
    assert results["summary"]["grpo"]["accuracy/original/count"]["std"] is None  # one seed: no spread
    assert "wellformed_accuracy/original/count" not in results["summary"]["grpo"]
    assert "No evaluation yet (left out): grpo_s1" in format_results(results)
    assert last_eval(tmp_path / "nothing") is None


def test_step_band_is_mean_plus_minus_std_over_the_seeds_that_logged_a_step():
    band = step_band([[(0, 0.2), (4, 0.5)], [(0, 0.4), (4, float("nan"))], [(0, 0.6)]])
    mean, std = _plain_mean_std([0.2, 0.4, 0.6])
    assert band[0] == pytest.approx((0, mean, mean - std, mean + std))
    assert band[1] == (4, 0.5, 0.5, 0.5)


# --- running -------------------------------------------------------------------------------------
def _fake_launch(calls):
    """Stands in for torchrun: records the run and leaves what a finished run leaves."""
    def launch(run, plan, log):
        calls.append(run.name)
        if run.command == "sft":
            (run.run_dir / "sft").mkdir(parents=True)
            (run.run_dir / "sft" / "sft_log.json").write_text("[]")
        else:
            _write_run(run.run_dir, run.algo, run.seed, steps=int(_overrides_of(run)["train.steps"]))
    return launch


SMALL = ["train.steps=2", "algo.prompts_per_step=4", "rollout.n=2", "train.global_batch_size=8",
         "train.micro_batch_size=4"]


def _plan(tmp_path, overrides=SMALL, **kw) -> SweepPlan:
    return SweepPlan(RECIPE, ["grpo", "papo_g"], [0, 1], out=str(tmp_path / "sweep"), nproc=1, train_samples=6,
                     test_samples=4, overrides=list(overrides), **kw)


def test_sweep_runs_what_is_missing_then_reports(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(sweep, "_launch", _fake_launch(calls))
    out = tmp_path / "sweep"
    _write_run(out / "grpo_s0", "grpo", 0)  # finished before: kept
    _write_run(out / "papo_g_s1", "papo_g", 1, finished=False)  # interrupted: run again (resumes)
    results = run_sweep(_plan(tmp_path, tasks=["count"]))
    assert calls == ["sft_s0", "papo_g_s0", "sft_s1", "grpo_s1", "papo_g_s1"]
    printed = capsys.readouterr().out
    assert "6 runs (2 SFT + 4 RL), 1 finished, 5 to run" in printed
    assert "grpo_s0 already finished, skipped" in printed
    assert "papo_g: loss.kl_coef=0.01 loss.clip_high=0.3 loss.prcp_coef=0.02" in printed
    assert (out / "data" / "train" / "manifest.json").is_file()
    assert f"data synthetic (count) in {out / 'data'}, because of --tasks" in printed
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert set(results["effects"]) == {"papo_g-grpo"} and results["tasks"] == ["count"]
    assert (out / "results.md").read_text().count("| grpo | count |") >= 2
    assert all((out / "plots" / name).stat().st_size > 0 for name in ("eval_accuracy.png", "training.png"))
    assert set(json.loads((out / "sweep_times.json").read_text())) == set(calls)

    calls.clear()
    run_sweep(_plan(tmp_path, tasks=["count"]))
    assert calls == []  # everything finished: nothing launched
    printed = capsys.readouterr().out
    assert printed.count("already finished, skipped") == 6 and "estimated 0.0 min more" in printed


def test_the_recipes_shards_are_used_when_they_exist(tmp_path, monkeypatch, capsys):
    launched = []
    record = _fake_launch([])
    monkeypatch.setattr(sweep, "_launch", lambda run, plan, log: (launched.append(run), record(run, plan, log)))
    shards = [tmp_path / "train", tmp_path / "test"]
    given = [*SMALL, f"data.train_shards={shards[0]}", f"data.eval_shards={shards[1]}"]
    run_sweep(_plan(tmp_path, overrides=given, sft="no"))  # they do not exist: synthetic, in OUT/data
    assert "because of the recipe's data.train_shards" in capsys.readouterr().out
    trained_on = {load_config(RECIPE, list(r.overrides)).data.train_shards for r in launched}
    assert trained_on == {str(tmp_path / "sweep" / "data" / "train")}
    for path in shards:
        path.mkdir()
    launched.clear()
    plan = _plan(tmp_path, overrides=given, sft="no")
    plan.out = str(tmp_path / "second")
    run_sweep(plan)
    assert f"data from the recipe: {shards[0]} (train)" in capsys.readouterr().out
    assert {load_config(RECIPE, list(r.overrides)).data.train_shards for r in launched} == {str(shards[0])}
    assert not (tmp_path / "second" / "data").exists()


def test_a_failing_run_names_itself_its_log_and_the_rerun(tmp_path, monkeypatch, capsys):
    def failing(nproc, command, recipe, overrides):
        return [sys.executable, "-c", "print('boom in the run'); raise SystemExit(3)"], {}
    monkeypatch.setattr(sweep, "torchrun_command", failing)
    with pytest.raises(PapoError) as err:
        run_sweep(_plan(tmp_path, sft="no", tasks=["count"]))
    log = tmp_path / "sweep" / "logs" / "grpo_s0.log"
    assert str(err.value) == (f"sweep run grpo_s0 failed (exit 3); its log is {log}; fix the error there and "
                              f"{sweep.RERUN}")
    assert "boom in the run" in log.read_text() and "boom in the run" in capsys.readouterr().out


def test_an_error_in_the_sweep_ends_its_launch(tmp_path, monkeypatch):
    """No launch outlives the sweep: an exception while relaying its output kills it."""
    pid_file = tmp_path / "pid"
    child = (f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); print('started', flush=True); "
             "time.sleep(600)")
    monkeypatch.setattr(sweep, "torchrun_command", lambda *a: ([sys.executable, "-c", child], None))

    class BrokenConsole:
        def write(self, text):
            raise RuntimeError("console gone")

    monkeypatch.setattr(sys, "stdout", BrokenConsole())
    run = plan_runs(tmp_path, ["grpo"], [0], False, [], {})[0]
    with pytest.raises(RuntimeError, match="console gone"):
        sweep._launch(run, _plan(tmp_path), tmp_path / "log")
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(int(pid_file.read_text()), 0)


def test_a_bad_layout_fails_before_any_launch(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sweep, "_launch", _fake_launch(calls))
    with pytest.raises(PapoError, match="sweep run grpo_s0: .*prompts_per_step"):
        run_sweep(_plan(tmp_path, sft="no", overrides=["algo.prompts_per_step=3"]))
    assert calls == []
