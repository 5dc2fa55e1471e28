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

from papo_mega.convert.jobs import run_tool
from papo_mega.data.synthetic import DIFFICULTIES
from papo_mega.data.synthetic_shards import write_synthetic_shards


def make(args: argparse.Namespace) -> int:
    count = write_synthetic_shards(args.out, args.split, args.num, args.seed,
                                   args.tasks.split(",") if args.tasks else None, args.difficulty,
                                   args.samples_per_shard, args.resume)
    print(f"wrote {count} samples to {args.out}")
    return 0


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
