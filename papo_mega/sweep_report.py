"""The sweep's results: per-algorithm figures over seeds, PAPO-minus-baseline effects paired per
seed, the tables (OUT/results.json, OUT/results.md) and the plots (OUT/plots/*.png).

Figures come from each run's last evaluation, RUN_DIR/eval/step_NNNNNN/eval.json (the trainer
writes one at every evaluation; evaluate.py and eval_metrics.py say what it holds), flattened to
"metric/view/task" keys so that aggregation is one plain function over any figure:

    accuracy/original/count      wellformed_accuracy/blank/overall      format/masked/left_of
    format_rate/original         vision_reliance/original_minus_blank

Over seeds: mean and the sample standard deviation (n - 1; None for a single seed), over the
seeds whose figure is known (None, e.g. no well-formed answer, is left out and n says so).
Effects: for each seed both runs of a pair share (the same SFT warm start and data order), the
difference PAPO minus baseline, then mean and std of those differences - the paired comparison,
whose spread leaves out the seed-to-seed variation both algorithms share.
The curves read RUN_DIR/metrics.jsonl (metrics.read_metrics).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from papo_mega.metrics import (
    EVAL_VIEWS,
    LOSS_ENTROPY,
    LOSS_KL_PRCP,
    LOSS_MASKED_ENTROPY,
    METRICS_FILE,
    eval_tag,
)

PAIRS = (("papo_g", "grpo"), ("papo_d", "dapo"))
"""(PAPO variant, the baseline it is built on): the effects the report shows when both ran."""
VIEW_METRICS = ("accuracy", "wellformed_accuracy", "format")
"""eval.json entries shaped {view: {task: fraction}} (the last two are absent in older eval.json)."""
TRAINING_TAGS = (LOSS_KL_PRCP, LOSS_ENTROPY, LOSS_MASKED_ENTROPY)
RESULTS_JSON, RESULTS_MD, PLOTS_DIR = "results.json", "results.md", "plots"

Figures = dict[str, float | None]


# --- reading runs --------------------------------------------------------------------------------
def last_eval(run_dir: str | Path) -> tuple[int, dict] | None:
    """(step, eval.json) of a run's latest evaluation, or None when it has none yet."""
    steps = []
    for path in Path(run_dir, "eval").glob("step_*/eval.json"):
        try:
            steps.append((int(path.parent.name.removeprefix("step_")), path))
        except ValueError:  # not a trainer-written directory
            continue
    if not steps:
        return None
    step, path = max(steps)
    return step, json.loads(path.read_text())


def eval_figures(result: Mapping) -> Figures:
    """An eval.json as flat {"metric/view/task" or "metric/name": value}; absent keys are skipped."""
    figures: Figures = {}
    for metric in VIEW_METRICS:
        for view, tasks in (result.get(metric) or {}).items():
            for task, value in tasks.items():
                figures[f"{metric}/{view}/{task}"] = value
    for view, value in (result.get("format_rate") or {}).items():
        figures[f"format_rate/{view}"] = value
    for name, value in (result.get("vision_reliance") or {}).items():
        figures[f"vision_reliance/{name}"] = value
    return figures


# --- the math ------------------------------------------------------------------------------------
def seed_stats(values: Sequence[float | None]) -> dict:
    """{"mean", "std" (sample, n - 1), "n", "values"} over the known (finite, not None) values."""
    known = [v for v in values if v is not None and math.isfinite(v)]
    n = len(known)
    mean = sum(known) / n if n else None
    std = math.sqrt(sum((v - mean) ** 2 for v in known) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n, "values": list(values)}


def aggregate(per_seed: Mapping[int, Figures]) -> dict[str, dict]:
    """{figure: seed_stats over seeds (in seed order)} of one algorithm's runs."""
    seeds = sorted(per_seed)
    keys = sorted({k for s in seeds for k in per_seed[s]})
    return {k: seed_stats([per_seed[s].get(k) for s in seeds]) for k in keys}


def paired_differences(treated: Mapping[int, Figures], baseline: Mapping[int, Figures]) -> dict[str, dict]:
    """{figure: seed_stats of (treated - baseline) per seed both have}, with the seeds used."""
    seeds = sorted(set(treated) & set(baseline))
    keys = sorted({k for s in seeds for k in treated[s]} & {k for s in seeds for k in baseline[s]})
    out = {}
    for key in keys:
        diffs = [None if treated[s].get(key) is None or baseline[s].get(key) is None
                 else treated[s][key] - baseline[s][key] for s in seeds]
        out[key] = {**seed_stats(diffs), "seeds": seeds}
    return out


def step_band(series: Sequence[Sequence[tuple[int, float]]]) -> list[tuple[int, float, float, float]]:
    """[(step, mean, mean - std, mean + std)] over the runs (seeds) that logged a finite value at
    that step; a step one run logged has a band of zero width."""
    by_step: dict[int, list[float]] = {}
    for points in series:
        for step, value in points:
            if math.isfinite(value):
                by_step.setdefault(step, []).append(value)
    band = []
    for step in sorted(by_step):
        stats = seed_stats(by_step[step])
        spread = stats["std"] or 0.0
        band.append((step, stats["mean"], stats["mean"] - spread, stats["mean"] + spread))
    return band


# --- the report ----------------------------------------------------------------------------------
def collect(runs: Mapping[str, Mapping[int, Path]]) -> dict:
    """{algo: {seed: {"step", "figures", "questions", "k"}}} from each run's last evaluation;
    a run without one is left out (the report lists it under "missing")."""
    found: dict = {}
    for algo, seeds in runs.items():
        for seed, run_dir in seeds.items():
            last = last_eval(run_dir)
            if last is not None:
                step, result = last
                found.setdefault(algo, {})[seed] = {"step": step, "figures": eval_figures(result),
                                                    "questions": result.get("questions"), "k": result.get("k"),
                                                    "chance": result.get("chance") or {}}
    return found


def build_results(runs: Mapping[str, Mapping[int, Path]], meta: Mapping) -> dict:
    """results.json's content: the per-run figures, each algorithm over seeds, the paired effects."""
    found = collect(runs)
    per_algo = {a: {s: r["figures"] for s, r in seeds.items()} for a, seeds in found.items()}
    chance = next((r["chance"] for seeds in found.values() for r in seeds.values() if r["chance"]), {})
    first = next((r for seeds in found.values() for r in seeds.values()), {})
    return {
        **meta, "questions": first.get("questions"), "k": first.get("k"), "chance": chance,
        "eval_step": {f"{a}_s{s}": r["step"] for a, seeds in found.items() for s, r in seeds.items()},
        "missing": [f"{a}_s{s}" for a, seeds in runs.items() for s in seeds if s not in found.get(a, {})],
        "runs": {a: {str(s): r["figures"] for s, r in seeds.items()} for a, seeds in found.items()},
        "summary": {a: aggregate(figs) for a, figs in per_algo.items()},
        "effects": {f"{t}-{b}": paired_differences(per_algo[t], per_algo[b]) for t, b in PAIRS
                    if t in per_algo and b in per_algo},
    }


def _cell(stats: Mapping | None) -> str:
    """'mean ± std' in percent (points), '-' when unknown, the mean alone for one seed."""
    if not stats or stats.get("mean") is None:
        return "-"
    text = f"{100 * stats['mean']:.1f}"
    return text if stats.get("std") is None else f"{text} ± {100 * stats['std']:.1f}"


def _views_and_tasks(figures: Mapping[str, dict], metric: str) -> tuple[list[str], list[str]]:
    pairs = [k.split("/")[1:] for k in figures if k.startswith(f"{metric}/") and k.count("/") == 2]
    views = [v for v in EVAL_VIEWS if any(p[0] == v for p in pairs)]
    tasks = sorted({p[1] for p in pairs} - {"overall"}) + (["overall"] if any(p[1] == "overall" for p in pairs)
                                                          else [])
    return views, tasks


def _table(rows: Mapping[str, Mapping[str, dict]], metric: str, chance: Mapping | None) -> list[str]:
    """One markdown table: a row per (label, task), a column per view; `rows` = {label: figures}."""
    union = {k: v for figures in rows.values() for k, v in figures.items()}
    views, tasks = _views_and_tasks(union, metric)
    if not views:
        return []
    head = ["", "task", *(["chance"] if chance is not None else []), *views, "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for label, figures in rows.items():
        for task in tasks:
            cells = [figures.get(f"{metric}/{v}/{task}") for v in views]
            n = max((c["n"] for c in cells if c), default=0)
            known = [] if chance is None else [_cell({"mean": chance.get(task)})]
            lines.append("| " + " | ".join([label, task, *known, *(_cell(c) for c in cells), str(n)]) + " |")
    return lines + [""]


def format_results(results: Mapping) -> str:
    """results.md: the tables of results.json, in percent."""
    summary, effects, chance = results["summary"], results["effects"], results.get("chance") or {}
    lines = [f"# Sweep: {results.get('recipe', '')}", "",
             f"algorithms {', '.join(results.get('algos', []))}; seeds {', '.join(map(str, results.get('seeds', [])))}; "
             f"held-out avg@{results.get('k')} on {results.get('questions')} questions at each run's last evaluation "
             f"(steps: {', '.join(sorted(set(map(str, results['eval_step'].values())))) or '-'}). "
             "Cells: mean ± sample std over seeds, in percent; a single seed shows the mean alone.", ""]
    if results.get("missing"):
        lines += [f"No evaluation yet (left out): {', '.join(results['missing'])}", ""]
    titles = {"accuracy": "Accuracy, all answers", "wellformed_accuracy": "Accuracy among well-formed answers",
              "format": "Format rate (answers in the think/boxed format)"}
    for metric, title in titles.items():
        table = _table(summary, metric, chance if metric != "format" else None)
        lines += [f"## {title}", "", *table] if table else []
    reliance = sorted({k for figs in summary.values() for k in figs if k.startswith("vision_reliance/")})
    if reliance:
        names = [k.removeprefix("vision_reliance/") for k in reliance]
        lines += ["## Vision reliance (well-formed answers, overall; '-' where a view lost the format)", "",
                  "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        lines += [f"| {a} | " + " | ".join(_cell(figs.get(k)) for k in reliance) + " |" for a, figs in summary.items()]
        lines.append("")
    for pair, figures in effects.items():
        treated, base = pair.split("-")
        lines += [f"## Effect {treated} minus {base}, paired per seed (points; mean ± std of the differences)", ""]
        for metric in ("accuracy", "wellformed_accuracy"):
            lines += [f"{titles[metric]}:", "", *_table({pair: figures}, metric, None)]
    return "\n".join(lines).rstrip() + "\n"


def write_results(results: Mapping, out: str | Path) -> tuple[Path, Path]:
    out = Path(out)
    from papo_mega.run_dir import write_atomic

    write_atomic(out / RESULTS_JSON, json.dumps(results, indent=1))
    write_atomic(out / RESULTS_MD, format_results(results))
    return out / RESULTS_JSON, out / RESULTS_MD


# --- the plots -----------------------------------------------------------------------------------
def _series(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from papo_mega.metrics import read_metrics

    if not (run_dir / METRICS_FILE).is_file():
        return []
    return read_metrics(run_dir).get(tag, [])


def _band_figure(title: str, panels: Sequence[str], runs: Mapping[str, Mapping[int, Path]], path: Path) -> None:
    """A panel per tag; in each, a line per algorithm (mean over seeds) and its mean ± std band."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.6 * len(panels), 3.6))
    fig.suptitle(title)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.15, top=0.8, wspace=0.3)
    for ax, tag in zip(fig.subplots(1, len(panels), squeeze=False).ravel(), panels):
        ax.set_title(tag, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        for i, (algo, seeds) in enumerate(runs.items()):
            band = step_band([_series(Path(d), tag) for d in seeds.values()])
            if not band:
                continue
            steps, mean, low, high = zip(*band)
            ax.plot(steps, mean, color=f"C{i}", marker="o", markersize=3, label=f"{algo} ({len(seeds)} seed{'s' * (len(seeds) != 1)})")
            ax.fill_between(steps, low, high, color=f"C{i}", alpha=0.2)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)


def plot_sweep(runs: Mapping[str, Mapping[int, Path]], out: str | Path) -> list[Path]:
    """OUT/plots/eval_accuracy.png (held-out accuracy per view vs step) and training.png (KL_prcp
    and both entropies vs step), each with a mean ± std band over seeds per algorithm."""
    plots = Path(out) / PLOTS_DIR
    plots.mkdir(parents=True, exist_ok=True)
    paths = [plots / "eval_accuracy.png", plots / "training.png"]
    _band_figure("held-out avg@k accuracy (mean ± std over seeds)", [eval_tag(v) for v in EVAL_VIEWS], runs,
                 paths[0])
    _band_figure("perception KL and entropies (mean ± std over seeds)", TRAINING_TAGS, runs, paths[1])
    return paths
