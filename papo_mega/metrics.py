"""Training metrics: TensorBoard + metrics.jsonl (+ wandb), sample generations, the collapse warning,
the progress bar, what a run prints at its start and end (PNG curves: plots.py).

    print(config_banner(cfg))
    logger = MetricsLogger(cfg.run.run_dir, cfg.run.tensorboard, is_main, start_step=first_step, tracker="")
    detector = CollapseDetector(cfg.run.collapse_window)
    bar = ProgressBar(cfg.train.steps, start_step=done_steps, enabled=is_main, every=cfg.train.log_every)
    for step in ...:
        scalars = flatten_step_metrics(update_metrics, reward=..., accuracy=..., times={...})
        logger.log(step, scalars)
        if samples_due(step, every, total):
            logger.log_samples(step, rows)  # dicts with SAMPLE_FIELDS
        warning = detector.update(step, scalars.get(LOSS_KL_PRCP), scalars.get(LOSS_ENTROPY),
                                  scalars.get(LOSS_MASKED_ENTROPY))
        if warning:
            bar.write(warning)
        bar.update(scalars)
    logger.close(); bar.close()
    print(run_summary(first, done, total, seconds, scalars, {"model": ..., ...}))

`RUN_DIR/metrics.jsonl` (one JSON object per `log` call: `step`, `wall_time` and the tags; non-finite
values as null) is the source of truth for `plots.plot_run` and the tests; `RUN_DIR/tb` holds the same
scalars for TensorBoard. Only the main rank writes; elsewhere every method is a no-op. Tag names
and their meaning: docs/monitoring.md.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
import time
from collections import defaultdict, deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self, TextIO

from papo_mega.config import TRACKERS
from papo_mega.errors import PapoError


def rss_bytes() -> int:
    """This process's resident memory now (psutil: /proc on Linux)."""
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """This process's lifetime peak resident memory (getrusage; Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- standard tags -------------------------------------------------------------------------------
# Rewards of the step's rollouts (means over all responses).
REWARD_MEAN = "reward/mean"
REWARD_ACCURACY = "reward/accuracy"
REWARD_FORMAT = "reward/format"
# The responses themselves.
RESPONSE_LENGTH_MEAN = "response/length_mean"
RESPONSE_TRUNCATED = "response/truncated_frac"
RESPONSE_TOKENS = "response/tokens"
RESPONSE_EMPTY_BATCHES = "response/empty_batches"
# The objective's terms (token means over the global batch, averaged over the step's updates).
LOSS_TOTAL = "loss/total"
LOSS_PG = "loss/pg"
LOSS_KL_PRCP = "loss/kl_prcp"
LOSS_KL_REF = "loss/kl_ref"
LOSS_ENTROPY = "loss/entropy"
LOSS_MASKED_ENTROPY = "loss/masked_entropy"
# Clipping: share of response tokens whose ratio hit each clip.
CLIP_HIGH = "clip/high"
CLIP_LOW = "clip/low"
CLIP_DUAL = "clip/dual"
# Importance ratio pi_theta / pi_old and how far the update moved the policy.
RATIO_MEAN = "ratio/mean"
RATIO_MAX = "ratio/max"
RATIO_MIN = "ratio/min"
RATIO_APPROX_KL_OLD = "ratio/approx_kl_old"
# Optimiser.
OPTIM_GRAD_NORM = "optim/grad_norm"
OPTIM_LR = "optim/lr"
OPTIM_SKIPPED_UPDATES = "optim/skipped_updates"
# Throughput.
PERF_TOKENS_PER_S = "perf/tokens_per_s"
# Wall time per stage of a step, seconds: time_tag("rollout") == "time/rollout_s".
TIME_STAGES = ("stream", "prepare", "rollout", "reward", "logprobs", "update", "checkpoint", "step")
TIME_STREAM_S = "time/stream_s"
TIME_PREPARE_S = "time/prepare_s"
TIME_ROLLOUT_S = "time/rollout_s"
TIME_REWARD_S = "time/reward_s"
TIME_LOGPROBS_S = "time/logprobs_s"
TIME_UPDATE_S = "time/update_s"
TIME_CHECKPOINT_S = "time/checkpoint_s"
TIME_STEP_S = "time/step_s"
# Evaluation accuracy per image view: eval_tag("original") == "eval/original_accuracy".
EVAL_VIEWS = ("original", "masked", "blank")


def time_tag(stage: str) -> str:
    """`time/<stage>_s`, the wall time of one stage of a step in seconds."""
    return f"time/{stage}_s"


def eval_tag(view: str) -> str:
    """`eval/<view>_accuracy`, avg@k accuracy (a fraction) with that image view."""
    return f"eval/{view}_accuracy"


LOSS_TAGS: dict[str, str | None] = {
    "loss": LOSS_TOTAL,
    "pg_loss": LOSS_PG,
    "kl_ref": LOSS_KL_REF,
    "kl_prcp": LOSS_KL_PRCP,
    "entropy": LOSS_ENTROPY,
    "masked_entropy": LOSS_MASKED_ENTROPY,
    "clip_frac_high": CLIP_HIGH,
    "clip_frac_low": CLIP_LOW,
    "clip_frac_dual": CLIP_DUAL,
    "ratio_mean": RATIO_MEAN,
    "ratio_max": RATIO_MAX,
    "ratio_min": RATIO_MIN,
    "approx_kl_old": RATIO_APPROX_KL_OLD,
    "response_tokens": RESPONSE_TOKENS,
    "empty_batches": RESPONSE_EMPTY_BATCHES,
    # After papo_forward_backward's global reduction num_tokens equals response_tokens.
    "num_tokens": None,
    # What an optimizer step reports (papo_mega.lm_step.train_step), if merged into the update dict.
    "grad_norm": OPTIM_GRAD_NORM,
    "lr": OPTIM_LR,
}
"""Metric names returned by compute_papo_loss / papo_forward_backward (and an optimizer step) ->
standard tags; None: not logged."""

# Over the updates of one step: these add up; *_max / *_min take the max / min; the rest average.
_SUMMED = {"response_tokens", "num_tokens", "empty_batches"}


def _combine(name: str, values: list[float]) -> float:
    if name.endswith("_max"):
        return max(values)
    if name.endswith("_min"):
        return min(values)
    if name in _SUMMED:
        return float(sum(values))
    return float(sum(values) / len(values))


def flatten_step_metrics(
    updates: Mapping[str, Any] | Sequence[Mapping[str, Any]] = (),
    *,
    reward: float | None = None,
    accuracy: float | None = None,
    format_reward: float | None = None,
    response_length: float | None = None,
    truncated_frac: float | None = None,
    grad_norm: float | Sequence[float] | None = None,
    lr: float | None = None,
    skipped_updates: int | None = None,
    tokens_per_s: float | None = None,
    times: Mapping[str, float] | None = None,
    eval_accuracy: Mapping[str, float] | None = None,
    extra: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """One step's scalars under the standard tags, ready for `MetricsLogger.log`.

    `updates`: the metric dict of each optimizer update of the step (the `papo_forward_backward`
    names, optionally merged with `grad_norm`, `lr` and `update_ok` from the optimizer step), or a
    single dict. Over the updates `*_max` / `*_min` take the max / min, `response_tokens` and
    `empty_batches` add up, the rest are averaged; `update_ok == False` counts as a skipped update.
    Names not in `LOSS_TAGS` are kept as they are if they contain "/", else as `misc/<name>`.
    `times`: stage -> seconds (`time/<stage>_s`); `eval_accuracy`: view -> accuracy
    (`eval/<view>_accuracy`); `extra`: tags passed through unchanged. Keyword arguments win over
    the same tag derived from `updates`.
    """
    updates = [updates] if isinstance(updates, Mapping) else list(updates)
    gathered: dict[str, list[float]] = defaultdict(list)
    skipped = 0
    for update in updates:
        for name, value in update.items():
            if name == "update_ok":
                skipped += not bool(value)
                continue
            gathered[name].append(_as_float(name, value))
    out: dict[str, float] = {}
    for name, values in gathered.items():
        tag = LOSS_TAGS.get(name, name if "/" in name else f"misc/{name}")
        if tag is not None:
            out[tag] = _combine(name, values)
    if any("update_ok" in u for u in updates):
        out[OPTIM_SKIPPED_UPDATES] = float(skipped)

    if isinstance(grad_norm, Sequence):
        grad_norm = sum(map(float, grad_norm)) / len(grad_norm) if grad_norm else None
    for tag, value in (
        (REWARD_MEAN, reward),
        (REWARD_ACCURACY, accuracy),
        (REWARD_FORMAT, format_reward),
        (RESPONSE_LENGTH_MEAN, response_length),
        (RESPONSE_TRUNCATED, truncated_frac),
        (OPTIM_GRAD_NORM, grad_norm),
        (OPTIM_LR, lr),
        (OPTIM_SKIPPED_UPDATES, skipped_updates),
        (PERF_TOKENS_PER_S, tokens_per_s),
    ):
        if value is not None:
            out[tag] = _as_float(tag, value)
    for stage, seconds in (times or {}).items():
        out[time_tag(stage)] = _as_float(stage, seconds)
    for view, acc in (eval_accuracy or {}).items():
        out[eval_tag(view)] = _as_float(view, acc)
    for tag, value in (extra or {}).items():
        out[tag] = _as_float(tag, value)
    return out


def _as_float(name: str, value: Any) -> float:
    try:
        return float(value)  # float, int, bool, numpy scalar, 0-dim tensor
    except (TypeError, ValueError) as err:
        raise TypeError(f"metric {name!r} = {value!r} is not a number") from err


# --- logging -------------------------------------------------------------------------------------
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
TB_DIR = "tb"
SAMPLES_TAG = "samples"
"""TensorBoard text tag of the sample generations (TEXT tab)."""
SAMPLE_FIELDS = ("key", "prompt", "response", "reward", "accuracy", "format", "ground_truth")
"""What one logged sample generation holds (samples.jsonl adds `step`)."""
SAMPLES_PER_LOG = 4
"""Sample generations logged each time: the first response to each of the first prompts."""
_RESERVED = ("step", "wall_time")


class _ClosedOnExit:
    """`with X(...) as x:` closes x on leaving the block (X defines close())."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MetricsLogger(_ClosedOnExit):
    """Scalars per step to RUN_DIR/tb (TensorBoard) and RUN_DIR/metrics.jsonl, from the main rank;
    sample generations (`log_samples`) to TensorBoard text and RUN_DIR/samples.jsonl.

    `start_step`: the first step this process will log. When given, lines of metrics.jsonl and
    samples.jsonl with step >= start_step are dropped (a resumed run has no duplicate steps; also
    a fresh run with start_step 0 in an old run directory starts clean files) and TensorBoard is
    told to purge events from that step on (`purge_step`). None: append to whatever is there.
    `tracker`: "" or "wandb", an experiment tracker that gets the same scalars and samples
    (`open_tracker`; `config`, the resolved config as a dict, and `run_name` go to it).
    On other ranks (`is_main=False`) nothing is created or written.
    """

    def __init__(self, run_dir: str | os.PathLike, enabled_tensorboard: bool, is_main: bool,
                 start_step: int | None = None, flush_secs: int = 30, *, tracker: str = "",
                 config: Mapping[str, Any] | None = None, run_name: str = "") -> None:
        self.run_dir = Path(run_dir)
        self.jsonl_path = self.run_dir / METRICS_FILE
        self.samples_path = self.run_dir / SAMPLES_FILE
        self.tb_dir = self.run_dir / TB_DIR
        self.is_main = is_main
        self._file: TextIO | None = None
        self._writer = None
        self._tracker = None
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if start_step is not None:
            self.truncate_after(start_step - 1)
        self._file = open(self.jsonl_path, "a", encoding="utf-8")  # closed by close()
        if enabled_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.tb_dir), purge_step=start_step, flush_secs=flush_secs)
        self._tracker = open_tracker(tracker, self.run_dir, run_name or self.run_dir.name, config)

    def log(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Write one step's scalars: a line of metrics.jsonl (non-finite as null) and TB scalars."""
        if not self.is_main:
            return
        if self._file is None:
            raise RuntimeError("MetricsLogger.log after close()")
        step = _check_step(step)
        values = {}
        for tag, value in scalars.items():
            if not isinstance(tag, str) or not tag or tag in _RESERVED:
                raise ValueError(f"bad metric tag {tag!r} (a non-empty string other than {_RESERVED})")
            values[tag] = _as_float(tag, value)
        record: dict[str, Any] = {"step": step, "wall_time": round(time.time(), 3)}
        record.update({tag: (v if math.isfinite(v) else None) for tag, v in values.items()})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._writer is not None:
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, step)
        if self._tracker is not None:
            self._tracker.log(step, values)

    def log_samples(self, step: int, rows: Sequence[Mapping[str, Any]]) -> None:
        """Sample generations of a step (dicts with SAMPLE_FIELDS): one line each in samples.jsonl,
        one TensorBoard text entry (tag `samples`) and the tracker's table."""
        if not self.is_main or not rows:
            return
        step = _check_step(step)
        rows = [{"step": step, **{k: row.get(k) for k in SAMPLE_FIELDS}} for row in rows]
        with open(self.samples_path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(row, allow_nan=False, default=str) + "\n" for row in rows)
        if self._writer is not None:
            self._writer.add_text(SAMPLES_TAG, samples_markdown(rows), step)
        if self._tracker is not None:
            self._tracker.log_samples(step, rows)

    def truncate_after(self, step: int) -> int:
        """Keep the lines of metrics.jsonl and samples.jsonl with step <= `step` (and drop unreadable
        ones, such as a line cut short by a crash); return how many lines of metrics.jsonl were
        dropped. To resume at step s call truncate_after(s - 1), or pass start_step=s to the constructor."""
        if not self.is_main:
            return 0
        reopen = self._file is not None
        if reopen:
            self._file.close()
        dropped = _truncate_jsonl(self.jsonl_path, step)
        _truncate_jsonl(self.samples_path, step)
        if reopen:
            self._file = open(self.jsonl_path, "a", encoding="utf-8")
        return dropped

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._tracker is not None:
            self._tracker.close()
            self._tracker = None


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or int(step) != step:
        raise TypeError(f"step must be an int, got {step!r}")
    return int(step)


def _truncate_jsonl(path: Path, step: int) -> int:
    """Drop the lines of a per-step JSONL file with step > `step` (and unreadable ones); atomic."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = _parse_line(line)
            if record is not None and record["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
            elif line.strip():
                dropped += 1
    if dropped:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped


def _parse_line(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        return None
    return record


# --- sample generations --------------------------------------------------------------------------
def samples_due(done: int, every: int, total: int) -> bool:
    """Whether to log sample generations after `done` steps: after the first (what the model says
    before training moved it much), every `every` and after the last; never when every is 0."""
    return every > 0 and (done == 1 or done % every == 0 or done == total)


def decode_prompt(tokenizer, ids: Sequence[int]) -> str:
    """A prompt's text with each run of image / video placeholders written once with its length,
    `<|image_pad|>x64`: the run holds one token per merged patch and would bury the question."""
    pads = {tokenizer.image_token_id, tokenizer.video_token_id}
    parts = []
    for pad, run in itertools.groupby((int(i) for i in ids), key=lambda i: i if i in pads else None):
        run = list(run)
        parts.append(tokenizer.decode(run) if pad is None else f"{tokenizer.decode([pad])}x{len(run)}")
    return "".join(parts)


def samples_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """Sample generations as TensorBoard's markdown: a heading line per row, prompt and response as
    code blocks (verbatim: markup in a response must not render)."""

    def block(text: Any) -> str:
        return "```\n" + str(text).replace("```", "` ` `") + "\n```"

    def number(value: Any) -> str:
        return "-" if value is None else f"{float(value):.3g}"

    parts = []
    for i, row in enumerate(rows, 1):
        parts.append(f"**{i}. {row.get('key') or ''}** reward {number(row.get('reward'))}, accuracy "
                     f"{number(row.get('accuracy'))}, format {number(row.get('format'))}, ground truth "
                     f"`{row.get('ground_truth')}`")
        parts += ["prompt:", block(row.get("prompt")), "response:", block(row.get("response"))]
    return "\n\n".join(parts)


def read_samples(run_dir: str | os.PathLike) -> list[dict]:
    """RUN_DIR/samples.jsonl as a list of rows (each with `step`); [] when none were logged."""
    path = Path(run_dir) / SAMPLES_FILE
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [r for r in map(_parse_line, f) if r is not None]


# --- experiment trackers beside TensorBoard ------------------------------------------------------
WANDB_ID_FILE = "wandb_run_id"
"""RUN_DIR file holding the wandb run id, so that a resumed run continues the same wandb run."""


def open_tracker(name: str, run_dir: Path, run_name: str, config: Mapping[str, Any] | None):
    """The tracker `name` names (None for ""), started; a PapoError names a missing package."""
    if name not in TRACKERS:
        raise PapoError(f"run.tracker={name!r} is not one of {', '.join(map(repr, TRACKERS))}")
    if name == "wandb":
        return WandbTracker(run_dir, run_name, config)
    return None


class WandbTracker:
    """Weights & Biases: the scalars, the resolved config and a `samples` table per logged step.

    The project comes from WANDB_PROJECT (default papo_mega), files go under RUN_DIR/wandb, and
    WANDB_MODE=offline writes there without a network (`wandb sync RUN_DIR/wandb/offline-run-*`
    uploads later). A resumed run continues the same wandb run (its id is kept in
    RUN_DIR/wandb_run_id); steps it logs again after a crash are ones wandb already has, which
    wandb ignores, so its curves keep the first values of those steps."""

    def __init__(self, run_dir: Path, run_name: str, config: Mapping[str, Any] | None) -> None:
        try:
            import wandb
        except ImportError:
            raise PapoError("run.tracker=wandb needs the wandb package: pip install 'papo_mega[tracking]' "
                            "(or set run.tracker='')") from None
        self._wandb = wandb
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "papo_mega"), name=run_name, id=run_id,
                                  resume="allow", dir=str(run_dir), config=dict(config or {}),
                                  settings=wandb.Settings(console="off"))  # our stdout stays ours
        except Exception as err:  # noqa: BLE001 - wandb raises many types (no login, no network, ...)
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise PapoError(f"wandb.init failed ({first}); run `wandb login`, or set WANDB_MODE=offline to "
                            f"write under {run_dir}/wandb and `wandb sync` later") from None
        id_file.write_text(run_id)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def log_samples(self, step: int, rows: Sequence[Mapping[str, Any]]) -> None:
        table = self._wandb.Table(columns=list(SAMPLE_FIELDS), data=[[row[k] for k in SAMPLE_FIELDS] for row in rows])
        self.run.log({SAMPLES_TAG: table}, step=step)

    def close(self) -> None:
        self.run.finish()
        self._wandb.teardown()  # ends wandb's service process too (else it outlives the run until exit)


def read_metrics(run_dir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """RUN_DIR/metrics.jsonl as tag -> [(step, value)] in file order (null -> nan); unreadable
    lines (a line cut short by a crash) are skipped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise PapoError(f"no {METRICS_FILE} in {run_dir}; is it a run directory?")
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = _parse_line(line)
            if record is None:
                continue
            for tag, value in record.items():
                if tag in _RESERVED:
                    continue
                series[tag].append((record["step"], math.nan if value is None else float(value)))
    return dict(series)


def read_tensorboard_scalars(run_dir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in RUN_DIR/tb as tag -> [(step, value)], read with TensorBoard's own
    EventAccumulator (events purged on resume are left out, as TensorBoard shows them)."""
    from tensorboard.backend.event_processing import event_accumulator

    tb_dir = Path(run_dir) / TB_DIR
    if not tb_dir.is_dir() or not any(p.name.startswith("events.out.tfevents") for p in tb_dir.iterdir()):
        raise PapoError(f"no TensorBoard event files in {tb_dir}; was run.tensorboard off?")
    acc = event_accumulator.EventAccumulator(str(tb_dir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# --- collapse warning ----------------------------------------------------------------------------
class CollapseDetector:
    """Warns when KL_prcp and the entropy of both views have all risen for `window` steps in a row.

    That is how PAPO collapse starts (docs/monitoring.md): KL_prcp grows without bound while the
    entropy of the original and of the masked view rise. The values compared are an exponential
    moving average of the logged ones (`smoothing`: the weight of the previous average; 0 compares
    the raw values), so one noisy step does not break a run of increases. `update` returns a
    one-line warning the first time all three have risen `window` times in a row, then stays
    silent until the pattern breaks (any of the three fails to rise) and builds up again. Without a
    KL_prcp or a masked entropy (GRPO / DAPO, or `entropy_estimator: full` without a masked
    entropy) there is nothing to check: it returns None. A missing or non-finite value restarts it.
    """

    def __init__(self, window: int, smoothing: float = 0.5) -> None:
        if int(window) < 1:
            raise PapoError(f"run.collapse_window={window} must be >= 1")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing={smoothing} must be in [0, 1)")
        self.window = int(window)
        self.smoothing = float(smoothing)
        self.reset()

    def reset(self) -> None:
        self._avg: tuple[float, float, float] | None = None  # smoothed values at the last step
        self._raw: tuple[int, tuple[float, float, float]] | None = None  # last step and its raw values
        self._start: tuple[int, tuple[float, float, float]] | None = None  # where the rising run began
        self._rises = 0
        self._warned = False

    def update(self, step: int, kl_prcp: float | None, entropy: float | None,
               masked_entropy: float | None) -> str | None:
        """Feed one step's KL_prcp, entropy and masked entropy; a warning line or None."""
        values = (kl_prcp, entropy, masked_entropy)
        if any(v is None for v in values):
            self.reset()
            return None
        raw = tuple(float(v) for v in values)
        if not all(math.isfinite(v) for v in raw):
            self.reset()
            return None
        last, last_raw = self._avg, self._raw
        w = self.smoothing
        now = raw if last is None else tuple(w * p + (1 - w) * v for p, v in zip(last, raw))
        self._avg, self._raw = now, (step, raw)
        if last is not None and all(n > p for n, p in zip(now, last)):
            if self._rises == 0:
                self._start = last_raw
            self._rises += 1
        else:
            self._rises, self._start, self._warned = 0, None, False
            return None
        if self._rises < self.window or self._warned:
            return None
        self._warned = True
        first_step, first = self._start
        return (
            f"step {step}: possible PAPO collapse - KL_prcp {first[0]:.4g} -> {raw[0]:.4g}, entropy "
            f"{first[1]:.4g} -> {raw[1]:.4g}, masked entropy {first[2]:.4g} -> {raw[2]:.4g}, all rising for "
            f"{self._rises} steps since step {first_step}; if reward falls too, raise loss.entropy_coef / "
            f"loss.masked_entropy_coef or lower loss.prcp_coef or data.mask_ratio (docs/monitoring.md)"
        )


# --- progress ------------------------------------------------------------------------------------
_POSTFIX = ((REWARD_MEAN, "reward"), (REWARD_ACCURACY, "acc"), (LOSS_KL_PRCP, "kl_prcp"), (LOSS_ENTROPY, "entropy"))


class ProgressBar(_ClosedOnExit):
    """A tqdm bar over the training steps whose postfix shows reward, acc, kl_prcp, entropy and
    s/step, refreshed every `every` steps (train.log_every) and at the last. When `file` (default
    stderr) is not a terminal - CI logs, Slurm output - it prints a plain line every `every` steps
    and at the last step instead. `enabled=False` (non-main ranks):
    nothing is shown. Call `update(scalars)` once per finished step."""

    def __init__(self, total_steps: int, start_step: int = 0, enabled: bool = True, *, every: int = 1,
                 file: TextIO | None = None, desc: str = "train") -> None:
        self.total = int(total_steps)
        self.n = int(start_step)
        self.enabled = enabled
        self.every = max(1, int(every))
        self.file = file if file is not None else sys.stderr
        self._intervals: deque[float] = deque(maxlen=10)
        self._last_time = time.monotonic()
        self._bar = None
        self.tty = bool(getattr(self.file, "isatty", lambda: False)())
        if enabled and self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=self.n, desc=desc, file=self.file, dynamic_ncols=True,
                             unit="step")

    @property
    def seconds_per_step(self) -> float | None:
        """Mean wall time of the last (up to 10) steps."""
        return sum(self._intervals) / len(self._intervals) if self._intervals else None

    def _postfix(self, scalars: Mapping[str, Any]) -> str:
        parts = []
        for tag, label in _POSTFIX:
            if scalars.get(tag) is not None:
                parts.append(f"{label} {float(scalars[tag]):.4g}")
        if self.seconds_per_step is not None:
            parts.append(f"{self.seconds_per_step:.3g} s/step")
        return "  ".join(parts)

    def update(self, scalars: Mapping[str, Any] | None = None, n: int = 1) -> None:
        now = time.monotonic()
        if n > 0:
            self._intervals.append((now - self._last_time) / n)
        self._last_time = now
        self.n += n
        if not self.enabled:
            return
        due = self.n % self.every == 0 or self.n >= self.total  # train.log_every
        postfix = self._postfix(scalars or {})
        if self._bar is not None:
            if due:
                self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.update(n)
        elif due:
            eta = ""
            if self.seconds_per_step is not None and self.n < self.total:
                eta = f"  eta {_duration(self.seconds_per_step * (self.total - self.n))}"
            print(f"step {self.n}/{self.total}  {postfix}{eta}".rstrip(), file=self.file, flush=True)

    def write(self, message: str) -> None:
        """Print a line (a warning) without breaking the bar; nothing when disabled."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.file)
        else:
            print(message, file=self.file, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# --- what a run prints at its start and end ------------------------------------------------------
def config_banner(cfg) -> str:
    """The resolved config as the lines that differ from the defaults, one line per section
    (`  train: lr=0.001 steps=8`); the whole of it is RUN_DIR/config.yaml."""
    from papo_mega.config import Config, config_to_dict
    from papo_mega.config_diff import config_diff

    sections: dict[str, list[str]] = defaultdict(list)
    for key, _, value in config_diff(config_to_dict(Config()), config_to_dict(cfg)):
        section, _, name = key.rpartition(".")
        sections[section].append(f"{name}={_compact(value)}" if section else f"{name}: {_compact(value)}")
    lines = [f"  {section}: {' '.join(items)}" if section else f"  {items[0]}" for section, items in sections.items()]
    return "\n".join([f"[papo-mega] config (what differs from the defaults; all of it in "
                      f"{Path(cfg.run.run_dir) / 'config.yaml'}):", *(lines or ["  (all defaults)"])])


def _compact(value: Any) -> str:
    text = json.dumps(value, default=str, separators=(",", ":")) if not isinstance(value, str) else value
    return text if text and " " not in text else json.dumps(text)


def run_summary(first_step: int, done: int, total: int, seconds: float, metrics: Mapping[str, Any],
                places: Mapping[str, Any]) -> str:
    """The end-of-run report: steps run and their time, the last step's reward and accuracy, the
    last evaluation in `metrics` (eval/<view>_accuracy), then where each output is (`places`:
    label -> path; None entries are left out)."""
    ran = done - first_step
    head = f"[papo-mega] done: {total} steps"
    if ran > 0:
        head += f" (steps {first_step + 1}-{done} here, {_duration(seconds)}, {seconds / ran:.3g} s/step)"
    last = [f"{label} {float(metrics[tag]):.3f}" for tag, label in ((REWARD_MEAN, "reward"),
                                                                     (REWARD_ACCURACY, "accuracy")) if tag in metrics]
    evals = [f"{view} {float(metrics[eval_tag(view)]):.3f}" for view in EVAL_VIEWS if eval_tag(view) in metrics]
    if last:
        head += f"; step {done}: " + ", ".join(last)
    if evals:
        head += "; eval: " + ", ".join(evals)
    width = max(map(len, places), default=0)
    return "\n".join([head, *(f"[papo-mega]   {label:<{width}}  {place}" for label, place in places.items()
                              if place is not None)])
