"""`papo-mega train RECIPE --dry-run`: one rank of the target layout built on the meta device.

- The 72B recipe at its 32-GPU layout passes without allocating its weights (peak RSS, not time:
  a build that allocates is what makes a dry run slow) and reports the expected per-rank counts.
- The tiny recipe's dry-run counts equal those of a real multi-process build at the same layout.
- Bad recipes and paths give one-line errors (exit 2).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from papo_mega.config import load_config
from papo_mega.distributed.layout import ParallelLayout
from papo_mega.dry_run import expected_rank_params, total_params
from tests.distributed.harness import run_distributed

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
TINY = str(REPO / "examples" / "tiny_cpu.yaml")
BIG = str(REPO / "examples" / "papo_g_72b.yaml")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A directory that passes the shard check (a manifest listing samples)."""
    root = tmp_path_factory.mktemp("dry_shards")
    (root / "manifest.json").write_text('{"shards": [{"name": "shard-000000.tar", "count": 1}]}')
    return root


def dry_run(recipe: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Overrides first: argparse takes the positionals (recipe, overrides) in one run."""
    overrides = [a for a in args if "=" in a]
    flags = [a for a in args if "=" not in a]
    cmd = [sys.executable, "-m", "papo_mega.cli", "train", recipe, *overrides, "--dry-run", *flags]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def reported(stdout: str) -> dict[int, tuple[int, int]]:
    """rank -> (pp stage, parameters) from the report."""
    found = re.findall(r"^rank (\d+) \(pp stage (\d+)\): ([\d,]+) parameters", stdout, flags=re.M)
    return {int(r): (int(s), int(n.replace(",", ""))) for r, s, n in found}


def test_72b_recipe_dry_run_passes_without_allocating_weights_with_the_expected_counts(shards, tmp_path):
    paths = [f"data.train_shards={shards}", "algo.init_from=", "data.tokenizer=", f"run.run_dir={tmp_path / 'run'}"]
    proc = dry_run(BIG, "--world-size", "32", *paths)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    cfg = load_config(BIG, paths)
    layout = ParallelLayout(world_size=32, **cfg.parallel.layout_sizes())
    counts = reported(proc.stdout)
    last = (layout.pp_size - 1) * layout.tp_size * layout.dp_size
    assert sorted(counts) == [0, last]
    assert counts[0] == (0, expected_rank_params(cfg, layout, 0))
    assert counts[last] == (layout.pp_size - 1, expected_rank_params(cfg, layout, layout.pp_size - 1))
    # Qwen2.5-VL-72B-Instruct: 73.4 B parameters (its released safetensors).
    assert abs(total_params(cfg) - 73.4e9) < 0.05e9
    assert f"model: {total_params(cfg):,} parameters" in proc.stdout
    assert "layout: tp4 pp8 dp1 (world 32)" in proc.stdout
    peak = re.search(r"peak RSS (\d+) MB", proc.stdout)
    # 73 B bf16 parameters would be 147 GB; one rank's 2.7 B allocated for real is 5+ GB.
    assert peak and int(peak.group(1)) < 2000, proc.stdout


def real_counts(layout_sizes: dict) -> tuple[int, int]:
    """(pp rank, parameters) of this rank's chunks, really built (not meta) on CPU."""
    from papo_mega.distributed.runtime import init_distributed, shutdown_distributed
    from papo_mega.models.qwen_vl import build_model_chunks

    cfg = load_config(TINY)
    groups = init_distributed(layout_sizes)
    chunks = build_model_chunks(cfg.model, cfg.vision, groups, seed=1234)
    count = sum(p.numel() for chunk in chunks for p in chunk.parameters())
    assert all(p.device.type == "cpu" for chunk in chunks for p in chunk.parameters())
    result = (groups.pp_rank, count)
    shutdown_distributed()
    return result


@pytest.mark.parametrize("sizes", [{"tp_size": 2}, {"pp_size": 2}], ids=["tp2", "pp2"])
def test_tiny_dry_run_counts_match_a_real_build(shards, tmp_path, sizes):
    real = run_distributed(real_counts, 2, args=(sizes,))
    overrides = [f"parallel.{k}={v}" for k, v in sizes.items()]
    proc = dry_run(TINY, "--world-size", "2", *overrides, f"data.train_shards={shards}", "data.eval_shards=",
                   f"run.run_dir={tmp_path}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    counts = reported(proc.stdout)
    assert counts == {rank: real[rank] for rank in counts}
    assert sorted(counts) == ([0, 1] if "pp_size" in sizes else [0])


@pytest.mark.parametrize("args, message", [
    (["--world-size", "8", "parallel.tp_size=8"],
     "4 attention heads are not divisible by tp_size=8; choose a tp_size that divides 4"),
    ([f"data.train_shards={REPO / 'docs'}"],  # exists but is no shard directory (a missing one is to create)
     f"data.train_shards={REPO / 'docs'}: {REPO / 'docs'} has no manifest.json"),
    (["--world-size", "3", "parallel.tp_size=2"], "world size 3 is not divisible by tp*pp*cp = 2*1*1 = 2"),
    (["model.precision=fp8", "model.fp8_bf16_layers_start=1"],
     "model.fp8_recipe=delayed cannot keep layers in bf16"),
], ids=["heads-vs-tp", "not-shards", "world-size", "fp8-delayed-bf16"])
def test_bad_recipes_are_one_line_errors(shards, tmp_path, args, message):
    defaults = [f"data.train_shards={shards}", "data.eval_shards=", f"run.run_dir={tmp_path}"]
    proc = dry_run(TINY, *defaults, *args)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("papo-mega: error")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_72b_at_tp8_names_the_vision_tower_limit(shards, tmp_path):
    proc = dry_run(BIG, "--world-size", "32", "parallel.tp_size=8", "parallel.pp_size=4",
                   f"data.train_shards={shards}", "algo.init_from=", "data.tokenizer=", f"run.run_dir={tmp_path}")
    assert proc.returncode == 2
    assert "vision.intermediate_size=3420 is not divisible by tp_size=8" in proc.stderr
