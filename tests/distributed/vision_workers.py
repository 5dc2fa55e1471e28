"""Worker functions for the vision-tower tests (module-level so spawn can pickle them).

The single-process worker builds a tiny random transformers Qwen2.5-VL vision model from a fixed
seed (nothing is downloaded: it is built from a config), maps its weights into `QwenVisionTower`
and runs both on the same random images; it hands the mapped weights back, and the sharded
workers load those (they never import transformers, which keeps them quick).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from papo_mega.config import VisionConfig
from papo_mega.distributed import init_distributed
from papo_mega.distributed.sharding import take_local_shard
from papo_mega.errors import LayoutError
from papo_mega.models.vision import QwenVisionTower, load_full_state
from papo_mega.models.vision_hf import vision_hf_to_mcore, vision_param_names

# Two tiny towers with different widths, head counts, patch shapes and window patterns.
# a: 2x2-unit windows over 2x3 and 4x2 unit grids (partial windows), full attention in block 1.
# b: 3x3-unit windows over a 5x3 grid and a two-frame video, head_dim 12, odd-ish MLP width 38.
CASES = {
    "a": {
        "vision": dict(
            depth=3,
            hidden_size=32,
            intermediate_size=48,
            num_heads=2,
            in_channels=3,
            patch_size=2,
            temporal_patch_size=2,
            spatial_merge_size=2,
            window_size=8,
            fullatt_block_indexes=[1],
        ),
        "out_hidden_size": 24,
        "grids": [[1, 4, 6], [1, 8, 4]],
        "attn": "sdpa",
    },
    "b": {
        "vision": dict(
            depth=3,
            hidden_size=48,
            intermediate_size=38,
            num_heads=4,
            in_channels=2,
            patch_size=3,
            temporal_patch_size=1,
            spatial_merge_size=2,
            window_size=18,
            fullatt_block_indexes=[0, 2],
        ),
        "out_hidden_size": 20,
        "grids": [[1, 10, 6], [2, 4, 8]],
        "attn": "eager",
    },
}
SEED = 20250


def build_hf_vision(case: dict):
    """A transformers Qwen2.5-VL vision tower with random weights (norms and biases too), fp32."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    config = Qwen2_5_VLVisionConfig(**case["vision"], out_hidden_size=case["out_hidden_size"])
    config._attn_implementation = case["attn"]
    model = Qwen2_5_VisionTransformerPretrainedModel(config).float().eval()
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=generator)
            # Norm weights near one, everything else large enough that attention is not uniform.
            param.copy_(
                1.0 + 0.1 * noise
                if name.endswith(("norm1.weight", "norm2.weight", "ln_q.weight"))
                else 0.1 * noise
            )
    return model


def make_images(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Random pixel patches [num_patches, C*T*P*P] and grid_thw [num_images, 3]."""
    v = case["vision"]
    grid = torch.tensor(case["grids"], dtype=torch.long)
    features = v["in_channels"] * v["temporal_patch_size"] * v["patch_size"] ** 2
    generator = torch.Generator().manual_seed(SEED + 1)
    return torch.randn(int(grid.prod(dim=1).sum()), features, generator=generator), grid


def _probe(shape) -> torch.Tensor:
    """Fixed random weights for a scalar loss whose gradient reaches every parameter."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(SEED + 2))


def _hf_reference(hf, pixels, grid) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """HF output and its parameter gradients (under HF names, with the 'visual.' prefix)."""
    out = hf(pixels, grid_thw=grid).pooler_output
    (out * _probe(out.shape)).sum().backward()
    grads = {f"visual.{n}": p.grad.detach().clone() for n, p in hf.named_parameters()}
    return out.detach(), grads


def _separate_calls(tower, pixels, grid) -> torch.Tensor:
    """One tower call per image, outputs concatenated."""
    sizes = grid.prod(dim=1).tolist()
    with torch.no_grad():
        return torch.cat([tower(p, g[None]) for p, g in zip(pixels.split(sizes), grid)])


def _run_tower(groups, case: dict, full_state: dict) -> dict:
    """Build the tower at this layout, load full_state, run packed forward + backward and per-image calls."""
    vision_cfg = VisionConfig(enabled=True, **case["vision"])
    pixels, grid = make_images(case)
    # A seed unlike anything HF drew: loading must overwrite every parameter.
    tower = QwenVisionTower(vision_cfg, case["out_hidden_size"], groups, seed=99)
    names = [n for n, _ in tower.named_parameters()]
    load_full_state(tower, full_state, groups)
    out = tower(pixels, grid)
    (out * _probe(out.shape)).sum().backward()
    params = dict(tower.named_parameters())
    return {
        "names": names,
        "expected_names": vision_param_names(vision_cfg),
        "params": params,
        "out": out.detach(),
        "grads": {n: p.grad.detach().clone() for n, p in params.items()},
        "separate": _separate_calls(tower, pixels, grid),
    }


def tp1_against_hf(case_name: str):
    """Single process: HF's output and gradients (mapped to our names) next to ours, and the
    full weights (our names) for the sharded runs."""
    groups = init_distributed({}, seed=1234)
    case = CASES[case_name]
    vision_cfg = VisionConfig(enabled=True, **case["vision"])
    hf = build_hf_vision(case)
    hf_out, hf_grads = _hf_reference(hf, *make_images(case))
    full_state = vision_hf_to_mcore({f"visual.{k}": v for k, v in hf.state_dict().items()}, vision_cfg)
    result = _run_tower(groups, case, full_state)
    del result["params"]
    return {
        **result,
        "hf_out": hf_out,
        "hf_grads_mapped": vision_hf_to_mcore(hf_grads, vision_cfg),
        "full_state": full_state,
    }


def sharded_against_reference(case_name: str, layout: dict, full_state: dict, reference_grads: dict):
    """At a tensor-parallel layout: our output, per-image outputs, and the worst difference of any
    rank's gradient shards from the matching slices of the full TP1 gradients."""
    groups = init_distributed(layout, seed=1234)
    result = _run_tower(groups, CASES[case_name], full_state)
    params, grads = result.pop("params"), result.pop("grads")
    # Scaled like the TP1 check: max|diff| / max(1, max|reference|).
    worst = max(
        (grads[n] - take_local_shard(reference_grads[n], n, params[n], groups)).abs().max().item()
        / max(1.0, reference_grads[n].abs().max().item())
        for n in grads
    )
    # Every rank's shards count, not only rank 0's.
    worst = torch.tensor(worst)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    result["grad_shard_diff"] = worst.item()
    result["layout_error"] = _layout_error_message(groups)
    return result if dist.get_rank() == 0 else None


def _layout_error_message(groups) -> str | None:
    """The construction-time check: 3 heads cannot be split over tp_size=2."""
    if groups.layout.tp_size == 1:
        return None
    try:
        QwenVisionTower(VisionConfig(enabled=True, hidden_size=36, num_heads=3), 16, groups)
    except LayoutError as err:
        return str(err)
    return "no error"


def checkpoint_reshard(directory: str):
    """Case 'a' saved at TP2 (seed 5), then loaded at TP1 x DP2 into a tower built from seed 77, in
    the same two processes (megatron's groups are rebuilt in between). Returns both outputs."""
    from papo_mega.model_dir import load_model, save_model

    case = CASES["a"]
    vision_cfg = VisionConfig(enabled=True, **case["vision"])
    outputs = []
    for layout, seed, step in (({"tp_size": 2}, 5, save_model), ({}, 77, load_model)):
        groups = init_distributed(layout, seed=1234)
        tower = QwenVisionTower(vision_cfg, case["out_hidden_size"], groups, seed=seed)
        step([tower], directory)
        with torch.no_grad():
            outputs.append(tower(*make_images(case)))
    return outputs if dist.get_rank() == 0 else None
