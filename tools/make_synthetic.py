#!/usr/bin/env python
"""Write the synthetic vision task suite as webdataset shards (PNG + JSON with question, answer, task).

    python tools/make_synthetic.py --split train --num 20000 --out data/synth/train
    python tools/make_synthetic.py --split test --num 1000 --out data/synth/test --tasks count,left_of

Samples are deterministic from (split, seed, index); train and test never share an image. A run
that stopped part-way continues with --resume (same arguments).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from papo_mega.convert.jobs import run_tool
from papo_mega.data.shard_writer import MANIFEST, read_manifest, update_manifest, write_shards
from papo_mega.data.synthetic import DIFFICULTIES, check_tasks, generate, to_shard_samples
from papo_mega.errors import PapoError


def make(args: argparse.Namespace) -> int:
    if args.num < 1 or args.samples_per_shard < 1:
        raise PapoError(f"--num ({args.num}) and --samples-per-shard ({args.samples_per_shard}) must be positive")
    tasks = check_tasks(args.tasks.split(",") if args.tasks else None)
    out = Path(args.out)
    recipe = {"split": args.split, "num": args.num, "seed": args.seed, "tasks": list(tasks),
              "difficulty": args.difficulty}
    _check_out_dir(out, recipe, args.resume)
    samples = generate(args.split, args.num, seed=args.seed, tasks=tasks, difficulty=args.difficulty)
    progress = tqdm(to_shard_samples(samples), total=args.num, unit="sample", desc=f"synthetic {args.split}")
    # complete=False until the last shard is written: readers refuse a half-written set.
    write_shards(progress, out, args.samples_per_shard, resume=args.resume,
                 extra_manifest={"synthetic": recipe, "complete": False})
    manifest = update_manifest(out, {"complete": True})
    print(f"wrote {sum(s['count'] for s in manifest['shards'])} samples in {len(manifest['shards'])} shards to {out}")
    return 0


def _check_out_dir(out: Path, recipe: dict, resume: bool) -> None:
    """Refuse to mix runs: a fresh run needs an empty directory, a resumed one the same recipe."""
    if not resume and out.is_dir() and any(out.iterdir()):
        raise PapoError(f"{out} is not empty; use --resume to continue an interrupted run or choose a new --out")
    if resume and (out / MANIFEST).is_file():
        previous = read_manifest(out).get("synthetic")
        if previous not in (None, recipe):
            raise PapoError(f"{out} holds a different synthetic set ({previous}); rerun with those arguments "
                            f"or choose a new --out")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", required=True, choices=["train", "test"], help="which split to draw")
    parser.add_argument("--num", type=int, required=True, help="number of samples")
    parser.add_argument("--out", required=True, help="output directory (shards + manifest.json)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument("--tasks", default="", help="comma-separated tasks (default: all of them)")
    parser.add_argument("--difficulty", default="easy", choices=list(DIFFICULTIES), help="difficulty preset")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="samples in each tar shard")
    parser.add_argument("--resume", action="store_true", help="continue after the last complete shard in --out")
    args = parser.parse_args(argv)
    return run_tool("make_synthetic", lambda: make(args))


if __name__ == "__main__":
    sys.exit(main())
