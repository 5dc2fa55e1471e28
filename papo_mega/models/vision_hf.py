"""Qwen2.5-VL vision weights: HF checkpoint tensors <-> `QwenVisionTower` parameters (full, TP1).

Pure, exact (bit-identical round trip) functions; no model is built. Layout differences:

* patch_embed: HF Conv3d weight [hidden, C, T, P, P] <-> Linear weight [hidden, C*T*P*P];
* attention qkv: HF rows are [q_all; k_all; v_all]; megatron's linear_qkv interleaves per query
  group, [q_h; k_h; v_h] for each head h (one group per head here); the bias likewise;
* MLP: linear_fc1 = [gate_proj; up_proj], linear_fc2 = down_proj;
* merger: ln_q -> merger.layernorm, mlp.0 -> merger.linear_fc1, mlp.2 -> merger.linear_fc2.

HF checkpoints name these `visual.*` (in-memory transformers-5 models: `model.visual.*`);
`vision_hf_to_mcore` accepts either prefix, or none.
"""

from __future__ import annotations

import torch

from papo_mega.config import VisionConfig

HF_PREFIX = "visual."
_PREFIXES = ("model.visual.", "visual.", "")

# Renamed one-to-one (per layer i, after "blocks.{i}." / "layers.{i}.").
_LAYER_RENAMES = {
    "norm1.weight": "input_layernorm.weight",
    "norm2.weight": "pre_mlp_layernorm.weight",
    "attn.proj.weight": "self_attention.linear_proj.weight",
    "attn.proj.bias": "self_attention.linear_proj.bias",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
    "mlp.down_proj.bias": "mlp.linear_fc2.bias",
}
_GLOBAL_RENAMES = {
    "merger.ln_q.weight": "merger.layernorm.weight",
    "merger.mlp.0.weight": "merger.linear_fc1.weight",
    "merger.mlp.0.bias": "merger.linear_fc1.bias",
    "merger.mlp.2.weight": "merger.linear_fc2.weight",
    "merger.mlp.2.bias": "merger.linear_fc2.bias",
}


def vision_param_names(vision_cfg: VisionConfig) -> list[str]:
    """The tower's parameter names (as `QwenVisionTower.named_parameters()` gives them)."""
    per_layer = [
        "input_layernorm.weight",
        "self_attention.linear_qkv.weight",
        "self_attention.linear_qkv.bias",
        "self_attention.linear_proj.weight",
        "self_attention.linear_proj.bias",
        "pre_mlp_layernorm.weight",
        "mlp.linear_fc1.weight",
        "mlp.linear_fc1.bias",
        "mlp.linear_fc2.weight",
        "mlp.linear_fc2.bias",
    ]
    layers = [f"layers.{i}.{n}" for i in range(vision_cfg.depth) for n in per_layer]
    return ["patch_embed.weight", *layers, *_GLOBAL_RENAMES.values()]


def qkv_hf_to_mcore(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[3*H*d, ...] rows [q_all; k_all; v_all] -> rows [q_0; k_0; v_0; q_1; ...] (weight or bias)."""
    rest = t.shape[1:]
    return t.reshape(3, num_heads, -1, *rest).transpose(0, 1).reshape(t.shape)


def qkv_mcore_to_hf(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of `qkv_hf_to_mcore`."""
    rest = t.shape[1:]
    return t.reshape(num_heads, 3, -1, *rest).transpose(0, 1).reshape(t.shape)


def _strip_prefix(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _PREFIXES:
        if f"{prefix}patch_embed.proj.weight" in hf:
            return {k[len(prefix) :]: v for k, v in hf.items() if k.startswith(prefix)}
    raise KeyError("no vision tower weights found: expected a key ending in 'patch_embed.proj.weight'")


def _layer_hf_to_mcore(hf: dict, i: int, heads: int) -> dict[str, torch.Tensor]:
    src, dst = f"blocks.{i}.", f"layers.{i}."
    out = {dst + new: hf[src + old] for old, new in _LAYER_RENAMES.items()}
    for kind in ("weight", "bias"):
        out[f"{dst}self_attention.linear_qkv.{kind}"] = qkv_hf_to_mcore(hf[f"{src}attn.qkv.{kind}"], heads)
        gate, up = hf[f"{src}mlp.gate_proj.{kind}"], hf[f"{src}mlp.up_proj.{kind}"]
        out[f"{dst}mlp.linear_fc1.{kind}"] = torch.cat([gate, up], dim=0)
    return out


def vision_hf_to_mcore(hf: dict[str, torch.Tensor], vision_cfg: VisionConfig) -> dict[str, torch.Tensor]:
    """HF vision tensors (`visual.*`, `model.visual.*` or unprefixed; others ignored) -> tower names."""
    hf = _strip_prefix(hf)
    conv = hf["patch_embed.proj.weight"]
    out = {"patch_embed.weight": conv.reshape(conv.shape[0], -1)}
    for i in range(vision_cfg.depth):
        out.update(_layer_hf_to_mcore(hf, i, vision_cfg.num_heads))
    out.update({new: hf[old] for old, new in _GLOBAL_RENAMES.items()})
    return out


def _layer_mcore_to_hf(ours: dict, i: int, heads: int) -> dict[str, torch.Tensor]:
    src, dst = f"layers.{i}.", f"blocks.{i}."
    out = {dst + old: ours[src + new] for old, new in _LAYER_RENAMES.items()}
    for kind in ("weight", "bias"):
        out[f"{dst}attn.qkv.{kind}"] = qkv_mcore_to_hf(ours[f"{src}self_attention.linear_qkv.{kind}"], heads)
        # Clones: halves that share one storage cannot be saved side by side with safetensors.
        gate, up = (t.clone() for t in ours[f"{src}mlp.linear_fc1.{kind}"].chunk(2, dim=0))
        out[f"{dst}mlp.gate_proj.{kind}"], out[f"{dst}mlp.up_proj.{kind}"] = gate, up
    return out


def vision_mcore_to_hf(
    ours: dict[str, torch.Tensor], vision_cfg: VisionConfig, prefix: str = HF_PREFIX
) -> dict[str, torch.Tensor]:
    """Tower tensors -> HF checkpoint names (`visual.*` by default; pass prefix='model.visual.' for
    a transformers-5 in-memory state dict)."""
    c = vision_cfg
    shape = (-1, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size)
    hf = {"patch_embed.proj.weight": ours["patch_embed.weight"].reshape(shape)}
    for i in range(c.depth):
        hf.update(_layer_mcore_to_hf(ours, i, c.num_heads))
    hf.update({old: ours[new] for old, new in _GLOBAL_RENAMES.items()})
    return {prefix + k: v for k, v in hf.items()}
