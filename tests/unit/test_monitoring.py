"""Monitoring pieces of issue 16 item 6 without a training run (the run itself:
tests/distributed/test_monitoring.py): sample generations, the start and end reports, the
progress bar's log_every on a terminal, and the wandb tracker in its offline mode."""

import io
import json
import sys

import pytest

from papo_mega import metrics as M
from papo_mega.errors import PapoError


def sample(i: int) -> dict:
    return {"key": f"k{i}", "prompt": f"question {i}", "response": f"<think>x</think> \\boxed{{{i}}}",
            "reward": 0.9, "accuracy": 1.0, "format": 1.0, "ground_truth": str(i)}


def tb_texts(run_dir) -> list[tuple[int, str]]:
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(run_dir / M.TB_DIR), size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(f"{M.SAMPLES_TAG}/text_summary")]


def test_samples_go_to_jsonl_and_tensorboard_text(tmp_path):
    with M.MetricsLogger(tmp_path, enabled_tensorboard=True, is_main=True, start_step=0) as logger:
        logger.log_samples(1, [sample(1), {**sample(2), "response": "a ``` fence"}])
        logger.log_samples(3, [sample(3)])
    rows = M.read_samples(tmp_path)
    assert [(r["step"], r["key"]) for r in rows] == [(1, "k1"), (1, "k2"), (3, "k3")]
    assert rows[0] == {"step": 1, **sample(1)}
    texts = tb_texts(tmp_path)
    assert [s for s, _ in texts] == [1, 3]
    assert "\\boxed{1}" in texts[0][1] and "ground truth `1`" in texts[0][1] and "reward 0.9" in texts[0][1]
    assert texts[0][1].count("```") == 8  # 2 rows x 2 blocks x 2 fences: the response's own fence is broken


def test_resume_drops_samples_of_redone_steps(tmp_path):
    with M.MetricsLogger(tmp_path, enabled_tensorboard=False, is_main=True) as logger:
        for step in (1, 2, 3):
            logger.log_samples(step, [sample(step)])
    M.MetricsLogger(tmp_path, enabled_tensorboard=False, is_main=False, start_step=2).close()
    assert len(M.read_samples(tmp_path)) == 3  # another rank touches nothing
    M.MetricsLogger(tmp_path, enabled_tensorboard=False, is_main=True, start_step=2).close()
    assert [r["step"] for r in M.read_samples(tmp_path)] == [1]


def test_samples_due_after_the_first_every_n_and_the_last():
    assert [d for d in range(1, 26) if M.samples_due(d, 10, 25)] == [1, 10, 20, 25]
    assert not any(M.samples_due(d, 0, 25) for d in range(1, 26))


class FakeTokenizer:
    image_token_id, video_token_id = 9, 8

    def decode(self, ids):
        return "".join("<|image_pad|>" if i == 9 else "<|video_pad|>" if i == 8 else chr(ord("a") + i) for i in ids)


def test_decode_prompt_writes_each_placeholder_run_once():
    ids = [0, 1, 9, 9, 9, 9, 2, 8, 8, 3, 9]
    assert M.decode_prompt(FakeTokenizer(), ids) == "ab<|image_pad|>x4c<|video_pad|>x2d<|image_pad|>x1"


def test_config_banner_shows_what_differs_from_the_defaults():
    from papo_mega.config import load_config

    cfg = load_config(None, ["train.lr=0.5", "rollout.n=3", "run.name=my run", "run.run_dir=/tmp/r"])
    lines = M.config_banner(cfg).splitlines()
    assert lines[0].startswith("[papo-mega] config (what differs from the defaults") and "/tmp/r/config.yaml" in lines[0]
    assert "  train: lr=0.5" in lines and "  rollout: n=3" in lines
    assert '  run: name="my run" run_dir=/tmp/r' in lines
    assert len(lines) == 4  # nothing at its default is listed
    assert M.config_banner(load_config(None, [])).splitlines()[1] == "  (all defaults)"


def test_run_summary_names_the_figures_and_places():
    metrics = {M.REWARD_MEAN: 0.41, M.REWARD_ACCURACY: 0.375, M.eval_tag("original"): 0.85, M.eval_tag("blank"): 0.2}
    text = M.run_summary(4, 8, 8, 200.0, metrics, {"model": "r/final", "TensorBoard": None, "plots": "r/plots"})
    head, *places = text.splitlines()
    assert head == ("[papo-mega] done: 8 steps (steps 5-8 here, 3m20s, 50 s/step); step 8: reward 0.410, "
                    "accuracy 0.375; eval: original 0.850, blank 0.200")
    assert places == ["[papo-mega]   model        r/final", "[papo-mega]   plots        r/plots"]
    assert M.run_summary(8, 8, 8, 0.0, {}, {}) == "[papo-mega] done: 8 steps"  # resumed after the last step


def test_progress_bar_on_a_tty_refreshes_the_metrics_every_log_every_steps():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    shown = []
    with M.ProgressBar(total_steps=3, enabled=True, every=2, file=Tty()) as bar:
        for reward in (0.111, 0.222, 0.333):
            bar.update({M.REWARD_MEAN: reward})
            shown.append(bar._bar.postfix or "")  # what tqdm draws next (it rate-limits the drawing itself)
    assert ["reward 0.111" in shown[0], "reward 0.222" in shown[1], "reward 0.333" in shown[2]] == [False, True, True]


def test_unknown_or_missing_tracker_is_one_line(tmp_path, monkeypatch):
    with pytest.raises(PapoError, match="run.tracker='mlfow' is not one of"):
        M.MetricsLogger(tmp_path, enabled_tensorboard=False, is_main=True, tracker="mlfow")
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    with pytest.raises(PapoError, match=r"pip install 'papo_mega\[tracking\]'"):
        M.MetricsLogger(tmp_path, enabled_tensorboard=False, is_main=True, tracker="wandb")


def test_wandb_offline_gets_scalars_config_and_samples(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    import psutil

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / M.WANDB_ID_FILE).write_text("resumed01")  # a resumed run continues this wandb run
    with M.MetricsLogger(tmp_path, enabled_tensorboard=False, is_main=True, tracker="wandb", run_name="tiny",
                         config={"train": {"lr": 0.001}}) as logger:
        logger.log(1, {M.REWARD_MEAN: 0.25, M.time_tag("rollout"): 1.5})
        logger.log_samples(1, [sample(7)])
        logger.log(2, {M.REWARD_MEAN: 0.5})
    runs = list((tmp_path / "wandb").glob("offline-run-*-resumed01"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    record = next(runs[0].glob("run-*.wandb")).read_bytes()  # wandb's protobuf log: names are plain bytes
    assert b"reward/mean" in record and b"time/rollout_s" in record and b"0.001" in record
    table = json.loads(next(runs[0].glob("files/media/table/samples_*.table.json")).read_text())
    assert table["columns"] == list(M.SAMPLE_FIELDS) and table["data"][0][2] == sample(7)["response"]
    # wandb's service process ends with the run (no stray child: issue 16's "child processes die").
    _, alive = psutil.wait_procs(psutil.Process().children(recursive=True), timeout=30)
    assert not [p for p in alive if "wandb" in " ".join(p.cmdline())]
