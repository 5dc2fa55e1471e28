"""Models with Transformer Engine's parameter names and extra state, emulated on CPU.

What is emulated (papo_mega/models/te_names.py, apply_te_naming), from megatron-core 0.16.1 and TE:
* models/gpt/gpt_layer_specs.py get_gpt_layer_with_transformer_engine_spec: linear_qkv and
  linear_fc1 are TELayerNormColumnParallelLinear and input_layernorm / pre_mlp_layernorm are
  IdentityOp, so the norm weights are `self_attention.linear_qkv.layer_norm_weight` and
  `mlp.linear_fc1.layer_norm_weight` (the local spec's sharded_state_dict_keys_map gives the
  checkpoint keys the same names);
* transformer/transformer_block.py: with TE importable the final norm is TENorm
  (`LayerNormImpl = TENorm`), i.e. te.pytorch.RMSNorm, a TE op whose get_extra_state
  (transformer_engine/pytorch/ops/op.py BasicOperation) serialises fp8 metadata into a uint8
  tensor; transformer/utils.py make_sharded_tensors_for_checkpoint turns every `_extra_state` into
  a ShardedObject. A checkpoint written with the local spec has no
  `lm.decoder.final_layernorm._extra_state`, and megatron's load of a sharded state dict that asks
  for it fails ("Missing key in checkpoint state_dict").

Each test failed before the fix: TE norm weights drew N(0, std) and gathered under TE names;
fill_from_hf found no HF tensor for `layer_norm_weight`; the local-spec checkpoint did not load.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed import te_workers
from tests.distributed.harness import assert_tensors_close, run_distributed
from tests.distributed.hf_fixtures import make_tiny_hf

REPO = Path(__file__).resolve().parents[2]


def test_init_and_tp2_gather_match_the_local_spec():
    """(a) layout-invariant init on TE names: norms 1, everything as the local spec's init; (d) the
    TP2 gather of the TE-named model is the local one under local names; the same logits."""
    out = run_distributed(te_workers.init_both_specs, 2, args=({"tp_size": 2},))[0]
    assert any(n.endswith("linear_qkv.layer_norm_weight") for n in out["te_module_names"])
    assert not any(n.endswith("input_layernorm.weight") for n in out["te_module_names"])
    assert len(out["te_norms"]) == 8 and all(torch.all(p == 1) for p in out["te_norms"].values())
    assert sorted(out["te"]) == sorted(out["local"])
    for name, tensor in out["local"].items():
        assert torch.equal(out["te"][name], tensor), name
    torch.testing.assert_close(out["te_logits"], out["local_logits"], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def hf_and_local_dir(tmp_path_factory):
    """A tiny HF checkpoint and its model directory converted by the CLI (local spec) at TP2."""
    root = tmp_path_factory.mktemp("te_spec")
    hf_dir = make_tiny_hf(root / "hf", "tied_gqa")
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "convert_hf_to_mcore.py"), "--hf", str(hf_dir),
                           "--out", str(root / "local"), "--tp", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return hf_dir, root / "local", root


def _assert_same_hf(got: dict, hf_dir: Path) -> None:
    original = load_file(hf_dir / "model.safetensors")
    assert sorted(got) == sorted(original)
    for name, tensor in original.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def test_hf_conversion_into_te_names_and_export_round_trip(hf_and_local_dir, tmp_path):
    """(b) HF -> a TE-named model at TP2 -> gathered -> HF: bit-identical; the TE-written model
    directory (with its extra state) exports on CPU (local spec) bit-identically too."""
    hf_dir, _, _ = hf_and_local_dir
    back = run_distributed(te_workers.convert_into_te, 2, args=(str(hf_dir), {"tp_size": 2}, str(tmp_path / "te")))[0]
    _assert_same_hf(back, hf_dir)
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "convert_mcore_to_hf.py"), "--ckpt",
                           str(tmp_path / "te"), "--out", str(tmp_path / "back")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_hf(load_file(tmp_path / "back" / "model.safetensors"), hf_dir)


def test_model_dirs_load_across_specs(hf_and_local_dir, tmp_path):
    """(c) a local-spec model directory (no TE extra state) loads into a TE-named model, a TE-written
    one into the local spec and into TE names with its extra state restored; weights equal."""
    hf_dir, local_dir, _ = hf_and_local_dir
    into_te = run_distributed(te_workers.load_dir_into, 1, args=(str(local_dir), {}, True))[0]
    _assert_same_hf(into_te["hf"], hf_dir)
    run_distributed(te_workers.convert_into_te, 1, args=(str(hf_dir), {}, str(tmp_path / "te")))
    into_local = run_distributed(te_workers.load_dir_into, 2, args=(str(tmp_path / "te"), {"tp_size": 2}, False))[0]
    _assert_same_hf(into_local["hf"], hf_dir)
    assert into_local["extra_state"] == {}
    te_again = run_distributed(te_workers.load_dir_into, 1, args=(str(tmp_path / "te"), {}, True))[0]
    _assert_same_hf(te_again["hf"], hf_dir)
    assert "lm.decoder.final_layernorm" in te_again["extra_state"] and len(te_again["extra_state"]) == 4 * 4 + 1
    assert all(b"module" in state for state in te_again["extra_state"].values())


@pytest.mark.parametrize("saved_te,loaded_te", [(False, True), (True, False)], ids=["local_to_te", "te_to_local"])
def test_training_checkpoint_resumes_across_specs(tmp_path, saved_te, loaded_te):
    """(c) a training checkpoint (weights + Adam moments) written under one naming resumes under the
    other: the next step's loss and weights equal the uninterrupted run's."""
    saved = run_distributed(te_workers.save_training, 1, args=(str(tmp_path), {}, saved_te))[0]
    resumed = run_distributed(te_workers.resume_training, 1, args=(saved["path"], {}, loaded_te))[0]
    assert resumed["loss"] == pytest.approx(saved["loss"], abs=1e-6)
    assert_tensors_close(resumed["weights"], saved["weights"], 1e-6, "weights after the resumed step")


def test_a_missing_weight_is_still_an_error(tmp_path):
    message = run_distributed(te_workers.checkpoint_missing_a_weight, 1, args=(str(tmp_path),))[0]
    assert message is not None and "lm.output_layer.weight" in message
