"""`papo-mega sweep RECIPE --algos grpo,papo_g,dapo,papo_d --seeds 0,1,2`: the replication matrix
from one recipe, resumably, then a results table and plots (docs/sweep.md).

Per seed S (seed-major, so an interrupted sweep has complete seeds first):

1. with an SFT warm start (the recipe has an `sft:` section and no algo.init_from, or --sft yes):
   one `papo-mega sft` into OUT/sft_s{S}, shared by every algorithm of that seed, so each PAPO
   run and its baseline start from the same weights and read the data in the same order;
2. per algorithm: `papo-mega train` into OUT/{algo}_s{S} with train.seed=S, algo.name and the
   algorithm's published loss settings (ALGO_SETTINGS), from OUT/sft_s{S}/sft.

A finished run is skipped; an interrupted one resumes from its checkpoint (checkpoint.resume=auto).
Each run's output goes to the console and to OUT/logs/<run>.log. The data: the recipe's
data.train_shards / eval_shards when both exist, else synthetic shards in OUT/data (--tasks);
the same held-out questions for every run. The report: sweep_report.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from papo_mega.config import ALGORITHMS, Config, explicit_keys, load_config
from papo_mega.demo import torchrun_command
from papo_mega.errors import PapoError

ALGO_SETTINGS: dict[str, dict[str, float]] = {
    # ../shared/design/papo.md: GRPO with beta 0.01 and eps_high 0.3; PAPO-G adds gamma 0.02 (3B,
    # no entropy terms); DAPO drops the reference (beta 0) with eps_high 0.28; PAPO-D adds gamma
    # 0.01 and eta1 = eta2 = 0.03. Applied as overrides: algo.name alone sets none of them.
    "grpo": {"loss.kl_coef": 0.01, "loss.clip_high": 0.3, "loss.prcp_coef": 0.0,
             "loss.entropy_coef": 0.0, "loss.masked_entropy_coef": 0.0},
    "papo_g": {"loss.kl_coef": 0.01, "loss.clip_high": 0.3, "loss.prcp_coef": 0.02,
               "loss.entropy_coef": 0.0, "loss.masked_entropy_coef": 0.0},
    "dapo": {"loss.kl_coef": 0.0, "loss.clip_high": 0.28, "loss.prcp_coef": 0.0,
             "loss.entropy_coef": 0.0, "loss.masked_entropy_coef": 0.0},
    "papo_d": {"loss.kl_coef": 0.0, "loss.clip_high": 0.28, "loss.prcp_coef": 0.01,
               "loss.entropy_coef": 0.03, "loss.masked_entropy_coef": 0.03},
}
SFT_MODEL = "sft"
"""The SFT model directory inside OUT/sft_s{S} (sft.py's default RUN_DIR/sft)."""
LOGS_DIR, TIMES_FILE, DATA_DIR = "logs", "sweep_times.json", "data"
RERUN = "rerun the same sweep command to continue (finished runs are kept and skipped)"


@dataclass
class SweepPlan:
    """What `papo-mega sweep` was asked for (cli.py fills it)."""

    recipe: str
    algos: list[str]
    seeds: list[int]
    out: str = ""
    """Default: runs/sweep_<recipe name>."""
    nproc: int = 2
    sft: str = "auto"
    """auto (an `sft:` section in the recipe and no algo.init_from) | yes | no."""
    tasks: list[str] | None = None
    """Synthetic tasks; given, the sweep writes its own shards even if the recipe names some."""
    train_samples: int = 4000
    test_samples: int = 200
    overrides: list[str] = field(default_factory=list)
    """Dotted overrides for every run; `ALGO:key=value` applies to that algorithm's runs only."""


@dataclass(frozen=True)
class SweepRun:
    """One launch of the matrix: `papo-mega COMMAND RECIPE *overrides` into run_dir."""

    name: str
    command: str
    seed: int
    algo: str | None
    run_dir: Path
    overrides: tuple[str, ...]


# --- parsing the command line (pure) -------------------------------------------------------------
def parse_algos(text: str) -> list[str]:
    algos = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in algos if a not in ALGORITHMS]
    if not algos or unknown:
        raise PapoError(f"--algos {text!r}: {'unknown ' + ', '.join(unknown) if unknown else 'empty'}; "
                        f"give a comma-separated list of {', '.join(ALGORITHMS)}")
    if len(set(algos)) != len(algos):
        raise PapoError(f"--algos {text!r} names an algorithm twice; list each once")
    return algos


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = [-1]
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise PapoError(f"--seeds {text!r} must be distinct non-negative integers, comma-separated, e.g. 0,1,2")
    return seeds


def split_overrides(overrides: Sequence[str], algos: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(overrides for every run, {algo: its own}) from `key=value` and `ALGO:key=value` items."""
    common, per_algo = [], {a: [] for a in algos}
    for item in overrides:
        head, sep, rest = item.partition(":")
        if sep and "=" not in head:
            if head not in per_algo:
                raise PapoError(f"override {item!r}: {head!r} is not one of the sweep's --algos "
                                f"({', '.join(algos)}); write ALGO:section.key=value")
            per_algo[head].append(rest)
        else:
            common.append(item)
    return common, per_algo


# --- the matrix (pure) ---------------------------------------------------------------------------
def algo_overrides(algo: str) -> list[str]:
    """algo.name and the algorithm's published loss settings, as dotted overrides."""
    return [f"algo.name={algo}", *(f"{k}={v}" for k, v in ALGO_SETTINGS[algo].items())]


def plan_runs(out: Path, algos: Sequence[str], seeds: Sequence[int], sft: bool, common: Sequence[str],
              per_algo: dict[str, list[str]]) -> list[SweepRun]:
    """Every launch, seed-major: [sft_s{S}], then {algo}_s{S} for each algorithm."""
    runs = []
    for seed in seeds:
        seeded = [*common, f"train.seed={seed}", "checkpoint.resume=auto"]
        sft_dir = out / f"sft_s{seed}"
        if sft:
            runs.append(SweepRun(f"sft_s{seed}", "sft", seed, None, sft_dir,
                                 (*seeded, f"run.run_dir={sft_dir}", f"run.name=sft_s{seed}",
                                  f"sft.out={sft_dir / SFT_MODEL}")))
        for algo in algos:
            name, run_dir = f"{algo}_s{seed}", out / f"{algo}_s{seed}"
            init = [f"algo.init_from={sft_dir / SFT_MODEL}"] if sft else []
            runs.append(SweepRun(name, "train", seed, algo, run_dir,
                                 (*seeded, f"run.run_dir={run_dir}", f"run.name={name}", *algo_overrides(algo),
                                  *init, *per_algo.get(algo, []))))
    return runs


def wants_sft(cfg: Config, choice: str) -> bool:
    """--sft auto: the recipe (or an override) sets sft.* and RL does not start from a model of its own."""
    if choice not in ("auto", "yes", "no"):
        raise PapoError(f"--sft {choice!r} is not one of auto | yes | no")
    if choice != "auto":
        return choice == "yes"
    return any(k.startswith("sft.") for k in explicit_keys(cfg)) and not cfg.algo.init_from


def run_done(run: SweepRun, cfg: Config) -> bool:
    """A finished SFT wrote its log into the model directory; a finished RL run has its final model
    and a checkpoint at train.steps (demo._rl_done)."""
    if run.command == "sft":
        from papo_mega.sft import LOG_NAME, sft_paths

        return (sft_paths(cfg)[0] / LOG_NAME).is_file()
    from papo_mega.demo import _rl_done

    return _rl_done(cfg)


def estimate_seconds(pending: Sequence[SweepRun], times: dict[str, float]) -> float | None:
    """Wall time of the pending runs from the measured time of finished runs of the same command
    (sft, train); None while a pending command has no measurement yet."""
    total = 0.0
    for run in pending:
        same = [t for name, t in times.items() if name.startswith("sft_") == (run.command == "sft")]
        if not same:
            return None
        total += sum(same) / len(same)
    return total


# --- running -------------------------------------------------------------------------------------
def _data_overrides(cfg: Config, plan: SweepPlan, out: Path) -> tuple[list[str], list[tuple[Path, str, int]]]:
    """(data overrides, synthetic sets to write): the recipe's shards when both exist and no
    --tasks was given, else synthetic shards in OUT/data."""
    recipe_data = [cfg.data.train_shards, cfg.data.eval_shards]
    if plan.tasks is None and all(p and Path(p).is_dir() for p in recipe_data):
        return [], []
    sets = [(out / DATA_DIR / "train", "train", plan.train_samples), (out / DATA_DIR / "test", "test",
                                                                      plan.test_samples)]
    return [f"data.train_shards={sets[0][0]}", f"data.eval_shards={sets[1][0]}"], sets


def _data_line(cfg: Config, plan: SweepPlan, sets, tasks: Sequence[str]) -> str:
    if not sets:
        return f"from the recipe: {cfg.data.train_shards} (train), {cfg.data.eval_shards} (held out)"
    why = "--tasks" if plan.tasks is not None else "the recipe's data.train_shards / eval_shards are unset or missing"
    return f"synthetic ({', '.join(tasks)}) in {sets[0][0].parent}, because of {why}"


def _write_shards(sets: Sequence[tuple[Path, str, int]], tasks: Sequence[str]) -> None:
    from papo_mega.data.synthetic_shards import is_complete, synthetic_recipe, write_synthetic_shards

    for out, split, num in sets:
        if not is_complete(out, synthetic_recipe(split, num, tasks=tasks)):
            print(f"[papo-mega] sweep: writing {num} synthetic {split} samples ({', '.join(tasks)}) to {out}",
                  flush=True)
            write_synthetic_shards(out, split, num, tasks=tasks, resume=out.exists(), progress=sys.stderr.isatty())


def _launch(run: SweepRun, plan: SweepPlan, log: Path) -> None:
    """Run one launch, its output to the console and appended to `log`; a failure is one line."""
    argv, env = torchrun_command(plan.nproc, run.command, plan.recipe, run.overrides)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as sink:
        sink.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n")
        sink.flush()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                sink.write(line)
        except KeyboardInterrupt:  # the launch got the same Ctrl-C: it stops at its own pace, checkpoint first
            proc.wait()
            raise
        except BaseException:  # anything else (a test's time limit): no launch outlives the sweep
            proc.kill()
            proc.wait()
            raise
        code = proc.wait()
    if code != 0:
        raise PapoError(f"sweep run {run.name} failed (exit {code}); its log is {log}; fix the error there and "
                        f"{RERUN}")


def _checked_configs(plan: SweepPlan, runs: Sequence[SweepRun]) -> dict[str, Config]:
    """Every run's config, validated up front: a bad override or layout fails here in one line."""
    cfgs = {}
    for run in runs:
        try:
            cfg = load_config(plan.recipe, list(run.overrides))
            cfg.check(plan.nproc)
            if run.command == "train":
                cfg.check_algorithm(plan.nproc // (cfg.parallel.tp_size * cfg.parallel.pp_size))
        except PapoError as err:
            raise PapoError(f"sweep run {run.name}: {err}") from None
        cfgs[run.name] = cfg
    return cfgs


def _read_times(path: Path) -> dict[str, float]:
    try:
        times = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return times if isinstance(times, dict) else {}


def _budget_line(runs: Sequence[SweepRun], pending: Sequence[SweepRun], times: dict[str, float], nproc: int) -> str:
    kinds = f"{sum(r.command == 'sft' for r in runs)} SFT + {sum(r.command == 'train' for r in runs)} RL"
    left = estimate_seconds(pending, times)
    guess = (f"estimated {left / 60:.1f} min more (measured per-run times)" if left is not None
             else "time estimate after the first SFT and RL run finish")
    return (f"[papo-mega] sweep: {len(runs)} runs ({kinds}), {len(runs) - len(pending)} finished, "
            f"{len(pending)} to run on {nproc} local processes; {guess}")


def default_out(recipe: str) -> Path:
    return Path("runs") / f"sweep_{Path(recipe).stem}"


def run_sweep(plan: SweepPlan) -> dict:
    """Run the matrix (skipping finished runs), then write OUT/results.json, results.md and plots."""
    from papo_mega.demo import DEMO_TASKS
    from papo_mega.run_dir import write_atomic
    from papo_mega.sweep_report import build_results, plot_sweep, write_results

    if plan.nproc < 1:
        raise PapoError(f"--nproc {plan.nproc} must be >= 1")
    out = Path(plan.out or default_out(plan.recipe))
    common, per_algo = split_overrides(plan.overrides, plan.algos)
    base = load_config(plan.recipe, common)  # a missing recipe or a bad override: one line here
    data, sets = _data_overrides(base, plan, out)
    tasks = list(plan.tasks or DEMO_TASKS)
    if sets:
        from papo_mega.data.synthetic import check_tasks

        check_tasks(tasks)
    print(f"[papo-mega] sweep: data {_data_line(base, plan, sets, tasks)}", flush=True)
    runs = plan_runs(out, plan.algos, plan.seeds, wants_sft(base, plan.sft), [*common, *data], per_algo)
    cfgs = _checked_configs(plan, runs)
    for algo in plan.algos:
        print(f"[papo-mega] sweep: {algo}: {' '.join(algo_overrides(algo)[1:] + per_algo[algo])}", flush=True)
    times_path = out / TIMES_FILE
    times = _read_times(times_path)
    pending = [r for r in runs if not run_done(r, cfgs[r.name])]
    print(_budget_line(runs, pending, times, plan.nproc), flush=True)
    _write_shards(sets, tasks)
    for run in runs:
        if run not in pending:
            print(f"[papo-mega] sweep: {run.name} already finished, skipped ({run.run_dir})", flush=True)
            continue
        print(f"[papo-mega] sweep: {run.name} -> {run.run_dir}", flush=True)
        started = time.perf_counter()
        _launch(run, plan, out / LOGS_DIR / f"{run.name}.log")
        times[run.name] = round(time.perf_counter() - started, 1)
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(times_path, json.dumps(times, indent=1))
    rl = {a: {r.seed: r.run_dir for r in runs if r.algo == a} for a in plan.algos}
    meta = {"recipe": plan.recipe, "algos": plan.algos, "seeds": plan.seeds, "sft": any(r.command == "sft" for r in runs),
            "settings": {a: algo_overrides(a)[1:] + per_algo[a] for a in plan.algos}, "common_overrides": common,
            "tasks": tasks if sets else None, "run_seconds": times, "nproc": plan.nproc}
    results = build_results(rl, meta)
    paths = [*write_results(results, out), *plot_sweep(rl, out)]
    print(f"[papo-mega] sweep: results in {', '.join(map(str, paths))}", flush=True)
    return results
