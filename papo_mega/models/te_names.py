"""Transformer Engine parameter names <-> megatron's local-spec names, and TE's `_extra_state` keys.

Under megatron-core's TE spec (gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec) a
decoder layer's two norms are fused into the next linear: `input_layernorm` is an IdentityOp and
its weight lives in `self_attention.linear_qkv` (TELayerNormColumnParallelLinear) as
`layer_norm_weight`; `pre_mlp_layernorm` likewise in `mlp.linear_fc1`. The local spec stores its
norms under the TE names in checkpoints already: get_gpt_layer_local_spec's
`sharded_state_dict_keys_map` maps 'input_layernorm.' -> 'self_attention.linear_qkv.layer_norm_'
and 'pre_mlp_layernorm.' -> 'mlp.linear_fc1.layer_norm_'. That map, read from megatron rather than
copied, is the whole difference in parameter names, and this module is the one place that applies
it. Everything name-keyed (init seeds, HF conversion, shard layouts, gradient comparisons) uses the
local-spec name, `to_local_name`, so a model built with either spec gives the same tensors.

TE modules also carry serialised fp8 metadata as torch extra state, `<module>._extra_state`, which
megatron checkpoints as a ShardedObject. A model may have entries its checkpoint lacks (TE's
final RMSNorm on a checkpoint written with the local spec): `is_extra_state` names them, so loading
can tolerate exactly those and nothing else.

`apply_te_naming` is the CPU emulation (TE does not run here): it turns a local-spec model into
one with TE's parameter names and extra state, for tests.
"""

from __future__ import annotations

import functools
import pickle
import re

import torch

# A language-model decoder layer's parameter name: '<...>decoder.layers.<i>.<rest>'. The vision
# tower's layers ('vision.layers.<i>.') always use the local spec and are left alone.
_DECODER_LAYER = re.compile(r"^((?:.*\.)?decoder\.layers\.\d+\.)(.*)$")
# torch's extra-state key (nn.Module._EXTRA_STATE_KEY_SUFFIX, also megatron's extra_state_suffix);
# TE's grouped linears add an index in distributed checkpoints ('_extra_state1', ...).
_EXTRA_STATE = re.compile(r"(?:^|\.)_extra_state\d*$")


@functools.cache
def local_to_te_prefixes() -> dict[str, str]:
    """{'input_layernorm.': 'self_attention.linear_qkv.layer_norm_', ...}: megatron's own map."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return dict(get_gpt_layer_local_spec(normalization="RMSNorm").submodules.sharded_state_dict_keys_map)


def _rename(name: str, mapping: dict[str, str]) -> str:
    match = _DECODER_LAYER.match(name)
    if match is None:
        return name
    layer, rest = match.groups()
    for old, new in mapping.items():
        if rest.startswith(old):
            return layer + new + rest[len(old):]
    return name


def to_local_name(name: str) -> str:
    """A parameter name under either spec -> its local-spec name (identity for local names)."""
    return _rename(name, {te: local for local, te in local_to_te_prefixes().items()})


def to_te_name(name: str) -> str:
    """A parameter name under either spec -> its TE-spec name (identity for TE names)."""
    return _rename(name, local_to_te_prefixes())


def is_extra_state(key: str) -> bool:
    """A torch / megatron extra-state entry (TE's fp8 metadata), not a weight."""
    return bool(_EXTRA_STATE.search(key))


# -- CPU emulation ----------------------------------------------------------------------------


class _EmulatedTEExtraState:
    """Extra state as TE modules hold it: a uint8 tensor of pickled fp8 metadata, empty while there
    is none (transformer_engine/pytorch/ops/op.py BasicOperation.get_extra_state returns
    torch.empty(0, dtype=torch.uint8) without quantizer state, else torch.frombuffer(pickle bytes));
    set_extra_state ignores None and empty tensors."""

    te_extra_state: torch.Tensor

    def get_extra_state(self) -> torch.Tensor:
        return self.te_extra_state

    def set_extra_state(self, state) -> None:
        if isinstance(state, torch.Tensor) and state.numel() > 0:
            self.te_extra_state = state.detach().clone()


class _EmulatedLayerNormLinear(_EmulatedTEExtraState):
    """TE's LayerNormLinear: RMSNorm with its own `layer_norm_weight`, then the linear."""

    layer_norm_weight: torch.nn.Parameter
    layer_norm_eps: float

    def forward(self, hidden, *args, **kwargs):
        normed = torch.nn.functional.rms_norm(hidden, self.layer_norm_weight.shape, self.layer_norm_weight,
                                              self.layer_norm_eps)
        return super().forward(normed, *args, **kwargs)


@functools.cache
def _emulated_class(base: type, mixin: type) -> type:
    return type(f"EmulatedTE{base.__name__}", (mixin, base), {})


def _retype(module: torch.nn.Module, mixin: type, payload: dict) -> None:
    module.__class__ = _emulated_class(type(module), mixin)
    module.te_extra_state = torch.frombuffer(bytearray(pickle.dumps(payload)), dtype=torch.uint8)


def _fuse_norm(layer, norm_attr: str, linear: torch.nn.Module, payload: dict) -> None:
    from megatron.core.transformer.identity_op import IdentityOp

    norm = getattr(layer, norm_attr)
    _retype(linear, _EmulatedLayerNormLinear, payload)
    linear.register_parameter("layer_norm_weight", norm.weight)
    linear.layer_norm_eps = norm.eps
    setattr(layer, norm_attr, IdentityOp())


def apply_te_naming(chunk) -> None:
    """Turn a local-spec model (before DDP wrapping) into TE's names and extra state, in place.

    Per decoder layer, as the TE spec builds it: input_layernorm's weight moves into linear_qkv as
    `layer_norm_weight` (applied before the GEMM) and the norm becomes an IdentityOp; the same for
    pre_mlp_layernorm into linear_fc1; linear_qkv/linear_proj/linear_fc1/linear_fc2 and the final
    norm (TENorm, a TE op with extra state) carry a non-empty fp8-metadata-like extra state, distinct
    per module so a test can see it round-trip. The computed function is unchanged.
    """
    model = getattr(chunk, "module", chunk)
    for path, decoder in model.named_modules():
        if path.split(".")[-1] != "decoder" or not hasattr(decoder, "layers"):
            continue
        for layer in decoder.layers:
            tag = {"layer": layer.layer_number}
            attn, mlp = layer.self_attention, layer.mlp
            _fuse_norm(layer, "input_layernorm", attn.linear_qkv, {**tag, "module": "linear_qkv"})
            _fuse_norm(layer, "pre_mlp_layernorm", mlp.linear_fc1, {**tag, "module": "linear_fc1"})
            _retype(attn.linear_proj, _EmulatedTEExtraState, {**tag, "module": "linear_proj"})
            _retype(mlp.linear_fc2, _EmulatedTEExtraState, {**tag, "module": "linear_fc2"})
        final = getattr(decoder, "final_layernorm", None)
        if final is not None:
            _retype(final, _EmulatedTEExtraState, {"module": "final_layernorm"})
