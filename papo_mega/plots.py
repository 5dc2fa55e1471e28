"""PNG curves of a run from RUN_DIR/metrics.jsonl (`papo-mega plot`, and train.py at the end of a run).

One PNG per tag group with a panel per tag, plus collapse.png with the collapse signals side by side.
Written after the fact from the file `metrics.MetricsLogger` keeps, so a plot never touches training.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path

from papo_mega.errors import PapoError
from papo_mega.metrics import (
    CLIP_DUAL,
    CLIP_HIGH,
    CLIP_LOW,
    EVAL_VIEWS,
    LOSS_ENTROPY,
    LOSS_KL_PRCP,
    LOSS_KL_REF,
    LOSS_MASKED_ENTROPY,
    LOSS_PG,
    LOSS_TOTAL,
    METRICS_FILE,
    OPTIM_GRAD_NORM,
    OPTIM_LR,
    OPTIM_SKIPPED_UPDATES,
    PERF_TOKENS_PER_S,
    RATIO_APPROX_KL_OLD,
    RATIO_MAX,
    RATIO_MEAN,
    RATIO_MIN,
    RESPONSE_EMPTY_BATCHES,
    RESPONSE_LENGTH_MEAN,
    RESPONSE_TOKENS,
    RESPONSE_TRUNCATED,
    REWARD_ACCURACY,
    REWARD_FORMAT,
    REWARD_MEAN,
    TIME_STAGES,
    eval_tag,
    read_metrics,
    time_tag,
)

PLOTS_DIR = "plots"
_GROUP_ORDER = ("reward", "response", "loss", "clip", "ratio", "optim", "perf", "time", "eval")
COLLAPSE_SIGNALS = (LOSS_KL_PRCP, LOSS_ENTROPY, LOSS_MASKED_ENTROPY, CLIP_HIGH, REWARD_MEAN, RESPONSE_LENGTH_MEAN)
"""The panels of plots/collapse.png: what to look at together when a PAPO run may be collapsing."""


_STANDARD_ORDER = {tag: i for i, tag in enumerate((
    REWARD_MEAN, REWARD_ACCURACY, REWARD_FORMAT, RESPONSE_LENGTH_MEAN, RESPONSE_TRUNCATED, RESPONSE_TOKENS,
    RESPONSE_EMPTY_BATCHES, LOSS_TOTAL, LOSS_PG, LOSS_KL_PRCP, LOSS_KL_REF, LOSS_ENTROPY, LOSS_MASKED_ENTROPY,
    CLIP_HIGH, CLIP_LOW, CLIP_DUAL, RATIO_MEAN, RATIO_MAX, RATIO_MIN, RATIO_APPROX_KL_OLD, OPTIM_GRAD_NORM,
    OPTIM_LR, OPTIM_SKIPPED_UPDATES, PERF_TOKENS_PER_S, *(time_tag(s) for s in TIME_STAGES),
    *(eval_tag(v) for v in EVAL_VIEWS),
))}


def _ema(values: list[float], weight: float) -> list[float]:
    """TensorBoard-style debiased exponential moving average; NaNs are skipped (kept as NaN)."""
    out, acc, norm = [], 0.0, 0.0
    for v in values:
        if not math.isfinite(v):
            out.append(math.nan)
            continue
        acc = weight * acc + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(acc / norm)
    return out


def _figure(title: str, panels: list[tuple[str, list[tuple[int, float]]]], path: Path) -> None:
    from matplotlib.figure import Figure

    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    width, height = 4.4 * ncols, 3.0 * nrows + 0.4
    fig = Figure(figsize=(width, height))
    fig.suptitle(title)
    # Fixed margins in inches (a layout engine would draw every figure twice).
    fig.subplots_adjust(left=0.75 / width, right=1 - 0.2 / width, bottom=0.5 / height, top=1 - 0.7 / height,
                        wspace=0.35, hspace=0.55)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (tag, points) in zip(axes, panels):
        points = sorted(points, key=lambda p: p[0])
        steps = [p[0] for p in points]
        values = [p[1] for p in points]
        ax.set_title(tag, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if not any(math.isfinite(v) for v in values):
            ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes)
            continue
        if len(points) >= 10:
            ax.plot(steps, values, color="C0", alpha=0.3, linewidth=0.8)
            ax.plot(steps, _ema(values, 0.8), color="C0", linewidth=1.5)
        else:
            ax.plot(steps, values, color="C0", marker="o", markersize=3, linewidth=1.2)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.savefig(path, dpi=100)


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Curves of every tag in RUN_DIR/metrics.jsonl, x = step: one PNG per tag group (the part
    before "/": reward, response, loss, clip, ratio, optim, perf, time, eval, ...) with a panel per
    tag, plus collapse.png with the collapse signals side by side. Written to RUN_DIR/plots (or
    `out_dir`); returns the paths."""
    series = read_metrics(run_dir)
    if not series:
        raise PapoError(f"{Path(run_dir) / METRICS_FILE} holds no steps yet; plot again after the first step")
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / PLOTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, title, tags in figure_layout(series):
        path = out / f"{name}.png"
        _figure(f"{title} - {Path(run_dir).name}", [(t, series[t]) for t in tags], path)
        paths.append(path)
    return paths


def figure_layout(series: dict[str, list]) -> list[tuple[str, str, list[str]]]:
    """[(file stem, title, panel tags)] of the figures plot_run draws for `series`: a panel only
    for a tag the run logged (so no figure has an empty panel), every logged tag in its group's
    figure, collapse.png's signals when the run has KL_prcp."""
    groups: dict[str, list[str]] = defaultdict(list)
    for tag in series:
        groups[tag.split("/", 1)[0] if "/" in tag else "other"].append(tag)
    order = [g for g in _GROUP_ORDER if g in groups] + sorted(g for g in groups if g not in _GROUP_ORDER)
    layout = [(_safe_name(g), g, sorted(groups[g], key=_tag_key)) for g in order]
    if LOSS_KL_PRCP in series:
        layout.append(("collapse", "collapse signals", [t for t in COLLAPSE_SIGNALS if t in series]))
    return layout


def _tag_key(tag: str) -> tuple[int, str]:
    return (_STANDARD_ORDER.get(tag, len(_STANDARD_ORDER)), tag)


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "other"
