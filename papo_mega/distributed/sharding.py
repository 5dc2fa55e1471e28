"""How a megatron-core parameter's local shard relates to the single-process tensor.

Both directions live here: `named_local_params` (pipeline-local names -> global local-spec names),
`gather_full_tensors` (shards -> full tensors, for tests, sanity checks and export) and
`take_local_shard` (full tensor -> this rank's shard, for layout-invariant initialisation and
loading). Tensor-parallel shards split along `param.partition_dim`; SwiGLU's fc1 holds
[gate_r; up_r] on rank r, so its halves are split and re-joined separately.

Names are the local spec's under either layer spec (papo_mega/models/te_names.py): Transformer
Engine's fused norms (`linear_qkv.layer_norm_weight`) are reported as `input_layernorm.weight`, so
init seeds, HF conversion and gathered tensors do not depend on the spec. Which tensors are split
is read from megatron's parameter attributes (`tensor_model_parallel`, `partition_dim`), which TE's
layers set the same way (weights and column biases split, fused norm weights replicated).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
import torch.distributed as dist

from papo_mega.distributed.runtime import ParallelGroups
from papo_mega.models.te_names import to_local_name

_LAYER = re.compile(r"^(?:.*\.)?decoder\.layers\.\d+\.")
_GATED = ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias")


def _layer_renames(module) -> dict[str, str]:
    """'<prefix>decoder.layers.<local>.' -> '<prefix>decoder.layers.<global>.' for a chunk's decoders."""
    renames = {}
    for path, sub in module.named_modules():
        if path.split(".")[-1] == "decoder" and hasattr(sub, "layers"):
            for local, layer in enumerate(sub.layers):
                renames[f"{path}.layers.{local}."] = f"{path}.layers.{layer.layer_number - 1}."
    return renames


def named_local_params(chunk) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(single-process local-spec name, local parameter) for a chunk (DDP-wrapped or not).

    Pipeline-local layer indexes become global ones and TE's names become the local spec's. The
    tied output weight on the last stage is reported under the embedding's name: it mirrors the
    first stage's embedding.
    """
    module = getattr(chunk, "module", chunk)
    renames = _layer_renames(module)
    for name, param in module.named_parameters():
        if name.endswith("output_layer.weight") and getattr(param, "shared_embedding", False):
            name = name[: -len("output_layer.weight")] + "embedding.word_embeddings.weight"
        match = _LAYER.search(name)
        if match:
            prefix = name[: match.end()]
            name = renames.get(prefix, prefix) + name[match.end():]
        yield to_local_name(name), param


def _is_split(param, groups: ParallelGroups) -> bool:
    return groups.layout.tp_size > 1 and getattr(param, "tensor_model_parallel", False)


def full_shape(param, groups: ParallelGroups) -> tuple[int, ...]:
    """Shape of the single-process tensor this parameter is a shard of."""
    shape = list(param.shape)
    if _is_split(param, groups):
        shape[param.partition_dim] *= groups.layout.tp_size
    return tuple(shape)


def take_local_shard(full: torch.Tensor, name: str, param, groups: ParallelGroups) -> torch.Tensor:
    """This tensor-parallel rank's slice of a full tensor, laid out as megatron stores it."""
    if not _is_split(param, groups):
        return full
    dim, tp, rank = param.partition_dim, groups.layout.tp_size, groups.tp_rank
    if name.endswith(_GATED):
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp, dim=dim)[rank], up.chunk(tp, dim=dim)[rank]], dim=dim)
    return full.chunk(tp, dim=dim)[rank]


def _join_tp(tensor: torch.Tensor, name: str, param, groups: ParallelGroups) -> torch.Tensor:
    if not _is_split(param, groups):
        return tensor.detach().clone()
    dim = param.partition_dim
    parts = [torch.empty_like(tensor) for _ in range(groups.layout.tp_size)]
    dist.all_gather(parts, tensor.detach().contiguous(), group=groups.tp)
    if name.endswith(_GATED):
        halves = [p.chunk(2, dim=dim) for p in parts]
        return torch.cat([torch.cat([h[0] for h in halves], dim), torch.cat([h[1] for h in halves], dim)], dim)
    return torch.cat(parts, dim)


def gather_full_tensors(chunks, groups: ParallelGroups, kind: str = "param") -> dict[str, torch.Tensor]:
    """Full named tensors of the whole model, on every rank (small models: it all-gathers objects).

    kind: 'param' (the weights) or 'grad' (megatron DDP's `main_grad`; complete only without the
    distributed optimizer, whose grads are reduce-scattered).
    """
    local: dict[str, torch.Tensor] = {}
    for chunk in chunks:
        for name, param in named_local_params(chunk):
            value = param.main_grad if kind == "grad" else param
            if value is None:
                raise ValueError(f"{name} has no main_grad; wrap the model in megatron DDP first")
            full = _join_tp(value.float(), name, param, groups)
            local.setdefault(name, full)  # a tied mirror arrives second and is identical
    # One tensor-parallel / data-parallel copy per stage is enough to travel.
    keep = groups.tp_rank == 0 and groups.dp_rank == 0
    shards: list = [None] * dist.get_world_size()
    dist.all_gather_object(shards, local if keep else {})
    merged: dict[str, torch.Tensor] = {}
    for shard in shards:
        for name, tensor in shard.items():
            merged.setdefault(name, tensor)
    return merged
