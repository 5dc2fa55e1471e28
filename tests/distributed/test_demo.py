"""`papo-mega demo` end to end at toy sizes: shards -> SFT -> PAPO-G with evaluations -> summary,
then a rerun that finds every stage done and only re-summarises (the demo is resumable).

The full-size demo (examples/tiny_cpu.yaml) is measured in docs/sft.md, not here: its figures
need minutes of training."""

import json
from pathlib import Path

import pytest

from papo_mega.demo import SUMMARY_FILE, DemoPlan, eval_history, format_summary, run_demo
from papo_mega.errors import PapoError

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "examples" / "tiny_cpu.yaml")


def _plan(tmp_path, *extra) -> DemoPlan:
    overrides = [f"run.run_dir={tmp_path / 'run'}", f"data.train_shards={tmp_path / 'data/train'}",
                 f"data.eval_shards={tmp_path / 'data/test'}", "sft.steps=3", "sft.global_batch_size=8",
                 "sft.micro_batch_size=4", "train.steps=2", "algo.prompts_per_step=4", "rollout.n=2",
                 "rollout.max_new_tokens=8", "train.global_batch_size=8", "train.micro_batch_size=4",
                 "algo.eval_samples=4", "algo.eval_k=1", "checkpoint.save_every=1", *extra]
    return DemoPlan(RECIPE, overrides, nproc=2, train_samples=40, test_samples=8)


def test_demo_runs_every_stage_then_resumes_without_redoing_them(tmp_path, capfd):
    summary = run_demo(_plan(tmp_path))
    run = tmp_path / "run"
    assert json.loads((run / SUMMARY_FILE).read_text()) == summary
    # Evaluations before the first and after the last RL step, each with all three views.
    history = eval_history(run)
    assert [row["step"] for row in history] == [0, 2]
    assert summary["before_rl"] == history[0] and summary["after_rl"] == history[-1]
    assert all(0.0 <= row[v] <= 1.0 for row in history for v in ("original", "masked", "blank"))
    assert all(0.0 <= row["format"][v] <= 1.0 for row in history for v in ("original", "masked", "blank"))
    assert summary["seed"] == 1234 and summary["threads_per_process"] >= 1
    out, err = capfd.readouterr()
    assert "eval after 0 steps (avg@1, 4 questions)" in out + err  # a total over both ranks
    assert "before RL" in out
    assert set(summary["stage_s"]) == {"shards", "sft", "rl"}
    assert summary["stage_s"]["sft"] > 0 and summary["stage_s"]["rl"] > 0
    assert 0 < summary["peak_memory_gb"] < 24
    assert (run / "sft" / "sft_log.json").is_file() and (run / "final" / "papo_model.json").is_file()
    assert list((run / "tb").iterdir()) and list((run / "plots").glob("*.png"))

    assert (run / "sft_run" / "metrics.jsonl").is_file() and list((run / "sft_run" / "checkpoints").glob("step_*"))

    # The rerun skips every stage and keeps the measured figures (issue 16.13), marked as such.
    again = run_demo(_plan(tmp_path))
    assert again["stage_s"] == summary["stage_s"]
    assert again["stages_from_earlier_run"] == ["shards", "sft", "rl"]
    assert again["peak_memory_gb"] >= summary["peak_memory_gb"]
    assert again["wall_s"] >= sum(summary["stage_s"].values())
    assert json.loads((run / SUMMARY_FILE).read_text()) == again
    assert again["before_rl"] == summary["before_rl"] and again["after_rl"] == summary["after_rl"]
    out = capfd.readouterr().out
    assert "already done, skipped" in out and "(earlier run)" in out


def test_rerun_summary_keeps_only_the_skipped_stages_figures():
    from papo_mega.demo import keep_measured

    previous = {"stage_s": {"shards": 3.0, "sft": 61.0, "rl": 184.0}, "peak_memory_gb": 3.4, "wall_s": 250.0}
    now = {"stage_s": {"shards": 0.0, "sft": 0.0, "rl": 20.0}, "peak_memory_gb": 1.0, "wall_s": 21.0}
    merged = keep_measured(now, previous, ["shards", "sft"])
    assert merged["stage_s"] == {"shards": 3.0, "sft": 61.0, "rl": 20.0}
    assert merged["stages_from_earlier_run"] == ["shards", "sft"]
    assert merged["peak_memory_gb"] == previous["peak_memory_gb"] and merged["wall_s"] == now["wall_s"] + 64.0
    assert keep_measured(now, None, ["shards", "sft"]) == now  # nothing earlier to keep


def test_demo_without_eval_shards_is_a_one_line_error(tmp_path):
    with pytest.raises(PapoError, match="data.eval_shards"):
        run_demo(_plan(tmp_path, "data.eval_shards="))


def _row(step, original, fmt_blank, wf_blank, reliance):
    return {"step": step, "original": original, "masked": 0.3, "blank": 0.1,
            "format": {"original": 1.0, "masked": 0.9, "blank": fmt_blank},
            "wellformed": {"original": original, "masked": 0.33, "blank": wf_blank},
            "reliance": {"masked": 0.2, "blank": reliance}, "chance": 0.5}


def test_summary_text_names_views_format_and_locations():
    before, after = _row(0, 0.5, 0.02, None, None), _row(8, 0.7, 0.9, 0.5, 0.2)
    text = format_summary({"tasks": ["compare_size"], "questions": 10, "k": 4, "rl_steps": 8, "seed": 3,
                           "before_rl": before, "after_rl": after,
                           "vision_reliance": {"before_rl": None, "after_rl": 0.2}, "wall_s": 300.0,
                           "stage_s": {"shards": 4.0, "sft": 60.0, "rl": 230.0}, "peak_memory_gb": 1.5, "nproc": 2,
                           "tensorboard": "runs/x/tb", "plots": "runs/x/plots"})
    assert "0.500 -> 0.700 (+20.0 points)" in text and "seed 3" in text and "chance 0.500" in text
    # The blank view lost the format before RL: no reliance figure, said so (issue 17).
    assert "not measured (blank answers lose the format) -> +20.0 points" in text
    assert "0.020" in text  # the blank view's format rate is shown
    assert "tensorboard --logdir runs/x/tb" in text and "5.0 min" in text


def test_seed_gets_its_own_run_directory():
    from papo_mega.demo import seeded_overrides

    assert seeded_overrides(RECIPE, ["train.steps=2"], None) == ["train.steps=2"]
    assert seeded_overrides(RECIPE, [], 3) == ["train.seed=3", "run.run_dir=runs/tiny_cpu_seed3"]
    assert seeded_overrides(RECIPE, ["run.run_dir=/x"], 3) == ["run.run_dir=/x", "train.seed=3"]
