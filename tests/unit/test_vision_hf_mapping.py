"""HF <-> megatron vision weight mapping (exact round trip, complete names, correct layouts), and the
vision tower's index helpers against transformers' own (window order, positions, rotary angles)."""

import pytest
import torch
import torch.nn.functional as F

from papo_mega.config import VisionConfig
from papo_mega.distributed.layout import ParallelLayout
from papo_mega.errors import ConfigError, LayoutError
from papo_mega.models.vision import (
    check_vision_layout,
    compute_patch_positions,
    compute_rotary_freqs,
    compute_vision_packing,
    compute_window_index,
)
from papo_mega.models.vision_hf import (
    qkv_hf_to_mcore,
    vision_hf_to_mcore,
    vision_mcore_to_hf,
    vision_param_names,
)
from tests.distributed.vision_workers import CASES, build_hf_vision


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    """(case, VisionConfig, HF state dict with checkpoint names 'visual.*')."""
    spec = CASES[request.param]
    hf = build_hf_vision(spec)
    state = {f"visual.{k}": v.detach().clone() for k, v in hf.state_dict().items()}
    return spec, VisionConfig(enabled=True, **spec["vision"]), state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_identical_and_names_complete(case, dtype):
    _, cfg, hf = case
    hf = {k: v.to(dtype) for k, v in hf.items()}
    ours = vision_hf_to_mcore(hf, cfg)
    assert sorted(ours) == sorted(vision_param_names(cfg))
    back = vision_mcore_to_hf(ours, cfg)
    assert sorted(back) == sorted(hf)
    for name, tensor in hf.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape, name
        assert torch.equal(back[name], tensor), name


def test_prefixes_and_foreign_keys(case):
    """transformers-5 in-memory names (model.visual.*) and bare names map alike; LM keys are ignored."""
    _, cfg, hf = case
    expected = vision_hf_to_mcore(hf, cfg)
    bare = {k.removeprefix("visual."): v for k, v in hf.items()}
    in_memory = {f"model.{k}": v for k, v in hf.items()} | {"model.language_model.norm.weight": torch.ones(3)}
    for variant in (bare, in_memory):
        got = vision_hf_to_mcore(variant, cfg)
        assert sorted(got) == sorted(expected)
        assert all(torch.equal(got[n], expected[n]) for n in expected)
    back = vision_mcore_to_hf(expected, cfg, prefix="model.visual.")
    assert sorted(back) == sorted(k for k in in_memory if ".visual." in k)
    with pytest.raises(KeyError, match="patch_embed.proj.weight"):
        vision_hf_to_mcore({"model.language_model.norm.weight": torch.ones(3)}, cfg)


def test_qkv_rows_interleave_per_head(case):
    """megatron's linear_qkv holds [q_h; k_h; v_h] for each head h; HF holds [q_all; k_all; v_all]."""
    _, cfg, hf = case
    ours = vision_hf_to_mcore(hf, cfg)
    d, heads = cfg.hidden_size // cfg.num_heads, cfg.num_heads
    for kind in ("weight", "bias"):
        theirs = hf[f"visual.blocks.0.attn.qkv.{kind}"]
        mine = ours[f"layers.0.self_attention.linear_qkv.{kind}"]
        for h in range(heads):
            for part in range(3):  # q, k, v
                hf_rows = theirs[part * heads * d + h * d : part * heads * d + (h + 1) * d]
                assert torch.equal(mine[(3 * h + part) * d : (3 * h + part + 1) * d], hf_rows)
    assert torch.equal(
        qkv_hf_to_mcore(torch.arange(12), 2), torch.tensor([0, 1, 4, 5, 8, 9, 2, 3, 6, 7, 10, 11])
    )


def test_fc1_is_gate_then_up_and_patch_embed_equals_conv(case):
    _, cfg, hf = case
    ours = vision_hf_to_mcore(hf, cfg)
    fc1 = ours["layers.1.mlp.linear_fc1.weight"]
    assert torch.equal(
        fc1, torch.cat([hf["visual.blocks.1.mlp.gate_proj.weight"], hf["visual.blocks.1.mlp.up_proj.weight"]])
    )
    conv = hf["visual.patch_embed.proj.weight"]
    kernel = conv.shape[2:]
    pixels = torch.randn(5, ours["patch_embed.weight"].shape[1], generator=torch.Generator().manual_seed(0))
    by_conv = F.conv3d(pixels.view(5, cfg.in_channels, *kernel), conv, stride=kernel).view(5, -1)
    torch.testing.assert_close(pixels @ ours["patch_embed.weight"].T, by_conv, atol=1e-5, rtol=1e-5)


# --- Index helpers against transformers' vision_utils ----------------------------------------------

GRIDS = [
    [[1, 4, 6], [1, 8, 4]],
    [[1, 10, 6], [2, 4, 8]],
    [[1, 8, 8], [3, 2, 6], [1, 12, 4]],  # exact multiples of the window: HF pads an empty window
]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("window_units", [1, 2, 3])
def test_window_index_matches_hf(grid, window_units):
    from transformers.vision_utils import get_vision_window_index

    merge, patch = 2, 2
    ref_index, ref_cu = get_vision_window_index(
        torch.tensor(grid), merge, window_units * merge * patch, patch
    )
    index, sizes = compute_window_index(grid, merge, window_units)
    assert torch.equal(index, ref_index)
    cu = F.pad(torch.cumsum(sizes * merge * merge, 0), (1, 0))
    assert cu.tolist() == ref_cu.tolist()


@pytest.mark.parametrize("grid", GRIDS)
def test_positions_and_rotary_match_hf(grid):
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionRotaryEmbedding
    from transformers.vision_utils import get_vision_position_ids

    positions = compute_patch_positions(grid, 2)
    assert torch.equal(positions, get_vision_position_ids(torch.tensor(grid), 2))
    config = Qwen2_5_VLVisionConfig(hidden_size=48, num_heads=4)
    cos, sin = Qwen2_5_VLVisionRotaryEmbedding(config)(positions.float(), positions)
    freqs = compute_rotary_freqs(positions, head_dim=12)
    torch.testing.assert_close(freqs.cos(), cos, atol=0, rtol=0)
    torch.testing.assert_close(freqs.sin(), sin, atol=0, rtol=0)


def test_packing_segments_follow_windows_and_frames():
    cfg = VisionConfig(
        enabled=True, patch_size=2, spatial_merge_size=2, window_size=8, depth=2, fullatt_block_indexes=[1]
    )
    packing = compute_vision_packing(torch.tensor([[1, 4, 6], [2, 4, 4]]), cfg)
    s = 24 + 32
    assert sorted(packing.token_order.tolist()) == list(range(s))
    # image 0: windows of 2x2 and 2x1 merge units; image 1: one 2x2 window per frame.
    assert torch.bincount(packing.window_ids).tolist() == [16, 8, 16, 16]
    assert torch.bincount(packing.frame_ids).tolist() == [24, 16, 16]
    unit_order = packing.token_order.view(-1, 4)[:, 0] // 4
    assert torch.equal(unit_order[packing.unit_restore], torch.arange(s // 4))


def test_layout_and_head_checks():
    tp2 = ParallelLayout(tp_size=2, world_size=2)
    check_vision_layout(VisionConfig(hidden_size=32, num_heads=2, intermediate_size=38), tp2)
    with pytest.raises(LayoutError, match=r"vision.num_heads=3 is not divisible by tp_size=2") as err:
        check_vision_layout(VisionConfig(hidden_size=36, num_heads=3), tp2)
    assert "\n" not in str(err.value)
    with pytest.raises(LayoutError, match="intermediate_size=63"):
        check_vision_layout(VisionConfig(hidden_size=32, num_heads=2, intermediate_size=63), tp2)
    with pytest.raises(ConfigError, match="multiple of 4"):
        check_vision_layout(VisionConfig(hidden_size=12, num_heads=2), ParallelLayout())
