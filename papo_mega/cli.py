"""The `papo-mega` command line.

    papo-mega demo                                               # shards -> SFT -> PAPO-G -> eval, 2 CPU processes
    papo-mega smoke examples/tiny_lm.yaml parallel.tp_size=2    # under torchrun / srun / mpirun
    papo-mega train examples/papo_g_7b.yaml [--resume auto]      # RL, under torchrun / srun / mpirun
    papo-mega train examples/papo_g_72b.yaml --dry-run --world-size 32   # check a recipe, no GPUs
    papo-mega sft examples/tiny_cpu.yaml                         # supervised warm start
    papo-mega eval --ckpt MODEL_DIR --data SHARDS --k 8          # avg@k and vision reliance
    papo-mega plot RUN_DIR                                       # PNG curves of a run
    papo-mega sweep tiny_cpu --algos grpo,papo_g --seeds 0,1,2   # the replication matrix, results table, plots
    papo-mega plan --model qwen2.5-vl-72b --gpus 32              # memory and step time per layout

User mistakes (PapoError) print one line naming the problem and the fix and exit with 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from papo_mega.errors import PapoError

EXIT_USER_ERROR = 2
DEFAULT_RECIPE = "examples/tiny_cpu.yaml"
"""The demo's recipe: a shipped one (config.resolve_recipe finds it from any directory)."""


def _cmd_smoke(args) -> int:
    from papo_mega.config import load_config
    from papo_mega.smoke import run_smoke

    run_smoke(load_config(args.config, args.overrides))
    return 0


def _cmd_demo(args) -> int:
    """The embedded default job (papo_mega/demo.py): shards, SFT, PAPO-G RL with evaluations, summary."""
    from papo_mega.demo import DemoPlan, run_demo, seeded_overrides

    if args.threads < 0:
        raise PapoError(f"--threads {args.threads} must be >= 1 (or 0: the cores divided among the processes)")
    overrides = seeded_overrides(str(args.config), list(args.overrides), args.seed)
    print(f"[papo-mega] demo: {args.config} on {args.nproc} local CPU processes", flush=True)
    run_demo(DemoPlan(str(args.config), overrides, nproc=args.nproc, threads=args.threads))
    return 0


def _cmd_eval(args) -> int:
    from papo_mega.config import load_config
    from papo_mega.evaluate import run_eval_cli

    cfg = load_config(args.config, args.overrides)
    run_eval_cli(args.ckpt, args.data, args.k, cfg, args.max_samples, args.out, args.batch_prompts)
    return 0


def _cmd_train(args) -> int:
    from papo_mega.config import load_config
    from papo_mega.train import run_train

    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    if args.dry_run:
        from papo_mega.dry_run import run_dry_run

        print("\n".join(run_dry_run(load_config(args.config, overrides), args.world_size, args.rank).lines()))
        return 0
    run_train(load_config(args.config, overrides), overwrite=args.overwrite,
              allow_config_change=args.allow_config_change)
    return 0


def _cmd_sft(args) -> int:
    from papo_mega.config import load_config
    from papo_mega.sft import run_sft

    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    run_sft(load_config(args.config, overrides), overwrite=args.overwrite,
            allow_config_change=args.allow_config_change)
    return 0


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    """--resume, --overwrite, --allow-config-change: train and sft continue or protect a run alike."""
    parser.add_argument("--resume", default=None, help="auto (default from the recipe) | none | a checkpoint path")
    parser.add_argument("--overwrite", action="store_true",
                        help="a fresh start (--resume none) may replace an earlier run in run.run_dir: it is moved "
                             "to RUN_DIR/replaced-<time>/")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume even though the algorithm, model, data or optimisation settings differ from "
                             "the checkpoint's (docs/checkpoints.md)")


def _cmd_plot(args) -> int:
    from papo_mega.plots import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0


def _cmd_sweep(args) -> int:
    """The replication matrix from one recipe, resumable, with a results table and plots (sweep.py)."""
    from papo_mega.sweep import SweepPlan, parse_algos, parse_seeds, run_sweep

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    run_sweep(SweepPlan(args.config, parse_algos(args.algos), parse_seeds(args.seeds), out=args.out or "",
                        nproc=args.nproc, sft=args.sft, tasks=tasks, train_samples=args.train_samples,
                        test_samples=args.test_samples, overrides=list(args.overrides)))
    return 0


def _cmd_plan(args) -> int:
    """Memory per GPU and an estimated step time for every TP/PP/DP layout (papo_mega/plan.py)."""
    from papo_mega.distributed.runtime import quiet_known_warnings
    from papo_mega.plan import plan, require_fit

    quiet_known_warnings()  # megatron's "Transformer Engine / Apex not installed" on a login node

    result = plan(args.model, args.gpus, args.gpu, args.config, list(args.overrides), args.recompute)
    print(format_plan(result))
    require_fit(result)  # no layout fits: one line naming the reason, exit 2
    return 0


ASSUMED = "assumed, to be measured on GPU (tools/gpu_check.py)"


def format_plan(result, top: int = 5) -> str:
    """`papo-mega plan`'s output: every layout (best fitting first) by term, then the best layout's
    busiest stage term by term against the GPU's physical memory."""
    from papo_mega.plan import GB, MODEL_FLOPS_UTILISATION

    order = result.fitting + [p for p in sorted(result.layouts, key=lambda p: p.memory.total) if not p.fits]
    cols = ("layout", "stage", "weights", "grads", "optim", "ref", "fp8 cache", "kv", "act+logits", "rollout_pk",
            "train_pk", "runtime", "peak GB", "fits", "step s*")
    lines = [f"{result.model} on {result.gpus} x {result.device.name} ({result.precision}, recompute "
             f"{result.recompute})", _row(cols)]
    for p in order:
        e = p.memory
        lines.append(_row((str(p.layout), str(e.stage), *(f"{x / GB:.1f}" for x in (
            e.weights, e.grads, e.optimizer, e.reference, e.fp8_weight_cache, e.kv_cache, e.activations + e.logits,
            e.rollout_peak, e.train_peak, e.fragmentation + e.cuda_runtime + e.nccl, e.total)),
            "yes" if p.fits else "no", f"{p.step_s:.0f}")))
    lines.append(f"* estimated step time (rollout + updates) at {MODEL_FLOPS_UTILISATION:.0%} MFU; memory is the "
                 "busiest pipeline stage, GB = 1e9 bytes; runtime = fragmentation + CUDA context and workspaces + NCCL")
    if result.fitting:
        lines.append(f"fits: best layouts {', '.join(str(p.layout) for p in result.fitting[:top])}")
    if order:
        lines += ["", *format_memory(result, order[0])]
    return "\n".join(lines)


def _row(cells) -> str:
    return "  ".join(f"{c:>16}" if i == 0 else f"{c:>10}" for i, c in enumerate(cells))


def format_memory(result, lp) -> list[str]:
    """One layout's busiest stage, one line per memory term with where its figure comes from."""
    from papo_mega.plan import GB

    e, device, layout = lp.memory, result.device, lp.layout
    m = "model, CPU-calibrated (tests/distributed/test_plan_calibration.py)"
    terms = [
        ("weights", e.weights, "exact parameter count x param bytes"),
        ("grads (fp32 main_grad)", e.grads, "exact"),
        ("optimizer (Adam, fp32 master; /dp)", e.optimizer, "exact"),
        ("reference model", e.reference, "exact"),
        ("TE fp8 weights + transposes", e.fp8_weight_cache, f"exact shapes, 2 B/param; {ASSUMED}"),
        *([("per-process overhead", e.overhead, "measured on CPU")] if not device.cuda else []),
        ("= model state", e.state, ""),
        ("rollout: KV cache", e.kv_cache, "exact shapes (one generate batch at full length)"),
        ("rollout: prefill transient", e.rollout_transient, "model: the largest layer's temporaries"),
        ("rollout: prompts on the device", e.rollout_inputs, "ids + pixels of one generate batch"),
        ("= rollout peak", e.rollout_peak, ""),
        (f"training: activations ({e.in_flight:g} in flight)", e.activations, m),
        ("training: recompute working set", e.recompute_working, "one layer's activations (full recompute)"),
        ("training: logits", e.logits, m),
        ("training: micro-batch on the device", e.train_inputs, "ids + pixels (first stage), loss inputs (last)"),
        ("= training peak", e.train_peak, ""),
        (f"allocator fragmentation ({e.fragmentation_fraction:.0%})", e.fragmentation, ASSUMED),
        ("CUDA context, cuBLAS/TE workspaces", e.cuda_runtime, ASSUMED),
        (f"NCCL ({e.nccl_communicators} communicators)", e.nccl, ASSUMED),
        ("= total", e.total, "max(rollout, training peak) + the three above"),
    ]
    lines = [f"memory per GPU of {layout}, stage {e.stage} (the busiest), GB:"]
    lines += [f"  {name:<42}{value / GB:>8.2f}  {source}".rstrip() for name, value, source in terms]
    usable = device.usable_bytes
    verdict = f"fits, {(usable - e.total) / GB:.1f} GB to spare" if e.total <= usable else \
        f"does not fit, {(e.total - usable) / GB:.1f} GB over"
    lines.append(f"  against {device.name}: {device.memory_bytes / GB:.2f} GB physical ({device.memory_mib:.0f} MiB) "
                 f"x {usable / device.memory_bytes:.0%} usable = {usable / GB:.2f} GB: {verdict}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="papo-mega", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    smoke = sub.add_parser("smoke", help="train the tiny LM for a few steps at the configured layout")
    smoke.add_argument("config", help="YAML recipe, e.g. examples/tiny_lm.yaml")
    smoke.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp_size=2")
    smoke.set_defaults(func=_cmd_smoke)

    demo = sub.add_parser("demo", help="the embedded default job: a tiny VLM trained with PAPO on CPU")
    demo.add_argument("--config", default=str(DEFAULT_RECIPE), help="recipe (default: examples/tiny_cpu.yaml)")
    demo.add_argument("--nproc", type=int, default=2, help="local processes (default 2, data parallel)")
    demo.add_argument("--seed", type=int, default=None,
                      help="train.seed for SFT, RL and eval (init, data order, sampling), in RUN_DIR_seedS")
    demo.add_argument("--threads", type=int, default=0,
                      help="torch threads per process (default 0: the cores divided among the processes)")
    demo.add_argument("overrides", nargs="*", help="dotted overrides")
    demo.set_defaults(func=_cmd_demo)

    train = sub.add_parser("train", help="RL training (grpo | papo_g | dapo | papo_d), resumable")
    train.add_argument("config", help="YAML recipe, e.g. examples/papo_g_7b.yaml")
    _add_run_flags(train)
    train.add_argument("--dry-run", action="store_true",
                       help="build one rank of the layout on the meta device, check shapes, recipe and paths; no GPUs")
    train.add_argument("--world-size", type=int, default=None,
                       help="with --dry-run: the job's GPU count (default tp*pp, i.e. data-parallel 1)")
    train.add_argument("--rank", type=int, default=0,
                       help="with --dry-run: the rank to build (default 0; its first and last pipeline stage too)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10")
    train.set_defaults(func=_cmd_train)

    sft = sub.add_parser("sft", help="supervised warm start on the training shards (PAPO answer format)")
    sft.add_argument("config", help="YAML recipe")
    _add_run_flags(sft)
    sft.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sft.steps=100")
    sft.set_defaults(func=_cmd_sft)

    plot = sub.add_parser("plot", help="PNG curves of a run's metrics into RUN_DIR/plots")
    plot.add_argument("run_dir", help="a run directory (holds metrics.jsonl)")
    plot.set_defaults(func=_cmd_plot)

    sweep = sub.add_parser("sweep", help="GRPO / PAPO-G / DAPO / PAPO-D over seeds from one recipe: table and plots")
    sweep.add_argument("config", help="YAML recipe or shipped recipe name, e.g. tiny_cpu")
    sweep.add_argument("--algos", default="grpo,papo_g,dapo,papo_d", help="comma-separated (default all four)")
    sweep.add_argument("--seeds", default="0,1,2", help="comma-separated train.seed values (default 0,1,2)")
    sweep.add_argument("--out", default=None, help="output directory (default runs/sweep_<recipe name>)")
    sweep.add_argument("--nproc", type=int, default=2, help="local processes per run (default 2, data parallel)")
    sweep.add_argument("--sft", default="auto", choices=("auto", "yes", "no"),
                       help="one SFT warm start per seed shared by its runs (auto: when the recipe has sft: "
                            "and no algo.init_from)")
    sweep.add_argument("--tasks", default=None, help="synthetic tasks to write to OUT/data, e.g. count,compare_size "
                       "(default: the recipe's shards if they exist, else the demo's task)")
    sweep.add_argument("--train-samples", type=int, default=4000, help="synthetic training samples (default 4000)")
    sweep.add_argument("--test-samples", type=int, default=200, help="synthetic held-out samples (default 200)")
    sweep.add_argument("overrides", nargs="*", help="dotted overrides for every run; ALGO:key=value for one algorithm")
    sweep.set_defaults(func=_cmd_sweep)

    plan = sub.add_parser("plan", help="memory per GPU and estimated step time of every TP/PP/DP layout")
    plan.add_argument("--model", required=True, help="preset: qwen2.5-vl-3b | 7b | 32b | 72b | tiny")
    plan.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    plan.add_argument("--gpu", default="h100-80gb", help="h100-80gb (default) | h200 | a100-80gb | cpu")
    plan.add_argument("--config", default=None, help="recipe for batch, rollout and precision settings")
    plan.add_argument("--recompute", default=None, help="none | selective | full (default: the recipe's "
                      "model.recompute)")
    plan.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.precision=fp8")
    plan.set_defaults(func=_cmd_plan)

    ev = sub.add_parser("eval", help="avg@k accuracy and vision reliance (original / masked / blank image)")
    ev.add_argument("--ckpt", required=True, help="model directory (papo_model.json + model/)")
    ev.add_argument("--data", required=True, help="directory of evaluation shards")
    ev.add_argument("--k", type=int, default=8, help="answers sampled per question (avg@k, default 8)")
    ev.add_argument("--max-samples", type=int, default=None, help="evaluate at most this many questions")
    ev.add_argument("--batch-prompts", type=int, default=8, help="questions generated together")
    ev.add_argument("--out", default=None, help="output directory (default RUN_DIR/eval)")
    ev.add_argument("--config", default=None, help="recipe for rollout/reward/data settings")
    ev.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.temperature=0.7")
    ev.set_defaults(func=_cmd_eval)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """argparse, plus overrides after the flags: `train RECIPE --resume auto a=1` reads a=1 as an
    override (argparse alone ends the positionals at the first flag and rejects what follows)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    late = [item for item in extra if "=" in item and not item.startswith("-")]
    unknown = [item for item in extra if item not in late]
    if unknown or (late and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or late)}")
    if late:
        args.overrides = [*args.overrides, *late]
    return args


def _where() -> str:
    """' (rank N)' on ranks other than 0, so a multi-process error says which process it came from."""
    rank = os.environ.get("RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("SLURM_PROCID")
    return f" (rank {rank})" if rank not in (None, "0") else ""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.func(args)
    except PapoError as err:
        print(f"papo-mega: error{_where()}: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as err:  # a read-only or full file system, met after the up-front checks
        from papo_mega.run_dir import describe_os_error

        print(f"papo-mega: error{_where()}: {describe_os_error(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("papo-mega: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
