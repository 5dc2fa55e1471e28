"""`papo-mega sweep` end to end at toy sizes: GRPO and PAPO-G at one seed (real torchrun launches
of `papo-mega train`, one RL step each, no SFT), the results table and plots, then a rerun that
finds both runs finished and launches nothing. The math of the table: tests/unit/test_sweep.py."""

import json
from pathlib import Path

import pytest

from papo_mega import sweep
from papo_mega.sweep import SweepPlan, run_sweep

RECIPE = str(Path(__file__).resolve().parents[2] / "examples" / "tiny_cpu.yaml")
TINY = ["train.steps=1", "algo.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=4",
        "train.global_batch_size=4", "train.micro_batch_size=4", "algo.eval_samples=2", "algo.eval_k=1",
        "run.tensorboard=false", "run.samples_every=0", "data.min_pixels=12544", "data.max_pixels=12544"]


@pytest.mark.timeout(480)  # two real launches: minutes when other jobs share the cores
def test_sweep_runs_two_algorithms_reports_and_skips_them_on_rerun(tmp_path, monkeypatch, capfd):
    out = tmp_path / "sweep"
    plan = SweepPlan(RECIPE, ["grpo", "papo_g"], [0], out=str(out), nproc=1, sft="no", tasks=["compare_size"],
                     train_samples=8, test_samples=2, overrides=TINY)
    results = run_sweep(plan)
    assert results["eval_step"] == {"grpo_s0": 1, "papo_g_s0": 1}  # the evaluation after the last step
    for algo in ("grpo", "papo_g"):
        config = (out / f"{algo}_s0" / "config.yaml").read_text()
        assert f"name: {algo}" in config and "seed: 0" in config
        figures = results["summary"][algo]
        assert {f"accuracy/{v}/compare_size" for v in ("original", "masked", "blank")} <= set(figures)
    effect = results["effects"]["papo_g-grpo"]["accuracy/original/overall"]
    assert effect["mean"] == pytest.approx(results["runs"]["papo_g"]["0"]["accuracy/original/overall"]
                                           - results["runs"]["grpo"]["0"]["accuracy/original/overall"])
    assert json.loads((out / "results.json").read_text())["algos"] == ["grpo", "papo_g"]
    table = (out / "results.md").read_text()
    assert "| grpo | compare_size |" in table and "| papo_g | overall |" in table
    assert "| papo_g-grpo | compare_size |" in table
    assert all((out / "plots" / p).stat().st_size > 0 for p in ("eval_accuracy.png", "training.png"))
    assert "eval after 1 steps" in (out / "logs" / "papo_g_s0.log").read_text()
    capfd.readouterr()

    def no_launch(*args):
        raise AssertionError("a finished run was launched again")
    monkeypatch.setattr(sweep, "_launch", no_launch)
    again = run_sweep(plan)
    printed = capfd.readouterr().out
    assert "grpo_s0 already finished, skipped" in printed and "papo_g_s0 already finished, skipped" in printed
    assert again["runs"] == results["runs"]
