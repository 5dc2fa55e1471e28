"""`papo-mega demo` (`make demo`): a tiny VLM learns to look at the image, on CPU, in minutes.

Stages, each skipped when its output is already there (an interrupted demo continues):

1. synthetic shards - the `compare_size` task ("which is larger, the red or the blue shape?"),
   where the question alone gives chance level, written to data.train_shards / data.eval_shards;
2. SFT warm start (`papo-mega sft`): teaches the answer format and a first reading of the image;
3. PAPO-G RL (`papo-mega train --resume auto`), evaluating held-out accuracy before, during and
   after with the original, the PAPO-masked and a blank image;
4. a summary: accuracy before and after RL per view, vision reliance, wall time per stage, peak
   memory of the whole process tree, and where the TensorBoard logs and PNG curves are
   (also written to RUN_DIR/demo_summary.json).

Stages 2 and 3 run on `nproc` local processes under torchrun (data parallel by default).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from papo_mega.config import Config, load_config
from papo_mega.errors import PapoError
from papo_mega.run_dir import write_atomic

DEMO_TASKS = ("compare_size",)
"""The task the demo learns: a tiny model reads it well after a minute of SFT (docs/sft.md)."""
SUMMARY_FILE = "demo_summary.json"
VIEWS = ("original", "masked", "blank")


@dataclass
class DemoPlan:
    """What the demo does; the recipe supplies the model, data paths and hyper-parameters."""

    recipe: str
    overrides: list[str]
    nproc: int = 2
    threads: int = 0
    """torch threads per process (OMP_NUM_THREADS); 0: the cores divided among the processes."""
    train_samples: int = 4000
    test_samples: int = 200
    stage_seconds: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    """Stages found done: their figures come from the previous summary (keep_measured)."""


class PeakMemory:
    """Samples the resident memory of this process and all its children (torchrun ranks) in a thread."""

    def __init__(self, interval_s: float = 0.25) -> None:
        import psutil

        self._root = psutil.Process()
        self._interval = interval_s
        self._stop = threading.Event()
        self.peak_bytes = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        total = 0
        for proc in [self._root, *self._root.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:  # a child that exited between listing and reading
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._sample())
            self._stop.wait(self._interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def seeded_overrides(recipe: str, overrides: list[str], seed: int | None) -> list[str]:
    """`papo-mega demo --seed S`: train.seed=S (model init, data order, sampling in SFT, RL and
    evaluation) and, unless run.run_dir is given, its own run directory RUN_DIR_seedS - another
    seed must never find and skip the stages of the recipe's default seed."""
    if seed is None:
        return overrides
    extra = [f"train.seed={seed}"]
    if not any(o.startswith("run.run_dir=") for o in overrides):
        extra.append(f"run.run_dir={load_config(recipe, overrides).run.run_dir}_seed{seed}")
    return [*overrides, *extra]


def torchrun_command(nproc: int, command: str, recipe: str, overrides: Sequence[str],
                     threads: int = 0) -> tuple[list[str], dict]:
    """`papo-mega COMMAND RECIPE overrides` on nproc local processes under torchrun: (argv,
    environment); threads per process (OMP_NUM_THREADS), 0: the cores divided among them.
    Used by the demo and by `papo-mega sweep`."""
    from papo_mega.distributed.launcher import find_free_port

    argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--master-port={find_free_port()}", "-m", "papo_mega.cli", command, recipe, *overrides]
    threads = threads or max(1, (os.cpu_count() or 1) // nproc)
    # megatron's notices (no TE/apex on CPU, deprecated checkpoint calls) are not actionable for a
    # demo or sweep user; real runs keep them.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "LOGLEVEL": "ERROR",
           "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning,ignore::UserWarning"}
    return argv, env


def _launch(plan: DemoPlan, command: str, extra: list[str]) -> None:
    """Run `papo-mega COMMAND recipe overrides extra` on plan.nproc local processes; raise on failure."""
    cmd, env = torchrun_command(plan.nproc, command, plan.recipe, [*plan.overrides, *extra], plan.threads)
    code = subprocess.call(cmd, env=env)
    if code != 0:
        raise PapoError(f"demo stage `{command}` failed (exit {code}); fix the error above and rerun `make demo`: "
                        f"finished stages are kept and skipped")


def _timed(plan: DemoPlan, stage: str, skip: bool, work) -> None:
    if skip:
        print(f"[papo-mega] demo: {stage} already done, skipped", flush=True)
        plan.stage_seconds[stage] = 0.0
        plan.skipped.append(stage)
        return
    start = time.perf_counter()
    work()
    plan.stage_seconds[stage] = round(time.perf_counter() - start, 1)


def _rl_done(cfg: Config) -> bool:
    from papo_mega.checkpoint import latest_checkpoint, read_marker

    latest = latest_checkpoint(cfg.run.run_dir)
    final = Path(cfg.run.run_dir) / "final" / "papo_model.json"
    # The completion marker records the step (latest_checkpoint only returns marked directories).
    return final.is_file() and latest is not None and read_marker(latest)["step"] >= cfg.train.steps


def eval_history(run_dir: str | Path) -> list[dict]:
    """The evaluation rows of a run's metrics.jsonl, in step order: {step, <view>: accuracy,
    format: {view: rate}, wellformed: {view: accuracy among well-formed answers or None},
    reliance: {view: format-aware original-minus-view or None}, chance: chance level or None}."""
    from papo_mega.metrics import METRICS_FILE, eval_tag

    path = Path(run_dir) / METRICS_FILE
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        record = json.loads(line)
        if record.get(eval_tag("original")) is None:
            continue
        rows.append({"step": record["step"], **{v: record.get(eval_tag(v)) for v in VIEWS},
                     "format": {v: record.get(f"eval/{v}_format_rate") for v in VIEWS},
                     "wellformed": {v: record.get(f"eval/{v}_wellformed_accuracy") for v in VIEWS},
                     "reliance": {v: record.get(f"eval/reliance_{v}") for v in VIEWS if v != "original"},
                     "chance": record.get("eval/chance_accuracy")})
    return rows


def summarise(cfg: Config, plan: DemoPlan, wall_s: float, peak_bytes: int) -> dict:
    """The demo's figures as a dict (also RUN_DIR/demo_summary.json) and the text printed at the end."""
    history = eval_history(cfg.run.run_dir)
    if len(history) < 2:
        raise PapoError(f"{cfg.run.run_dir}/metrics.jsonl holds {len(history)} evaluation(s), need the one before "
                        f"and the one after RL; set data.eval_shards and rerun `make demo`")
    before, after = history[0], history[-1]
    run_dir = Path(cfg.run.run_dir)
    return {
        "tasks": list(DEMO_TASKS), "questions": cfg.algo.eval_samples, "k": cfg.algo.eval_k,
        "rl_steps": cfg.train.steps, "prompts_per_step": cfg.algo.prompts_per_step, "rollouts": cfg.rollout.n,
        "before_rl": before, "after_rl": after, "history": history,
        "seed": cfg.train.seed, "threads_per_process": plan.threads,
        # Format-aware (eval_metrics.py): None where the blank view's answers lost the format.
        "vision_reliance": {"before_rl": before["reliance"]["blank"], "after_rl": after["reliance"]["blank"]},
        "rl_gain": after["original"] - before["original"],
        "wall_s": round(wall_s, 1), "stage_s": plan.stage_seconds, "peak_memory_gb": round(peak_bytes / 2**30, 2),
        "nproc": plan.nproc, "tensorboard": str(run_dir / "tb"), "plots": str(run_dir / "plots"),
    }


def keep_measured(summary: dict, previous: dict | None, skipped: list[str]) -> dict:
    """A rerun skips finished stages in a second; its summary keeps the times the previous summary
    measured for them (and that run's peak memory and wall time where it covered them), listing
    them under "stages_from_earlier_run", so the measured figures are never replaced by zeros."""
    old_stages = (previous or {}).get("stage_s") or {}
    kept = [s for s in skipped if s in old_stages]
    if not kept:
        return summary
    stage_s = {**summary["stage_s"], **{s: old_stages[s] for s in kept}}
    return {**summary, "stage_s": stage_s, "stages_from_earlier_run": kept,
            "wall_s": round(summary["wall_s"] + sum(old_stages[s] for s in kept), 1),
            "peak_memory_gb": max(summary["peak_memory_gb"], previous.get("peak_memory_gb", 0.0))}


def _previous_summary(path: Path) -> dict | None:
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or cut short: nothing to keep
        return None
    return previous if isinstance(previous, dict) else None


def _num(value: float | None, width: int, digits: int = 3) -> str:
    return f"{value:{width}.{digits}f}" if value is not None else f"{'-':>{width}s}"


def _reliance_text(value: float | None) -> str:
    return f"{100 * value:+.1f}" if value is not None else "not measured (blank answers lose the format)"


def format_summary(summary: dict) -> str:
    b, a = summary["before_rl"], summary["after_rl"]
    names = {"original": "original image", "masked": "masked image", "blank": "blank image"}
    chance = a.get("chance")
    lines = [f"PAPO demo: {', '.join(summary['tasks'])}, {summary['questions']} held-out questions, "
             f"avg@{summary['k']}, seed {summary.get('seed', '?')}"
             + (f", chance {chance:.3f}" if chance is not None else ""),
             f"  {'':16s} {'before RL':^23s}   after RL ({summary['rl_steps']} PAPO-G steps)",
             f"  {'':16s} {'acc':>7s} {'format':>7s} {'acc|wf':>7s}   {'acc':>7s} {'format':>7s} {'acc|wf':>7s}"]
    for view in VIEWS:
        cells = [(row[view], row.get("format", {}).get(view), row.get("wellformed", {}).get(view)) for row in (b, a)]
        lines.append(f"  {names[view]:16s} " + "   ".join(" ".join(_num(x, 7) for x in c) for c in cells))
    lines.append("  (acc|wf: accuracy among answers in the think/boxed format)")
    lines.append(f"  original-image accuracy {b['original']:.3f} -> {a['original']:.3f} "
                 f"({100 * (a['original'] - b['original']):+.1f} points)")
    reliance = summary["vision_reliance"]
    lines.append(f"  vision reliance, well-formed answers, original minus blank: {_reliance_text(reliance['before_rl'])}"
                 f" -> {_reliance_text(reliance['after_rl'])} points")
    earlier = summary.get("stages_from_earlier_run") or []
    stages = ", ".join(f"{k} {v:.0f} s{' (earlier run)' if k in earlier else ''}"
                       for k, v in summary["stage_s"].items())
    lines.append(f"  wall time {summary['wall_s'] / 60:.1f} min ({stages}), peak memory "
                 f"{summary['peak_memory_gb']:.2f} GB (resident, all {summary['nproc']} ranks and helpers)")
    lines.append(f"  TensorBoard: tensorboard --logdir {summary['tensorboard']}   curves: {summary['plots']}/*.png")
    return "\n".join(lines)


def run_demo(plan: DemoPlan) -> dict:
    """Shards -> SFT -> PAPO-G (with evaluations) -> summary; returns the summary dict."""
    from papo_mega.data.synthetic_shards import is_complete, synthetic_recipe, write_synthetic_shards

    plan.threads = plan.threads or max(1, (os.cpu_count() or 1) // plan.nproc)
    cfg = load_config(plan.recipe, plan.overrides)
    cfg.check(plan.nproc)  # a bad layout fails here, in one line, not in N processes
    cfg.check_algorithm(plan.nproc // (cfg.parallel.tp_size * cfg.parallel.pp_size))
    if not cfg.data.train_shards or not cfg.data.eval_shards:
        raise PapoError("the demo recipe needs data.train_shards and data.eval_shards (where to write the shards)")
    run_dir = Path(cfg.run.run_dir)
    sft_dir = Path(cfg.sft.out or run_dir / "sft")
    sets = [(cfg.data.train_shards, "train", plan.train_samples), (cfg.data.eval_shards, "test", plan.test_samples)]
    started = time.perf_counter()
    with PeakMemory() as memory:
        def shards() -> None:
            for out, split, num in sets:
                if not is_complete(out, synthetic_recipe(split, num, tasks=DEMO_TASKS)):
                    write_synthetic_shards(out, split, num, tasks=DEMO_TASKS, resume=Path(out).exists(),
                                           progress=sys.stderr.isatty())

        _timed(plan, "shards", all(is_complete(o, synthetic_recipe(s, n, tasks=DEMO_TASKS)) for o, s, n in sets),
               shards)
        _timed(plan, "sft", (sft_dir / "sft_log.json").is_file(), lambda: _launch(plan, "sft", []))
        _timed(plan, "rl", _rl_done(cfg),
               lambda: _launch(plan, "train", [f"algo.init_from={sft_dir}", "checkpoint.resume=auto"]))
    summary = summarise(cfg, plan, time.perf_counter() - started, memory.peak_bytes)
    summary = keep_measured(summary, _previous_summary(run_dir / SUMMARY_FILE), plan.skipped)
    write_atomic(run_dir / SUMMARY_FILE, json.dumps(summary, indent=1))  # a kill never loses the previous figures
    print("\n" + format_summary(summary), flush=True)
    return summary
