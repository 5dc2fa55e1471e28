"""HF <-> megatron conversion and logits parity with transformers, at several layouts.

For each tiny random HF checkpoint: convert at TP2xPP2, check parity with transformers at TP1,
TP2, PP2 and TP2xPP2 (the checkpoint reshards), check the layouts agree with each other, and
export back to HF bit-identically.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from papo_mega.convert.hf_to_mcore import read_metadata
from papo_mega.convert.parity import build_probe_inputs, hf_logits, max_abs_logit_diff, our_logits_rank
from tests.distributed.harness import run_distributed
from tests.distributed.hf_fixtures import TINY_HF_CONFIGS, make_tiny_hf

REPO = Path(__file__).resolve().parents[2]
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2), "tp2_pp2": (2, 2)}


def tool(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / f"{name}.py"), *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module", params=sorted(TINY_HF_CONFIGS))
def converted(request, tmp_path_factory):
    """(hf_dir, ckpt_dir) with the checkpoint converted at TP2xPP2 by the CLI."""
    root = tmp_path_factory.mktemp(request.param)
    hf_dir = make_tiny_hf(root / "hf", request.param)
    proc = tool("convert_hf_to_mcore", "--hf", str(hf_dir), "--out", str(root / "ckpt"), "--tp", "2", "--pp", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "seconds_per_GiB" in proc.stdout and "peak_rss_GiB" in proc.stdout
    return hf_dir, root / "ckpt"


def test_parity_at_every_layout_and_layouts_agree(converted):
    hf_dir, ckpt = converted
    _, model, vision = read_metadata(ckpt)
    inputs = build_probe_inputs(model, vision, seed=1)
    reference = hf_logits(str(hf_dir), inputs, model.image_token_id)
    by_layout = {}
    for name, (tp, pp) in LAYOUTS.items():
        by_layout[name] = run_distributed(our_logits_rank, tp * pp, args=(str(ckpt), {"tp_size": tp, "pp_size": pp},
                                                                          inputs))[0]
        diff = max_abs_logit_diff(by_layout[name], reference, inputs.attention_mask)
        assert diff <= 1e-4, f"{name}: max_abs_logit_diff {diff:.3e} vs transformers"
    for name in ("tp1", "pp2"):  # converted at TP2xPP2, loaded elsewhere: the same logits
        assert max_abs_logit_diff(by_layout[name], by_layout["tp2_pp2"], inputs.attention_mask) <= 1e-5


def test_check_parity_cli_reports_last_line(converted):
    hf_dir, ckpt = converted
    proc = tool("check_parity", "--hf", str(hf_dir), "--ckpt", str(ckpt), "--tp", "2", "--pp", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("max_abs_logit_diff ") and float(last.split()[1]) <= 1e-4


def test_round_trip_is_bit_identical(converted, tmp_path):
    hf_dir, ckpt = converted
    proc = tool("convert_mcore_to_hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "back"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    original, back = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype, name
        assert torch.equal(back[name], tensor), name


def test_bf16_round_trip_keeps_dtype_and_bits(tmp_path):
    hf_dir = make_tiny_hf(tmp_path / "hf", "tied_gqa", dtype=torch.bfloat16)
    assert tool("convert_hf_to_mcore", "--hf", str(hf_dir), "--out", str(tmp_path / "ck"), "--tp", "2").returncode == 0
    assert tool("convert_mcore_to_hf", "--ckpt", str(tmp_path / "ck"), "--out", str(tmp_path / "back")).returncode == 0
    original, back = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(back) == sorted(original)
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], v) for k, v in original.items())
