import io
import json
import math
import random

import pytest

from papo_mega import metrics as M
from papo_mega.errors import PapoError
from papo_mega.plots import plot_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _scalars(step: int) -> dict:
    return {M.REWARD_MEAN: 0.1 * step, M.LOSS_KL_PRCP: 0.01 * step, M.time_tag("rollout"): 2.0 + step}


def _lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_and_jsonl_hold_the_logged_values(tmp_path):
    with M.MetricsLogger(tmp_path, enabled_tensorboard=True, is_main=True) as logger:
        for step in range(1, 4):
            logger.log(step, _scalars(step))
        logger.log(4, {M.LOSS_TOTAL: float("nan"), M.RATIO_MAX: float("inf"), M.OPTIM_LR: 1e-6})

    tb = M.read_tensorboard_scalars(tmp_path)
    assert set(tb) == {M.REWARD_MEAN, M.LOSS_KL_PRCP, "time/rollout_s", M.LOSS_TOTAL, M.RATIO_MAX, M.OPTIM_LR}
    assert [s for s, _ in tb[M.REWARD_MEAN]] == [1, 2, 3]
    assert [v for _, v in tb[M.REWARD_MEAN]] == pytest.approx([0.1, 0.2, 0.3])
    assert tb["time/rollout_s"] == [(1, 3.0), (2, 4.0), (3, 5.0)]
    assert math.isnan(tb[M.LOSS_TOTAL][0][1]) and math.isinf(tb[M.RATIO_MAX][0][1])  # TB keeps them as they are
    assert tb[M.OPTIM_LR][0][1] == pytest.approx(1e-6)

    lines = _lines(tmp_path)
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert lines[0][M.REWARD_MEAN] == 0.1 and lines[0][M.LOSS_KL_PRCP] == 0.01 and lines[0]["time/rollout_s"] == 3.0
    assert all(isinstance(line["wall_time"], float) for line in lines)
    assert lines[3][M.LOSS_TOTAL] is None and lines[3][M.RATIO_MAX] is None and lines[3][M.OPTIM_LR] == 1e-6
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()  # strict JSON
    series = M.read_metrics(tmp_path)
    assert series[M.REWARD_MEAN] == [(1, 0.1), (2, 0.2), (3, 0.30000000000000004)]
    assert math.isnan(series[M.LOSS_TOTAL][0][1])


def test_tensorboard_off_writes_only_jsonl(tmp_path):
    with M.MetricsLogger(tmp_path, enabled_tensorboard=False, is_main=True) as logger:
        logger.log(0, {M.REWARD_MEAN: 1.0})
    assert not (tmp_path / "tb").exists()
    assert _lines(tmp_path)[0][M.REWARD_MEAN] == 1.0
    with pytest.raises(PapoError, match="no TensorBoard event files"):
        M.read_tensorboard_scalars(tmp_path)


def test_non_main_rank_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    logger = M.MetricsLogger(run_dir, enabled_tensorboard=True, is_main=False, start_step=3)
    logger.log(3, _scalars(3))
    assert logger.truncate_after(0) == 0
    logger.flush()
    logger.close()
    assert not run_dir.exists()
    bar_out = io.StringIO()
    bar = M.ProgressBar(10, enabled=False, file=bar_out)
    bar.update(_scalars(1))
    bar.write("warning")
    bar.close()
    assert bar_out.getvalue() == ""


def test_bad_values_and_tags_are_rejected(tmp_path):
    with M.MetricsLogger(tmp_path, enabled_tensorboard=False, is_main=True) as logger:
        with pytest.raises(TypeError, match="reward/mean"):
            logger.log(1, {M.REWARD_MEAN: "high"})
        with pytest.raises(ValueError, match="bad metric tag"):
            logger.log(1, {"step": 1.0})
        with pytest.raises(TypeError, match="step must be an int"):
            logger.log(1.5, {})
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_resume_drops_steps_at_and_after_the_restart(tmp_path):
    with M.MetricsLogger(tmp_path, enabled_tensorboard=True, is_main=True) as logger:
        for step in range(1, 6):
            logger.log(step, _scalars(step))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "reward/me')  # a line cut short by a crash

    # The checkpoint holds steps 1..3: the resumed run logs from step 4 again, with other values.
    with M.MetricsLogger(tmp_path, enabled_tensorboard=True, is_main=True, start_step=4) as logger:
        assert [line["step"] for line in _lines(tmp_path)] == [1, 2, 3]
        for step in range(4, 7):
            logger.log(step, {M.REWARD_MEAN: 10.0 + step})

    lines = _lines(tmp_path)
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert [line[M.REWARD_MEAN] for line in lines] == pytest.approx([0.1, 0.2, 0.3, 14.0, 15.0, 16.0])
    # TensorBoard purges the old steps 4 and 5 (purge_step) when read back.
    tb = M.read_tensorboard_scalars(tmp_path)[M.REWARD_MEAN]
    assert [s for s, _ in tb] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in tb] == pytest.approx([0.1, 0.2, 0.3, 14.0, 15.0, 16.0])


def test_truncate_after_keeps_steps_up_to_and_including(tmp_path):
    with M.MetricsLogger(tmp_path, enabled_tensorboard=False, is_main=True) as logger:
        for step in range(5):
            logger.log(step, {M.REWARD_MEAN: step})
        assert logger.truncate_after(2) == 2
        assert logger.truncate_after(2) == 0
        logger.log(3, {M.REWARD_MEAN: 30})  # still appends after truncation
    assert [(line["step"], line[M.REWARD_MEAN]) for line in _lines(tmp_path)] == [(0, 0), (1, 1), (2, 2), (3, 30)]
    # A fresh run (start_step 0) in an old run directory starts a clean file.
    M.MetricsLogger(tmp_path, enabled_tensorboard=False, is_main=True, start_step=0).close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_flatten_step_metrics_maps_loss_names_and_combines_updates():
    updates = [
        {"loss": 1.0, "pg_loss": 0.5, "kl_prcp": 0.02, "entropy": 0.4, "masked_entropy": 0.6,
         "clip_frac_high": 0.1, "ratio_max": 1.5, "ratio_min": 0.7, "response_tokens": 100.0,
         "num_tokens": 100.0, "grad_norm": 2.0, "update_ok": True, "custom": 1.0},
        {"loss": 3.0, "pg_loss": 1.5, "kl_prcp": 0.04, "entropy": 0.6, "masked_entropy": 0.8,
         "clip_frac_high": 0.3, "ratio_max": 1.2, "ratio_min": 0.5, "response_tokens": 50.0,
         "num_tokens": 50.0, "grad_norm": 4.0, "update_ok": False, "custom": 3.0},
    ]
    out = M.flatten_step_metrics(updates, reward=0.7, accuracy=0.75, format_reward=0.9, response_length=120,
                                 lr=1e-6, tokens_per_s=300.0, times={"rollout": 12.5, "update": 3.0},
                                 eval_accuracy={"original": 0.5, "blank": 0.2}, extra={"data/kept": 4})
    assert out == pytest.approx({
        M.LOSS_TOTAL: 2.0, M.LOSS_PG: 1.0, M.LOSS_KL_PRCP: 0.03, M.LOSS_ENTROPY: 0.5, M.LOSS_MASKED_ENTROPY: 0.7,
        M.CLIP_HIGH: 0.2, M.RATIO_MAX: 1.5, M.RATIO_MIN: 0.5, M.RESPONSE_TOKENS: 150.0, M.OPTIM_GRAD_NORM: 3.0,
        M.OPTIM_SKIPPED_UPDATES: 1.0, "misc/custom": 2.0, M.REWARD_MEAN: 0.7, M.REWARD_ACCURACY: 0.75,
        M.REWARD_FORMAT: 0.9, M.RESPONSE_LENGTH_MEAN: 120.0, M.OPTIM_LR: 1e-6, M.PERF_TOKENS_PER_S: 300.0,
        M.TIME_ROLLOUT_S: 12.5, M.TIME_UPDATE_S: 3.0, "eval/original_accuracy": 0.5,
        "eval/blank_accuracy": 0.2, "data/kept": 4.0,
    })
    # Every name the loss returns has a tag (or is deliberately dropped).
    loss_names = ("loss pg_loss kl_ref kl_prcp entropy masked_entropy clip_frac_high clip_frac_low clip_frac_dual "
                  "ratio_mean ratio_max ratio_min approx_kl_old response_tokens empty_batches num_tokens").split()
    assert set(loss_names) <= set(M.LOSS_TAGS)
    single = M.flatten_step_metrics({"kl_ref": 0.1}, grad_norm=[1.0, 3.0])
    assert single == {M.LOSS_KL_REF: 0.1, M.OPTIM_GRAD_NORM: 2.0}


# --- collapse detector ---------------------------------------------------------------------------
def _feed(detector, series):
    return [(step, detector.update(step, *values)) for step, values in enumerate(series)]


def test_collapse_warns_on_a_rising_series_once():
    detector = M.CollapseDetector(window=5)  # default smoothing: a steady rise is a rising average too
    rising = [(0.01 * 1.5**i, 0.4 + 0.05 * i, 0.5 + 0.07 * i) for i in range(12)]
    warnings = [(s, w) for s, w in _feed(detector, rising) if w]
    assert len(warnings) == 1
    step, text = warnings[0]
    assert step == 5  # five increases: steps 0->1 ... 4->5
    assert "\n" not in text and "KL_prcp" in text and "loss.prcp_coef" in text and "masked entropy" in text


@pytest.mark.parametrize("smoothing,second", [(0.0, 8), (0.5, 9)])
def test_collapse_rearms_after_the_pattern_breaks(smoothing, second):
    detector = M.CollapseDetector(window=3, smoothing=smoothing)
    up = [(0.01 * (i + 1), 0.4 + 0.01 * i, 0.5 + 0.01 * i) for i in range(5)]
    dip = [(0.001, 0.3, 0.3)]
    warned = [s for s, w in _feed(detector, up + dip + up) if w]
    # Once per episode; the dip at step 5 re-arms it. Raw values rise again from step 6 (over the
    # dip), the moving average only from step 7.
    assert warned == [3, second]


def test_collapse_smoothing_rides_over_one_noisy_step():
    # Entropy dips once (step 3) in an otherwise steady climb of all three.
    series = [(0.01 * 1.3**i, 0.4 + 0.05 * i - (0.06 if i == 3 else 0.0), 0.5 + 0.05 * i) for i in range(12)]
    assert [s for s, w in _feed(M.CollapseDetector(window=5), series) if w] == [5]
    assert [s for s, w in _feed(M.CollapseDetector(window=5, smoothing=0.0), series) if w] == [8]


def test_collapse_ignores_noise_and_one_series_alone():
    rng = random.Random(0)
    noise = [(0.02 + rng.gauss(0, 0.005), 0.5 + rng.gauss(0, 0.05), 0.6 + rng.gauss(0, 0.05)) for _ in range(5000)]
    for smoothing in (0.0, 0.5):
        assert not any(w for _, w in _feed(M.CollapseDetector(window=5, smoothing=smoothing), noise))
    # KL_prcp alone grows without bound while the entropies are flat: no warning.
    detector = M.CollapseDetector(window=5)
    kl_only = [(0.01 * 2**i, 0.5, 0.6) for i in range(30)]
    assert not any(w for _, w in _feed(detector, kl_only))
    # KL_prcp and one entropy rising, the masked entropy not: no warning.
    detector = M.CollapseDetector(window=5)
    two = [(0.01 * 2**i, 0.5 + 0.1 * i, 0.6) for i in range(30)]
    assert not any(w for _, w in _feed(detector, two))


def test_collapse_without_papo_terms_returns_none():
    detector = M.CollapseDetector(window=2)
    grpo = [(None, 0.4 + 0.1 * i, None) for i in range(10)]
    assert not any(w for _, w in _feed(detector, grpo))
    no_masked = [(0.01 * 2**i, 0.4 + 0.1 * i, None) for i in range(10)]
    assert not any(w for _, w in _feed(detector, no_masked))
    # A NaN restarts the count instead of completing a rising run.
    detector = M.CollapseDetector(window=3)
    series = [(0.1, 0.1, 0.1), (0.2, 0.2, 0.2), (0.3, 0.3, 0.3), (math.nan, 0.4, 0.4), (0.5, 0.5, 0.5)]
    assert not any(w for _, w in _feed(detector, series))
    with pytest.raises(PapoError, match="collapse_window"):
        M.CollapseDetector(window=0)


# --- progress bar --------------------------------------------------------------------------------
def test_progress_bar_prints_plain_lines_when_not_a_tty():
    out = io.StringIO()
    bar = M.ProgressBar(total_steps=6, start_step=2, enabled=True, every=2, file=out)
    for step in range(3, 7):
        bar.update({M.REWARD_MEAN: 0.5, M.REWARD_ACCURACY: 0.25, M.LOSS_KL_PRCP: 0.0123, M.LOSS_ENTROPY: 0.6})
        if step == 3:
            bar.write("a warning")
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "a warning"
    assert [line.split()[1] for line in lines[1:]] == ["4/6", "6/6"]
    assert "reward 0.5" in lines[1] and "acc 0.25" in lines[1] and "kl_prcp 0.0123" in lines[1]
    assert "entropy 0.6" in lines[1] and "s/step" in lines[1] and "eta" in lines[1]
    assert "eta" not in lines[2]


def test_progress_bar_uses_tqdm_on_a_tty():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    with M.ProgressBar(total_steps=3, enabled=True, file=out) as bar:
        bar.update({M.REWARD_MEAN: 0.75, M.LOSS_KL_PRCP: 0.5})
        bar.write("a warning")
        bar.update({M.REWARD_MEAN: 0.8})
    text = out.getvalue()
    assert "\r" in text and "a warning" in text and "reward 0.75" in text and "s/step" in text
    assert "kl_prcp 0.5" in text


# --- plots ---------------------------------------------------------------------------------------
def test_plot_run_writes_png_per_group(tmp_path):
    from PIL import Image

    with M.MetricsLogger(tmp_path, enabled_tensorboard=False, is_main=True) as logger:
        for step in range(15):
            scalars = M.flatten_step_metrics(
                {"loss": 1.0 / (step + 1), "kl_prcp": 0.01 * step, "entropy": 0.5, "masked_entropy": 0.6,
                 "clip_frac_high": 0.1, "clip_frac_low": 0.05},
                reward=0.1 * step, accuracy=0.05 * step, times={"rollout": 3.0, "update": 1.0})
            if step == 7:
                scalars[M.LOSS_TOTAL] = float("nan")  # a gap in the curve, not a failure
            logger.log(step, scalars)
        logger.log(14, {"eval/original_accuracy": 0.4, "untagged": 1.0})

    paths = plot_run(tmp_path)
    names = [p.name for p in paths]
    assert names == ["reward.png", "loss.png", "clip.png", "time.png", "eval.png", "other.png", "collapse.png"]
    for path in paths:
        assert path.parent == tmp_path / "plots"
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.size[0] > 100 and image.size[1] > 100


def test_plot_run_errors_name_the_directory(tmp_path):
    with pytest.raises(PapoError, match=r"no metrics.jsonl in .*; is it a run directory\?"):
        plot_run(tmp_path / "missing")
    with pytest.raises(PapoError, match="no metrics.jsonl"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(PapoError, match="holds no steps yet"):
        plot_run(tmp_path)
