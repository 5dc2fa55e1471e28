#!/usr/bin/env python
"""`make demo` over seeds and thread counts: does the embedded job learn on every one of them?

    .venv/bin/python tools/demo_seeds.py [--seeds 0,1,2,3,4] [--threads 1,2] [--out runs/demo_seeds] [overrides]

Runs `papo-mega demo --seed S --threads T` for every pair (each in OUT/seedS_tT, resumable: a
finished pair is only re-summarised), then prints and writes OUT/demo_seeds.md: per run the
held-out original-image accuracy after SFT and after RL, the gain, format rates, format-aware
vision reliance, wall time and peak memory; then min / median / max of each over all runs.
CPU kernels and thread counts change rounding: the demo is only right if it learns on all of them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIGURES = (("sft", "after SFT", lambda s: s["before_rl"]["original"]),
           ("rl", "after RL", lambda s: s["after_rl"]["original"]),
           ("gain", "gain", lambda s: s["after_rl"]["original"] - s["before_rl"]["original"]),
           ("blank_fmt", "blank format after RL", lambda s: s["after_rl"]["format"]["blank"]),
           ("reliance", "reliance after RL", lambda s: s["vision_reliance"]["after_rl"]),
           ("wall", "wall min", lambda s: s["wall_s"] / 60),
           ("mem", "peak GB", lambda s: s["peak_memory_gb"]))


def run_one(out: Path, seed: int, threads: int, overrides: list[str]) -> dict:
    run_dir = out / f"seed{seed}_t{threads}"
    cmd = [sys.executable, "-m", "papo_mega.cli", "demo", "--seed", str(seed), "--threads", str(threads),
           *overrides, f"run.run_dir={run_dir}"]
    print(f"[demo_seeds] seed {seed}, {threads} thread(s) per process -> {run_dir}", flush=True)
    with open(out / f"seed{seed}_t{threads}.log", "w") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    if code != 0:
        sys.exit(f"[demo_seeds] seed {seed} threads {threads} failed (exit {code}); see {log.name}; "
                 f"rerun the same command to continue")
    return json.loads((run_dir / "demo_summary.json").read_text())


def _cell(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def table(rows: list[tuple[int, int, dict]]) -> str:
    head = ["seed", "threads", *(label for _, label, _ in FIGURES)]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    values = {key: [] for key, _, _ in FIGURES}
    for seed, threads, summary in rows:
        cells = []
        for key, _, get in FIGURES:
            value = get(summary)
            cells.append(_cell(value))
            if value is not None:
                values[key].append(value)
        lines.append(f"| {seed} | {threads} | " + " | ".join(cells) + " |")
    for name, pick in (("min", min), ("median", statistics.median), ("max", max)):
        lines.append(f"| **{name}** | | " + " | ".join(_cell(pick(values[k]) if values[k] else None)
                                                     for k, _, _ in FIGURES) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--threads", default="1,2", help="torch threads per process, comma-separated")
    parser.add_argument("--out", default="runs/demo_seeds")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every demo run")
    args = parser.parse_args()
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    rows = [(s, t, run_one(out, s, t, args.overrides)) for t in threads for s in seeds]
    text = table(rows)
    (out / "demo_seeds.md").write_text(text)
    print(text + f"\n[demo_seeds] written to {out / 'demo_seeds.md'}", flush=True)


if __name__ == "__main__":
    main()
