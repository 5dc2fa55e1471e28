"""Bad conversion input: one-line errors naming the fix, nothing half-written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from papo_mega.config import ModelConfig
from papo_mega.models.lm_hf import interleave_qkv, lm_hf_to_mcore, lm_mcore_to_hf, split_qkv
from tests.distributed.hf_fixtures import make_tiny_hf

REPO = Path(__file__).resolve().parents[2]


def convert(*args):
    return subprocess.run([sys.executable, str(REPO / "tools" / "convert_hf_to_mcore.py"), *args],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_hf(tmp_path_factory.mktemp("hf") / "model", "tied_gqa")


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


def test_not_qwen(tmp_path, hf_dir):
    bad = tmp_path / "llama"
    bad.mkdir()
    config = json.loads((hf_dir / "config.json").read_text())
    config["model_type"] = "llama"
    (bad / "config.json").write_text(json.dumps(config))
    line = _one_error_line(convert("--hf", str(bad), "--out", str(tmp_path / "out")))
    assert "is a 'llama' checkpoint, not Qwen2.5-VL" in line
    assert not (tmp_path / "out").exists()


def test_output_exists(tmp_path, hf_dir):
    (tmp_path / "out").mkdir()
    assert "already exists; choose a new --out" in _one_error_line(convert("--hf", str(hf_dir), "--out", str(tmp_path / "out")))


def test_layout_does_not_divide(tmp_path, hf_dir):
    line = _one_error_line(convert("--hf", str(hf_dir), "--out", str(tmp_path / "out"), "--pp", "3"))
    assert "4 layers are not divisible by pp_size*vpp_size = 3" in line


def test_missing_shard(tmp_path, hf_dir):
    broken = tmp_path / "sharded"
    broken.mkdir()
    (broken / "config.json").write_text((hf_dir / "config.json").read_text())
    index = {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    line = _one_error_line(convert("--hf", str(broken), "--out", str(tmp_path / "out")))
    assert "shard model-00001-of-00002.safetensors listed in model.safetensors.index.json is missing" in line


def test_dtype_mismatch(tmp_path, hf_dir):
    lying = tmp_path / "lying"
    lying.mkdir()
    config = json.loads((hf_dir / "config.json").read_text())
    config["dtype"] = "bfloat16"  # the tensors are float32
    (lying / "config.json").write_text(json.dumps(config))
    (lying / "model.safetensors").symlink_to(hf_dir / "model.safetensors")
    line = _one_error_line(convert("--hf", str(lying), "--out", str(tmp_path / "out")))
    assert "is stored as torch.float32 but config.json says torch.bfloat16" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp-convert" / "papo_model.json").exists()


def test_lm_mapping_round_trip_and_qkv_layout():
    cfg = ModelConfig(num_layers=2, hidden_size=48, ffn_hidden_size=40, num_attention_heads=6, num_query_groups=2,
                      vocab_size=100, vocab_pad_multiple=64)
    d = 8
    q, k, v = torch.randn(48, 48), torch.randn(16, 48), torch.randn(16, 48)
    qkv = interleave_qkv(q, k, v, cfg)
    # group 0 holds heads 0-2 of q, then k_0, then v_0
    assert torch.equal(qkv[: 3 * d], q[: 3 * d]) and torch.equal(qkv[3 * d : 4 * d], k[:d])
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(qkv, cfg), (q, k, v)))
    hf = {"model.embed_tokens.weight": torch.randn(100, 48), "model.norm.weight": torch.randn(48),
          "lm_head.weight": torch.randn(100, 48)}
    for i in range(2):
        p = f"model.layers.{i}."
        hf.update({p + "input_layernorm.weight": torch.randn(48), p + "post_attention_layernorm.weight": torch.randn(48),
                   p + "self_attn.o_proj.weight": torch.randn(48, 48), p + "mlp.down_proj.weight": torch.randn(48, 40),
                   p + "mlp.gate_proj.weight": torch.randn(40, 48), p + "mlp.up_proj.weight": torch.randn(40, 48)})
        for name, rows in (("q", 48), ("k", 16), ("v", 16)):
            hf[f"{p}self_attn.{name}_proj.weight"] = torch.randn(rows, 48)
            hf[f"{p}self_attn.{name}_proj.bias"] = torch.randn(rows)
    ours = lm_hf_to_mcore(hf, cfg)
    assert ours["lm.embedding.word_embeddings.weight"].shape == (128, 48)  # padded rows
    back = lm_mcore_to_hf(ours, cfg)
    assert sorted(back) == sorted(hf) and all(torch.equal(back[n], t) for n, t in hf.items())
