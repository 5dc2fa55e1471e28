"""KV-cached generation on the training model: equal to transformers' greedy generate, the same
samples at every layout, log-probs equal to the training forward's, stop tokens free their rows."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from papo_mega.convert.hf_to_mcore import read_metadata
from tests.distributed.harness import run_distributed
from tests.distributed.hf_fixtures import make_tiny_hf
from tests.distributed.rollout_workers import (
    count_fp8_weight_refreshes,
    generate_at_layout,
    hf_greedy,
    probe_prompts,
)

REPO = Path(__file__).resolve().parents[2]
MAX_NEW = 16
SAMPLING = dict(n=3, temperature=1.3, top_k=50, top_p=0.95, max_new_tokens=MAX_NEW)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout")
    hf_dir = make_tiny_hf(root / "hf", "tied_gqa", weight_scale=8.0)
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "convert_hf_to_mcore.py"), "--hf", str(hf_dir),
                           "--out", str(root / "ckpt"), "--tp", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return hf_dir, root / "ckpt"


@pytest.fixture(scope="module")
def sampled_tp1(converted):
    return run_distributed(generate_at_layout, 1, args=(str(converted[1]), {}, SAMPLING, 7, [], True))[0]


@pytest.mark.parametrize("layout,world", [({}, 1), ({"tp_size": 2}, 2)], ids=["tp1", "tp2"])
def test_greedy_equals_transformers_generate(converted, layout, world):
    hf_dir, ckpt = converted
    _, model, vision = read_metadata(ckpt)
    expected = hf_greedy(str(hf_dir), probe_prompts(model, vision), model, MAX_NEW)
    assert len(set(expected[0])) > 3, "degenerate reference output would make the comparison weak"
    greedy = dict(n=1, temperature=0.0, max_new_tokens=MAX_NEW)
    out = run_distributed(generate_at_layout, world, args=(str(ckpt), layout, greedy, 0, []))[0]
    assert out["tokens"].tolist() == expected


@pytest.mark.parametrize("layout,world", [({"tp_size": 2}, 2), ({"pp_size": 2}, 2), ({"pp_size": 2, "vpp_size": 2}, 2)],
                         ids=["tp2", "pp2", "pp2vpp2"])
def test_sampling_is_the_same_at_every_layout(converted, sampled_tp1, layout, world):
    out = run_distributed(generate_at_layout, world, args=(str(converted[1]), layout, SAMPLING, 7, []))[0]
    assert out["tokens"].tolist() == sampled_tp1["tokens"].tolist()
    torch.testing.assert_close(out["logprobs"], sampled_tp1["logprobs"], atol=1e-4, rtol=0)


def test_samples_differ_within_a_group_and_by_seed(converted, sampled_tp1):
    tokens = sampled_tp1["tokens"]
    assert sampled_tp1["prompt_index"].tolist() == [0, 0, 0, 1, 1, 1]
    assert len({tuple(row) for row in tokens[:3].tolist()}) > 1, "G samples of one prompt are identical"
    other = run_distributed(generate_at_layout, 1, args=(str(converted[1]), {}, SAMPLING, 8, []))[0]
    assert other["tokens"].tolist() != tokens.tolist()


def test_rollout_logprobs_equal_the_training_forward(sampled_tp1):
    """KV-cached decoding and the full training forward give the same log-probs (PPO ratio 1 at start)."""
    mask = torch.arange(MAX_NEW)[None] < sampled_tp1["lengths"][:, None]
    diff = (sampled_tp1["logprobs"] - sampled_tp1["recomputed"]).abs()[mask]
    assert diff.max().item() < 1e-4


def test_stop_token_ends_a_row_and_frees_it(converted):
    """Greedy with a stop token: the row that emits it stops there ('eos'), the others are unchanged."""
    ckpt = str(converted[1])
    greedy = dict(n=1, temperature=0.0, max_new_tokens=MAX_NEW)
    free = run_distributed(generate_at_layout, 1, args=(ckpt, {}, greedy, 0, []))[0]["tokens"].tolist()
    stop = next(t for t in free[0][2:] if t not in free[1])
    at = free[0].index(stop)
    out = run_distributed(generate_at_layout, 1, args=(ckpt, {}, greedy, 0, [stop]))[0]
    assert out["finish"] == ["eos", "length"]
    assert out["lengths"].tolist() == [at + 1, MAX_NEW]
    assert out["tokens"][0, : at + 1].tolist() == free[0][: at + 1]
    assert out["tokens"][1].tolist() == free[1]


def test_chunked_greedy_equals_one_batch(converted):
    """rollout.max_batch_rows = 1: each prompt decoded alone (shortest first) gives the tokens of the one-batch run."""
    ckpt = str(converted[1])
    greedy = dict(n=1, temperature=0.0, max_new_tokens=MAX_NEW)
    whole = run_distributed(generate_at_layout, 1, args=(ckpt, {}, greedy, 0, []))[0]
    chunked = run_distributed(generate_at_layout, 1, args=(ckpt, {}, {**greedy, "max_batch_rows": 1}, 0, []))[0]
    assert chunked["prompt_index"].tolist() == [0, 1]
    assert chunked["tokens"].tolist() == whole["tokens"].tolist()
    assert chunked["lengths"].tolist() == whole["lengths"].tolist()


@pytest.mark.parametrize("layout,world", [({}, 1), ({"pp_size": 2}, 2)], ids=["tp1", "pp2"])
def test_chunked_sampling_keeps_groups_and_logprobs(converted, layout, world):
    """One prompt's group per chunk: rows come back grouped in prompt order, and each row's log-probs
    are the training forward's for the tokens it holds (rows are not mixed up across chunks)."""
    rollout = {**SAMPLING, "max_batch_rows": SAMPLING["n"]}
    out = run_distributed(generate_at_layout, world, args=(str(converted[1]), layout, rollout, 7, [], True))[0]
    assert out["prompt_index"].tolist() == [0, 0, 0, 1, 1, 1]
    mask = torch.arange(MAX_NEW)[None] < out["lengths"][:, None]
    assert mask.sum() > 0
    assert (out["logprobs"] - out["recomputed"]).abs()[mask].max().item() < 1e-4
    assert len({tuple(row) for row in out["tokens"].tolist()}) > 3, "chunks drew the same samples"


@pytest.mark.parametrize("layout,world,rows,prefills", [({}, 1, 0, 1), ({}, 1, 1, 2), ({"pp_size": 2}, 2, 0, 1)],
                         ids=["tp1", "tp1-chunks", "pp2"])
def test_fp8_weights_are_cast_at_prefill_only(converted, layout, world, rows, prefills):
    """Weight caching for rollout: the fp8 weight copies are refreshed once per prefill (per chunk),
    and the MAX_NEW - 1 decode steps reuse them, on every pipeline stage."""
    greedy = dict(n=1, temperature=0.0, max_new_tokens=MAX_NEW, max_batch_rows=rows)
    counts = run_distributed(count_fp8_weight_refreshes, world, args=(str(converted[1]), layout, greedy))[0]
    assert counts == [prefills] * world
