"""Monitoring of a real `papo-mega train` run (issue 16, item 6): one short run on the tiny VLM,
then what docs/monitoring.md promises is checked against what it wrote and printed.

- Every tag docs/monitoring.md names (the time/<stage>_s of every stage included) is in
  metrics.jsonl and in TensorBoard, and every logged tag is documented; plots draw a non-empty
  panel for each.
- Sample generations: TensorBoard text and RUN_DIR/samples.jsonl (prompt with the image
  placeholders collapsed, response, reward, ground truth).
- The resolved config (what differs from the defaults) at start, the end-of-run summary.
- train.log_every sets how often the metrics line is printed.
- A step that raises prints the resume hint naming the latest checkpoint, then propagates.
"""

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from papo_mega import metrics as M
from tests.distributed.harness import make_synthetic, run_distributed
from tests.distributed.test_train import recipe

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
STEPS = 2


def doc_tags(conditional: bool = False) -> set[str]:
    """Every tag the tag tables of docs/monitoring.md name, with <stage> / <view> expanded; those
    marked *conditional* (logged only when measurable) only with conditional=True."""
    text = (REPO / "docs" / "monitoring.md").read_text()
    tags = set()
    for line in text.split("## Tags", 1)[1].split("## Healthy", 1)[0].splitlines():
        cells = line.split("|")
        if len(cells) < 3 or not cells[1].strip().startswith("`"):
            continue
        if ("*conditional*" in cells[2]) != conditional:
            continue
        for tag in re.findall(r"`([^`]+/[^`]+)`", cells[1]):
            if "<stage>" in tag:
                stages = re.findall(r"`(\w+)`", cells[2])
                assert set(stages) == set(M.TIME_STAGES), f"docs list stages {stages}, the code {M.TIME_STAGES}"
                tags |= {tag.replace("<stage>", s) for s in stages}
            elif "<view>" in tag:
                tags |= {tag.replace("<view>", v) for v in M.EVAL_VIEWS}
            else:
                tags.add(tag)
    return tags


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One 2-step run with evaluation and train.log_every=2: its directory, stdout and stderr."""
    root = tmp_path_factory.mktemp("monitoring")
    for split, num in (("train", 64), ("test", 4)):
        make_synthetic(root / split, split, num, samples_per_shard=32)
    run_dir = root / "run"
    (root / "recipe.yaml").write_text("preset: tiny\n")  # the rest comes as overrides
    proc = subprocess.run([sys.executable, "-m", "papo_mega.cli", "train", str(root / "recipe.yaml"), *recipe(root), f"train.steps={STEPS}",
                           "train.log_every=2", f"data.eval_shards={root / 'test'}", "algo.eval_samples=4",
                           "algo.eval_k=1", f"run.run_dir={run_dir}"],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc.stdout, proc.stderr


def test_every_documented_tag_is_logged(run):
    run_dir, _, _ = run
    promised = doc_tags()
    assert {"time/stream_s", "time/reward_s", "time/checkpoint_s", "eval/blank_accuracy"} <= promised
    assert {"eval/reliance_blank", "eval/original_wellformed_accuracy"} <= doc_tags(conditional=True)
    jsonl, tb = M.read_metrics(run_dir), M.read_tensorboard_scalars(run_dir)
    assert not promised - set(jsonl), f"documented but not in metrics.jsonl: {sorted(promised - set(jsonl))}"
    assert not promised - set(tb), f"documented but not in TensorBoard: {sorted(promised - set(tb))}"
    undocumented = set(jsonl) - promised - doc_tags(conditional=True)
    assert not undocumented, f"logged but not in docs/monitoring.md: {sorted(undocumented)}"
    for stage in M.TIME_STAGES:
        assert [s for s, _ in jsonl[M.time_tag(stage)]] == [1, 2], stage
        assert all(v >= 0 for _, v in jsonl[M.time_tag(stage)]), stage


def test_plots_have_a_panel_with_data_for_every_tag(run):
    from papo_mega.plots import figure_layout

    run_dir, _, _ = run
    series = M.read_metrics(run_dir)
    layout = figure_layout(series)
    drawn = [tag for _, _, tags in layout for tag in tags]
    assert set(drawn) == set(series)
    assert all(any(v == v for _, v in series[tag]) for tag in drawn), "a panel without a finite value"
    assert {p.stem for p in (run_dir / "plots").glob("*.png")} == {name for name, _, _ in layout}


def test_sample_generations_in_tensorboard_and_samples_jsonl(run):
    from tensorboard.backend.event_processing import event_accumulator

    run_dir, _, _ = run
    rows = M.read_samples(run_dir)
    # Logged after step 1 and after the last step, SAMPLES_PER_LOG rows (one per prompt) each.
    assert [r["step"] for r in rows] == [1] * M.SAMPLES_PER_LOG + [STEPS] * M.SAMPLES_PER_LOG
    for row in rows:
        assert set(M.SAMPLE_FIELDS) <= set(row)
        assert row["ground_truth"] and 0.0 <= row["reward"] <= 1.0
        assert re.search(r"<\|image_pad\|>x\d+", row["prompt"]) and "<|image_pad|><|image_pad|>" not in row["prompt"]
    acc = event_accumulator.EventAccumulator(str(run_dir / M.TB_DIR), size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    events = acc.Tensors(f"{M.SAMPLES_TAG}/text_summary")
    assert [e.step for e in events] == [1, STEPS]
    text = events[0].tensor_proto.string_val[0].decode()
    assert rows[0]["response"] in text and f"`{rows[0]['ground_truth']}`" in text


def test_config_at_start_and_summary_at_end(run):
    run_dir, stdout, _ = run
    head = stdout[: stdout.index("[papo-mega] done:")]
    assert "[papo-mega] config (what differs from the defaults" in head
    assert "  rollout: " in head and "n=4" in head and "max_new_tokens=12" in head and "  preset: tiny" in head
    summary = stdout[stdout.index("[papo-mega] done:"):]
    assert f"{STEPS} steps (steps 1-{STEPS} here" in summary and "reward " in summary and "eval: original" in summary
    for place in (run_dir / "final", run_dir / "checkpoints", run_dir / "tb", run_dir / "plots",
                  run_dir / "metrics.jsonl", run_dir / "samples.jsonl"):
        assert str(place) in summary, place


def test_log_every_sets_how_often_the_metrics_line_is_printed(run):
    _, _, stderr = run
    lines = [line for line in stderr.splitlines() if re.match(r"step \d+/\d+ ", line)]
    assert [line.split()[1] for line in lines] == [f"{STEPS}/{STEPS}"], lines  # log_every=2: not after step 1


def crashing_worker(train_dir: str, run_dir: str):
    """run_train whose second step raises: (what it printed on stderr, the error that escaped)."""
    from papo_mega import train
    from papo_mega.config import load_config

    real = train.PapoTrainer.step

    def step(self, step, **kwargs):
        if step == 1:
            raise RuntimeError("injected failure")
        return real(self, step, **kwargs)

    train.PapoTrainer.step = step
    cfg = load_config(None, [*recipe(Path(train_dir).parent), "train.steps=3", "checkpoint.save_every=1",
                             f"run.run_dir={run_dir}"])
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            train.run_train(cfg)
            escaped = None
        except RuntimeError as exc:
            escaped = str(exc)
    return err.getvalue(), escaped


def test_a_failed_step_prints_the_resume_hint(tmp_path):
    make_synthetic(tmp_path / "train", "train", 16)
    printed, escaped = run_distributed(crashing_worker, 1, args=(str(tmp_path / "train"), str(tmp_path / "run")),
                                       timeout_s=300)[0]
    assert escaped == "injected failure"
    latest = tmp_path / "run" / "checkpoints"
    hint = next(line for line in printed.splitlines() if "train failed" in line)
    assert hint.startswith("[papo-mega] train failed at step 2; the latest checkpoint is ") and str(latest) in hint
    assert hint.endswith("rerun with --resume auto to continue")
