"""`papo-mega eval` on a tiny checkpoint and the synthetic suite: tables written, every view and
task present, counts right; bad input is one line and exit 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.harness import make_synthetic, run_distributed

REPO = Path(__file__).resolve().parents[2]


def save_tiny_model_dir(out_dir: str):
    from papo_mega.config import load_config
    from papo_mega.distributed import init_distributed
    from papo_mega.model_dir import save_model_dir
    from papo_mega.models.qwen_vl import build_model_chunks

    cfg = load_config(None, ["preset=tiny"])
    groups = init_distributed({}, seed=1)
    chunks = build_model_chunks(cfg.model, cfg.vision, groups, seed=5)
    save_model_dir(chunks, out_dir, cfg.model, cfg.vision, groups)


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "papo_mega.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    run_distributed(save_tiny_model_dir, 1, args=(str(root / "model"),))
    make_synthetic(root / "data", "test", 6, samples_per_shard=4)
    return root


def test_eval_writes_tables_for_every_view_and_task(model_and_data):
    root = model_and_data
    proc = _run("eval", "--ckpt", str(root / "model"), "--data", str(root / "data"), "--k", "2",
                "--max-samples", "5", "--batch-prompts", "3", "--out", str(root / "out"),
                "rollout.max_new_tokens=6", "rollout.temperature=1.0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((root / "out" / "eval.json").read_text())
    assert result["k"] == 2 and result["questions"] == 5
    assert set(result["accuracy"]) == {"original", "masked", "blank"}
    tasks = set(result["accuracy"]["original"])
    assert "overall" in tasks and len(tasks) >= 3  # the synthetic suite's tasks take turns
    for view in result["accuracy"].values():
        assert all(0.0 <= acc <= 1.0 for acc in view.values())
    assert set(result["vision_reliance"]) == {"original_minus_masked", "original_minus_blank"}
    assert set(result["format"]) == set(result["wellformed_accuracy"]) == {"original", "masked", "blank"}
    # Chance levels come from the synthetic set's manifest (issue 17: the baseline next to accuracy).
    from papo_mega.data.synthetic import chance_level
    assert all(result["chance"][t] == chance_level(t) for t in tasks if t != "overall")
    assert 0 < result["chance"]["overall"] < 1
    table = (root / "out" / "eval.md").read_text()
    assert "avg@2" in table and "| overall |" in table and "acc if well-formed" in table


def test_eval_bad_data_path_is_one_line(model_and_data, tmp_path):
    proc = _run("eval", "--ckpt", str(model_and_data / "model"), "--data", str(tmp_path / "nowhere"), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "make_synthetic" in proc.stderr


def test_eval_with_rollout_chunks_smaller_than_k(model_and_data, tmp_path):
    """rollout.max_batch_rows below --k (a recipe's chunking for n=1) still evaluates: a chunk
    holds at least one question's k answers."""
    root = model_and_data
    proc = _run("eval", "--ckpt", str(root / "model"), "--data", str(root / "data"), "--k", "2",
                "--max-samples", "3", "--out", str(tmp_path), "rollout.max_new_tokens=4", "rollout.n=1",
                "rollout.max_batch_rows=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "eval.json").read_text())["questions"] == 3
