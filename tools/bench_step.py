"""A whole PAPO-G training step vs a GRPO step: same model, data, rollout and layout, one run.

Both trainers run the full step (stream -> views -> rollout -> reward -> no-grad log-probs ->
PPO update) on the tiny VLM preset on CPU. The learning rate is 0 so both keep identical
weights and sample identical responses (same seeds): the only difference left is what PAPO
adds - the masked view in the no-grad forward and the PAPO loss terms. Steps alternate between
the two trainers and the ratio is the median of per-round ratios (robust to a shared machine).
The reference implementation pays 1.19x (3B) / 1.42x (7B) for its separate masked pass.

    python tools/bench_step.py [--steps 8] [--prompts 8] [--n 4] [--new-tokens 32]

Last line: `ratio <papo/grpo>`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
warnings.filterwarnings("ignore")

from papo_mega.config import load_config  # noqa: E402
from papo_mega.distributed import init_distributed, shutdown_distributed  # noqa: E402
from papo_mega.train import PapoTrainer  # noqa: E402


def make_shards(directory: Path, num: int) -> None:
    subprocess.run([sys.executable, str(REPO / "tools" / "make_synthetic.py"), "--split", "train", "--num", str(num),
                    "--out", str(directory), "--samples-per-shard", "256"], check=True, capture_output=True)


def trainer(shards: Path, algo: str, args) -> PapoTrainer:
    papo = algo == "papo_g"
    overrides = [
        "preset=tiny", f"data.train_shards={shards}", "data.max_prompt_len=256", f"algo.name={algo}",
        f"algo.prompts_per_step={args.prompts}", f"rollout.n={args.n}", f"rollout.max_new_tokens={args.new_tokens}",
        f"train.micro_batch_size={args.n}", f"train.global_batch_size={args.prompts * args.n}", "train.lr=0.0",
        f"loss.prcp_coef={0.02 if papo else 0.0}", f"loss.entropy_coef={0.05 if papo else 0.0}",
        f"loss.masked_entropy_coef={0.05 if papo else 0.0}", "loss.kl_coef=0.01",
    ]
    cfg = load_config(None, overrides)
    cfg.check_algorithm()
    return PapoTrainer(cfg, GROUPS)


def main() -> None:
    global GROUPS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed rounds (one step of each trainer per round)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--n", type=int, default=4, help="responses per prompt")
    parser.add_argument("--new-tokens", type=int, default=32, help="max new tokens per response")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    GROUPS = init_distributed({}, seed=1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            make_shards(Path(tmp) / "train", args.prompts * (args.steps + 2))
            papo, grpo = trainer(Path(tmp) / "train", "papo_g", args), trainer(Path(tmp) / "train", "grpo", args)
            times = {"papo_g": [], "grpo": []}
            for step in range(args.steps + 1):  # round 0 is warm-up
                order = [("papo_g", papo), ("grpo", grpo)][:: 1 if step % 2 else -1]
                for name, job in order:
                    start = time.perf_counter()
                    metrics = job.step(step)
                    if step:
                        times[name].append(time.perf_counter() - start)
                    if step == 1:
                        print(f"{name}: {metrics['response/length_mean']:.1f} tokens/response, "
                              f"stages {', '.join(f'{k[5:]}={v:.2f}' for k, v in metrics.items() if k.startswith('time/'))}")
    finally:
        shutdown_distributed()
    ratios = [p / g for p, g in zip(times["papo_g"], times["grpo"])]
    print(f"steps: papo_g median {statistics.median(times['papo_g']):.2f} s, grpo median "
          f"{statistics.median(times['grpo']):.2f} s over {args.steps} rounds "
          f"({args.prompts} prompts x {args.n} responses, <= {args.new_tokens} new tokens, tiny VLM, CPU)")
    print(f"ratio {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
