"""The Qwen2.5-VL vision tower on megatron-core: tensor-parallel ViT with 2D rotary and window attention.

Same function as transformers' `Qwen2_5_VisionTransformerPretrainedModel` (its `pooler_output`):

* patch embedding: HF's Conv3d has kernel == stride and no bias, so it is one Linear over the
  flattened [C, T, P, P] patch (replicated on every tensor-parallel rank);
* tokens are reordered window by window (HF's `get_window_index`), the 2D rotary angles with them;
* megatron `TransformerLayer`s (ColumnParallel qkv / fc1, RowParallel proj / fc2, RMSNorm, SwiGLU
  with biases) whose core attention is `PackedSdpaAttention`: each layer attends within segments
  (given as segment lengths), per frame for the blocks in `fullatt_block_indexes`, per window
  for the others, so one call handles any number of images of any sizes;
* the patch merger (RMSNorm, then 2x2 neighbours concatenated, Linear-GELU-Linear, tensor-parallel
  as ColumnParallel -> RowParallel) and the inverse window permutation.

The whole tower lives on the first pipeline stage (its config has pipeline size 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from papo_mega.config import VisionConfig
from papo_mega.distributed.layout import ParallelLayout
from papo_mega.distributed.runtime import ParallelGroups
from papo_mega.distributed.sharding import full_shape, take_local_shard
from papo_mega.errors import ConfigError, LayoutError
from papo_mega.models.gpt import PARAM_DTYPES, shared_transformer_settings
from papo_mega.models.init import init_value
from papo_mega.models.packed_attention import PackedSdpaAttention, segment_lengths

ROTARY_THETA = 10000.0
"""Base of the vision rotary frequencies (fixed in Qwen2.5-VL's vision config)."""


def check_vision_layout(vision_cfg: VisionConfig, layout: ParallelLayout) -> None:
    """Raise `LayoutError` / `ConfigError` when the tower cannot be built or split this way."""
    tp = layout.tp_size
    if vision_cfg.num_heads % tp:
        raise LayoutError(
            f"vision.num_heads={vision_cfg.num_heads} is not divisible by tp_size={tp}; "
            f"choose a tp_size that divides {vision_cfg.num_heads}"
        )
    if vision_cfg.intermediate_size % tp:
        raise LayoutError(
            f"vision.intermediate_size={vision_cfg.intermediate_size} is not divisible by tp_size={tp}; "
            f"choose a tp_size that divides it"
        )
    unit = vision_cfg.patch_size * vision_cfg.spatial_merge_size
    if vision_cfg.window_size < unit:
        raise ConfigError(f"vision.window_size={vision_cfg.window_size} is smaller than patch*merge = {unit}")
    head_dim = vision_cfg.hidden_size // vision_cfg.num_heads
    if head_dim % 4:
        # Half of each head rotates by row, half by column, each half in (cos, sin) pairs.
        raise ConfigError(
            f"vision head size hidden_size/num_heads = {head_dim} is not a multiple of 4, which the 2D "
            f"rotary embedding needs; change vision.hidden_size or vision.num_heads"
        )


def build_vision_transformer_config(
    vision_cfg: VisionConfig, groups: ParallelGroups, precision: str = "fp32"
):
    """megatron-core's TransformerConfig for the vision tower at this tensor-parallel size.

    fp8 runs the tower in bf16 (its packed attention is not a Transformer Engine module).
    """
    from megatron.core.transformer import TransformerConfig

    if precision not in PARAM_DTYPES:
        raise ConfigError(f"vision tower precision={precision!r} is not one of {', '.join(PARAM_DTYPES)}")
    return TransformerConfig(
        **shared_transformer_settings(precision, groups.device),
        num_layers=vision_cfg.depth,
        hidden_size=vision_cfg.hidden_size,
        ffn_hidden_size=vision_cfg.intermediate_size,
        num_attention_heads=vision_cfg.num_heads,
        num_query_groups=vision_cfg.num_heads,
        kv_channels=vision_cfg.hidden_size // vision_cfg.num_heads,
        tensor_model_parallel_size=groups.layout.tp_size,
        # The whole tower runs on the first pipeline stage, in front of the language model.
        pipeline_model_parallel_size=1,
        context_parallel_size=1,
        layernorm_epsilon=vision_cfg.norm_eps,
        add_bias_linear=True,
    )


def build_vision_layer_spec():
    """Local (non-TE) megatron layer spec: bidirectional packed attention, biased SwiGLU MLP."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    attention = ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.arbitrary},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            core_attention=PackedSdpaAttention,
            linear_proj=RowParallelLinear,
            q_layernorm=IdentityOp,
            k_layernorm=IdentityOp,
        ),
    )
    mlp = ModuleSpec(
        module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


# --- Token order, positions and attention segments (pure functions of grid_thw) -----------------


def compute_patch_positions(grid_thw: list[list[int]], merge: int) -> torch.Tensor:
    """[num_patches, 2] (row, column) of every patch, in the processor's merge-block-major order.

    Patches arrive grouped by merge x merge block (HF's `get_vision_position_ids`); frames of a
    video repeat the same positions.
    """
    out = []
    for t, h, w in grid_thw:
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        blocks = (h // merge, merge, w // merge, merge)
        rows = rows.reshape(blocks).transpose(1, 2).flatten()
        cols = cols.reshape(blocks).transpose(1, 2).flatten()
        out.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))
    return torch.cat(out)


def compute_frame_ids(grid_thw: list[list[int]]) -> torch.Tensor:
    """[num_patches] index of the frame (image, or frame of a video) each patch belongs to."""
    sizes = torch.tensor([h * w for t, h, w in grid_thw for _ in range(t)], dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(sizes)), sizes)


def compute_window_index(
    grid_thw: list[list[int]], merge: int, window_units: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's window reordering of merge units, and the window sizes.

    Each frame's grid of merge units is cut into window_units x window_units windows (the last
    row/column of windows may be smaller); windows are visited row-major, units inside a window
    row-major. Returns (window_index [num_units]: original unit index at each new position,
    window_units_count [num_windows]: merge units per window, in the new order).
    """
    order, lengths, offset = [], [], 0
    for t, h, w in grid_thw:
        gh, gw = h // merge, w // merge
        pad_h, pad_w = (-gh) % window_units, (-gw) % window_units
        index = torch.arange(t * gh * gw).reshape(t, gh, gw)
        index = F.pad(index, (0, pad_w, 0, pad_h), value=-1)
        nh, nw = (gh + pad_h) // window_units, (gw + pad_w) // window_units
        index = index.reshape(t, nh, window_units, nw, window_units).permute(0, 1, 3, 2, 4)
        index = index.reshape(t * nh * nw, window_units * window_units)
        valid = index >= 0
        order.append(index[valid] + offset)
        lengths.append(valid.sum(dim=1))
        offset += t * gh * gw
    return torch.cat(order), torch.cat(lengths)


def compute_rotary_freqs(positions: torch.Tensor, head_dim: int, theta: float = ROTARY_THETA) -> torch.Tensor:
    """[s, 2] (row, column) -> [s, head_dim] rotary angles, laid out as megatron's non-interleaved rope.

    A quarter of the head's frequencies rotate by row, a quarter by column ([row | col]); the
    angles are repeated for the second half of the head, matching rotate_half (HF's vision rope).
    """
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float, device=positions.device) / half))
    angles = positions[..., None].float() * inv_freq  # [s, 2, head_dim / 4]
    per_axis = torch.cat([angles[:, 0], angles[:, 1]], dim=-1)
    return torch.cat([per_axis, per_axis], dim=-1)


@dataclass
class VisionPacking:
    """Everything the tower's forward needs about one batch of images, in window order.

    token_order: [s] original patch index at each packed position; unit_restore: [s / merge^2]
    packed merge-unit index of each original unit (the reverse permutation); positions: [s, 2];
    frame_ids / window_ids: [s] attention segment of each packed token.
    """

    token_order: torch.Tensor
    unit_restore: torch.Tensor
    positions: torch.Tensor
    frame_ids: torch.Tensor
    window_ids: torch.Tensor

    def to(self, device) -> VisionPacking:
        return VisionPacking(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def compute_vision_packing(grid_thw: torch.Tensor, vision_cfg: VisionConfig) -> VisionPacking:
    """Window order, rotary positions and attention segments for grid_thw [num_images, 3] (on CPU)."""
    grid = [[int(v) for v in row] for row in grid_thw.tolist()]
    merge = vision_cfg.spatial_merge_size
    if any(h % merge or w % merge for _, h, w in grid):
        raise ValueError(
            f"image grids {grid} must have heights and widths divisible by spatial_merge_size={merge}"
        )
    unit = merge * merge
    window_units = vision_cfg.window_size // merge // vision_cfg.patch_size
    window_index, window_sizes = compute_window_index(grid, merge, window_units)
    token_order = (window_index[:, None] * unit + torch.arange(unit)).flatten()
    return VisionPacking(
        token_order=token_order,
        unit_restore=torch.argsort(window_index),
        positions=compute_patch_positions(grid, merge)[token_order],
        frame_ids=compute_frame_ids(grid)[token_order],
        window_ids=torch.repeat_interleave(torch.arange(len(window_sizes)), window_sizes * unit),
    )


# --- Modules -------------------------------------------------------------------------------------


class VisionMerger(MegatronModule):
    """RMSNorm, then merge x merge neighbouring patches concatenated, Linear-GELU-Linear.

    Tensor-parallel: linear_fc1 is ColumnParallel (output split), linear_fc2 RowParallel (input
    split, output all-reduced), so the output is complete on every rank.
    """

    def __init__(self, config, vision_cfg: VisionConfig, out_hidden_size: int, groups: ParallelGroups):
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        super().__init__(config=config)
        self.tp_group = groups.tp
        self.merged_size = vision_cfg.hidden_size * vision_cfg.spatial_merge_size**2
        # Named so that the layout-invariant init recognises it as a norm (ones).
        self.layernorm = torch.nn.RMSNorm(
            vision_cfg.hidden_size, eps=vision_cfg.norm_eps, dtype=config.params_dtype
        )
        self.linear_fc1 = ColumnParallelLinear(
            self.merged_size,
            self.merged_size,
            config=config,
            init_method=config.init_method,
            bias=True,
            gather_output=False,
            tp_group=groups.tp,
        )
        self.linear_fc2 = RowParallelLinear(
            self.merged_size,
            out_hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=True,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=groups.tp,
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[s, hidden] in packed order -> [s / merge^2, out_hidden_size]."""
        merged = self.layernorm(hidden).reshape(-1, 1, self.merged_size)
        inner, _ = self.linear_fc1(merged)
        out, _ = self.linear_fc2(F.gelu(inner))
        return out.squeeze(1)


class QwenVisionTower(MegatronModule):
    """Qwen2.5-VL's vision encoder: pixel patches of several images -> merged embeddings for the LM.

    Parameters (single-process names): patch_embed.weight, layers.{i}.* (megatron TransformerLayer),
    merger.layernorm.weight, merger.linear_fc1.*, merger.linear_fc2.*. Weights are initialised
    layout-invariantly from (seed, name); load real ones with `load_full_state`.
    """

    def __init__(
        self,
        vision_cfg: VisionConfig,
        out_hidden_size: int,
        groups: ParallelGroups,
        precision: str = "fp32",
        *,
        seed: int = 1234,
        init_std: float = 0.02,
    ):
        from megatron.core.transformer.spec_utils import build_module

        check_vision_layout(vision_cfg, groups.layout)
        config = build_vision_transformer_config(vision_cfg, groups, precision)
        super().__init__(config=config)
        self.vision_cfg = vision_cfg
        # Read by megatron's checkpoint helpers: replicated tensors get one main replica per TP group.
        self.tp_group = groups.tp
        self.head_dim = vision_cfg.hidden_size // vision_cfg.num_heads
        patch_features = vision_cfg.in_channels * vision_cfg.temporal_patch_size * vision_cfg.patch_size**2
        self.patch_embed = torch.nn.Linear(
            patch_features, vision_cfg.hidden_size, bias=False, dtype=config.params_dtype
        )
        spec = build_vision_layer_spec()
        pg_collection = groups.pg_collection()
        self.layers = torch.nn.ModuleList(
            build_module(spec, config=config, layer_number=i + 1, pg_collection=pg_collection)
            for i in range(vision_cfg.depth)
        )
        self.merger = VisionMerger(config, vision_cfg, out_hidden_size, groups)
        # torch's RMSNorm ignores params_dtype; one cast keeps every parameter in the tower's dtype.
        self.to(device=groups.device, dtype=config.params_dtype)
        init_vision_tower(self, groups, seed, init_std)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values [num_patches, C*T*P*P], grid_thw [num_images, 3] -> [num_patches / merge^2, out].

        Output rows follow the input images and patches (HF's visual() order).
        """
        host_packing = compute_vision_packing(grid_thw.cpu(), self.vision_cfg)
        # Segment lengths, not s x s masks: each frame / window attends within itself only. They stay
        # on the host: the packed attention reads them as Python ints in every layer, which on a
        # device tensor would wait for the GPU twice per layer.
        frames, windows = segment_lengths(host_packing.frame_ids), segment_lengths(host_packing.window_ids)
        packing = host_packing.to(pixel_values.device)
        hidden = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        hidden = hidden[packing.token_order].unsqueeze(1)  # [s, b=1, hidden]
        freqs = compute_rotary_freqs(packing.positions, self.head_dim)[:, None, None, :]
        for i, layer in enumerate(self.layers):
            mask = frames if i in self.vision_cfg.fullatt_block_indexes else windows
            hidden, _ = layer(hidden, attention_mask=mask, rotary_pos_emb=freqs)
        merged = self.merger(hidden.squeeze(1))
        return merged[packing.unit_restore]

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """dist_checkpointing view: each layer under `{prefix}layers.{i}.`, tensor-parallel aware.

        The default recursion would reach the layers through a plain ModuleList and save their
        shards as if they were replicated; asking each megatron layer directly keeps the
        tensor-parallel sharding (and SwiGLU's fc1 split), so checkpoints reshard across TP sizes.
        """
        from megatron.core.transformer.utils import sharded_state_dict_default

        out = {}
        for i, layer in enumerate(self.layers):
            out.update(layer.sharded_state_dict(f"{prefix}layers.{i}.", sharded_offsets, metadata))
        for name, module in self.named_children():
            if module is not self.layers:
                out.update(
                    sharded_state_dict_default(
                        module, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=self.tp_group
                    )
                )
        return out


# --- Weights -------------------------------------------------------------------------------------


@torch.no_grad()
def init_vision_tower(tower: QwenVisionTower, groups: ParallelGroups, seed: int, std: float) -> None:
    """Overwrite every parameter with its shard of the name-seeded full tensor (same at every TP size)."""
    for name, param in tower.named_parameters():
        full = init_value(name, full_shape(param, groups), seed, std, tower.vision_cfg.depth)
        param.copy_(take_local_shard(full, name, param, groups).to(param.dtype))


@torch.no_grad()
def load_full_state(tower: QwenVisionTower, full: dict[str, torch.Tensor], groups: ParallelGroups) -> None:
    """Copy full (single-process) tensors, keyed by the tower's parameter names, into this rank's shards."""
    names = dict(tower.named_parameters())
    missing, unexpected = sorted(set(names) - set(full)), sorted(set(full) - set(names))
    if missing or unexpected:
        raise KeyError(
            f"vision weights do not match the tower: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, param in names.items():
        shard = take_local_shard(full[name], name, param, groups)
        if shard.shape != param.shape:
            raise ValueError(
                f"{name}: full tensor {tuple(full[name].shape)} gives shard {tuple(shard.shape)}, "
                f"parameter is {tuple(param.shape)}"
            )
        param.copy_(shard.to(device=param.device, dtype=param.dtype))
