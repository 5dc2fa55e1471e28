"""Layout-invariant initialisation: the same weights at every TP/PP/VPP layout.

megatron-core draws initial weights from one RNG stream in construction order, so a pipeline
stage that builds layers 2-3 first draws different numbers than a single process does. Here
every full parameter is drawn from its own generator seeded by (seed, single-process name) and
each rank keeps its shard: changing the layout never changes the model. Tests rely on it, and
users get runs that are comparable across layouts. Names are normalised to the local spec's
(models/te_names.py), so Transformer Engine's fused norms (`linear_qkv.layer_norm_weight`) start at
1 and every tensor is the one the local spec draws.
"""

from __future__ import annotations

import math
import zlib

import torch

from papo_mega.distributed.runtime import ParallelGroups
from papo_mega.distributed.sharding import full_shape, named_local_params, take_local_shard
from papo_mega.models.te_names import to_local_name


def init_value(name: str, shape: tuple[int, ...], seed: int, std: float, num_layers: int) -> torch.Tensor:
    """The full initial tensor for one parameter (megatron's conventions, name-seeded; either spec's name)."""
    name = to_local_name(name)
    if name.endswith(("layernorm.weight", "norm.weight")):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    # Residual-branch outputs get megatron's scaled init: std / sqrt(2 * layers).
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        std = std / math.sqrt(2.0 * num_layers)
    return torch.empty(shape).normal_(0.0, std, generator=generator)


@torch.no_grad()
def apply_layout_invariant_init(chunks, groups: ParallelGroups, seed: int, std: float, num_layers: int) -> None:
    """Overwrite every parameter with its shard of the name-seeded full tensor."""
    for chunk in chunks:
        for name, param in named_local_params(chunk):
            full = init_value(name, full_shape(param, groups), seed, std, num_layers)
            param.copy_(take_local_shard(full, name, param, groups).to(param.dtype))
