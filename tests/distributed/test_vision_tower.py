"""`QwenVisionTower` computes what transformers' Qwen2.5-VL vision model computes, at TP1 and TP2.

Per case (tests/distributed/vision_workers.py: two tiny towers, two images of different
non-square sizes, several windows): TP1 output and gradients equal HF's; one packed call equals
one call per image; TP2 output and gradient shards equal TP1's. fp32: only summation order differs.
"""

import pytest

from tests.distributed.harness import run_distributed
from tests.distributed.vision_workers import (
    CASES,
    checkpoint_reshard,
    sharded_against_reference,
    tp1_against_hf,
)

OUT_TOL = 1e-5
# Gradients reach |g| ~ 30 here (a sum over every output): compared relative to max(1, max |g|).
GRAD_TOL = 1e-5

_tp1_cache: dict = {}


def _tp1(case: str) -> dict:
    """The single-process run of one case (shared by the TP1 and TP2 tests)."""
    if case not in _tp1_cache:
        _tp1_cache[case] = run_distributed(tp1_against_hf, 1, args=(case,), timeout_s=120)[0]
    return _tp1_cache[case]


def _max_diff(a, b) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return (a.double() - b.double()).abs().max().item()


def _worst_scaled_diff(actual: dict, expected: dict) -> tuple[float, str]:
    """Largest max|a - b| / max(1, max|b|) over matching named tensors, and where."""
    assert sorted(actual) == sorted(expected), "tensor names differ"
    scaled = {n: _max_diff(actual[n], b) / max(1.0, b.abs().max().item()) for n, b in expected.items()}
    where = max(scaled, key=scaled.get)
    return scaled[where], where


@pytest.mark.parametrize("case", list(CASES))
def test_tp1_matches_hf(case):
    out = _tp1(case)
    assert sorted(out["names"]) == sorted(out["expected_names"]), (
        "tower parameter names differ from vision_param_names"
    )
    assert out["out"].shape == out["hf_out"].shape
    assert _max_diff(out["out"], out["hf_out"]) <= OUT_TOL
    assert _max_diff(out["separate"], out["out"]) <= OUT_TOL, "packed call differs from one call per image"
    worst, where = _worst_scaled_diff(out["grads"], out["hf_grads_mapped"])
    assert worst <= GRAD_TOL, f"TP1 gradients differ from HF's by {worst:.3g} (scaled) at {where}"


@pytest.mark.parametrize("case", list(CASES))
def test_tp2_matches_tp1(case):
    ref = _tp1(case)
    args = (case, {"tp_size": 2}, ref["full_state"], ref["grads"])
    out = run_distributed(sharded_against_reference, 2, args=args, timeout_s=120)[0]
    assert sorted(out["names"]) == sorted(out["expected_names"])
    assert _max_diff(out["out"], ref["out"]) <= OUT_TOL
    assert _max_diff(out["out"], ref["hf_out"]) <= OUT_TOL
    assert _max_diff(out["separate"], out["out"]) <= OUT_TOL
    assert out["grad_shard_diff"] <= GRAD_TOL, (
        f"TP2 gradient shards differ from TP1 by {out['grad_shard_diff']:.3g}"
    )
    message = out["layout_error"]
    assert message is not None and "num_heads=3" in message and "tp_size=2" in message and "\n" not in message


def test_checkpoint_written_at_tp2_loads_at_tp1(tmp_path):
    """The tower's sharded state dict keeps megatron's TP sharding, so checkpoints reshard."""
    saved, loaded = run_distributed(checkpoint_reshard, 2, args=(str(tmp_path),), timeout_s=120)[0]
    assert _max_diff(loaded, saved) <= OUT_TOL
