"""The `papo-mega` command line.

    papo-mega demo                                               # shards -> SFT -> PAPO-G -> eval, 2 CPU processes
    papo-mega smoke examples/tiny_lm.yaml parallel.tp_size=2    # under torchrun / srun / mpirun
    papo-mega train examples/papo_g_7b.yaml [--resume auto]      # RL, under torchrun / srun / mpirun
    papo-mega train examples/papo_g_72b.yaml --dry-run --world-size 32   # check a recipe, no GPUs
    papo-mega sft examples/tiny_cpu.yaml                         # supervised warm start
    papo-mega eval --ckpt MODEL_DIR --data SHARDS --k 8          # avg@k and vision reliance
    papo-mega plot RUN_DIR                                       # PNG curves of a run
    papo-mega plan --model qwen2.5-vl-72b --gpus 32              # memory and step time per layout

User mistakes (PapoError) print one line naming the problem and the fix and exit with 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from papo_mega.errors import PapoError

EXIT_USER_ERROR = 2
DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "examples" / "tiny_cpu.yaml"


def _cmd_smoke(args) -> int:
    from papo_mega.config import load_config
    from papo_mega.smoke import run_smoke

    run_smoke(load_config(args.config, args.overrides))
    return 0


def _cmd_demo(args) -> int:
    """The embedded default job (papo_mega/demo.py): shards, SFT, PAPO-G RL with evaluations, summary."""
    from papo_mega.demo import DemoPlan, run_demo

    print(f"[papo-mega] demo: {args.config} on {args.nproc} local CPU processes", flush=True)
    run_demo(DemoPlan(str(args.config), list(args.overrides), nproc=args.nproc))
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
    run_train(load_config(args.config, overrides))
    return 0


def _cmd_sft(args) -> int:
    from papo_mega.config import load_config
    from papo_mega.sft import run_sft

    run_sft(load_config(args.config, args.overrides))
    return 0


def _cmd_plot(args) -> int:
    from papo_mega.plots import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0


def _cmd_plan(args) -> int:
    """Memory per GPU and an estimated step time for every TP/PP/DP layout (papo_mega/plan.py)."""
    from papo_mega.distributed.runtime import quiet_known_warnings
    from papo_mega.plan import format_plan, plan, require_fit

    quiet_known_warnings()  # megatron's "Transformer Engine / Apex not installed" on a login node

    result = plan(args.model, args.gpus, args.gpu, args.config, list(args.overrides), args.recompute)
    print(format_plan(result))
    require_fit(result)  # no layout fits: one line naming the reason, exit 2
    return 0


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
    demo.add_argument("overrides", nargs="*", help="dotted overrides")
    demo.set_defaults(func=_cmd_demo)

    train = sub.add_parser("train", help="RL training (grpo | papo_g | dapo | papo_d), resumable")
    train.add_argument("config", help="YAML recipe, e.g. examples/papo_g_7b.yaml")
    train.add_argument("--resume", default=None, help="auto (default from the recipe) | none | a checkpoint path")
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
    sft.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sft.steps=100")
    sft.set_defaults(func=_cmd_sft)

    plot = sub.add_parser("plot", help="PNG curves of a run's metrics into RUN_DIR/plots")
    plot.add_argument("run_dir", help="a run directory (holds metrics.jsonl)")
    plot.set_defaults(func=_cmd_plot)

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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.func(args)
    except PapoError as err:
        rank = os.environ.get("RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("SLURM_PROCID")
        where = f" (rank {rank})" if rank not in (None, "0") else ""
        print(f"papo-mega: error{where}: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("papo-mega: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
