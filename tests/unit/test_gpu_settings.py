"""What the language model's TransformerConfig and layer spec become on a CUDA machine with
Transformer Engine, checked here by pretending to be one (no config field touches the device).

megatron-core facts relied on: tensor_parallel/layers.py builds weights on the CPU only under
use_cpu_initialization, and _initialize_affine_weight_gpu marks them tensor-parallel
(set_tensor_model_parallel_attributes) as the CPU draw does; ColumnParallelLinear raises for
gradient_accumulation_fusion unless fused_weight_gradient_mlp_cuda imports
(_grad_accum_fusion_available).
"""

from types import SimpleNamespace

import pytest
import torch

from papo_mega.config import ModelConfig
from papo_mega.distributed.layout import ParallelLayout
from papo_mega.models import gpt

FUSIONS = ("bias_activation_fusion", "bias_dropout_fusion", "gradient_accumulation_fusion")


def _config(device: str):
    groups = SimpleNamespace(layout=ParallelLayout(), device=torch.device(device))
    return gpt.build_transformer_config(ModelConfig(precision="bf16"), groups)


@pytest.mark.parametrize("apex_wgrad", [True, False])
def test_cuda_with_te_turns_fusions_on_and_initialises_on_the_device(monkeypatch, apex_wgrad):
    from megatron.core.tensor_parallel import layers

    monkeypatch.setattr(gpt, "transformer_engine_usable", lambda: True)
    monkeypatch.setattr(layers, "_grad_accum_fusion_available", apex_wgrad)
    config = _config("cuda")
    assert (config.bias_activation_fusion, config.bias_dropout_fusion) == (True, True)
    assert config.gradient_accumulation_fusion is apex_wgrad  # megatron's own linear needs the extension
    assert config.use_cpu_initialization is False and config.perform_initialization is True


def test_cpu_keeps_fusions_off_and_initialises_on_the_cpu(monkeypatch):
    monkeypatch.setattr(gpt, "transformer_engine_usable", lambda: True)  # even where TE would import
    config = _config("cpu")
    assert not any(getattr(config, name) for name in FUSIONS)
    assert config.use_cpu_initialization is True


def test_te_spec_gets_the_padding_aware_core_attention(monkeypatch):
    """The TE branch of select_layer_spec swaps in padding_aware_te_attention() (TE itself cannot
    import here, so its spec and class are stand-ins)."""
    from megatron.core.models.gpt import gpt_layer_specs

    from papo_mega.models import te_attention

    sentinel = type("PaddingAwareTEStandIn", (), {})
    monkeypatch.setattr(gpt, "transformer_engine_usable", lambda: True)
    monkeypatch.setattr(gpt_layer_specs, "get_gpt_layer_with_transformer_engine_spec",
                        gpt_layer_specs.get_gpt_layer_local_spec)
    monkeypatch.setattr(te_attention, "padding_aware_te_attention", lambda: sentinel)
    spec = gpt.select_layer_spec(ModelConfig(precision="bf16"))
    assert spec.submodules.self_attention.submodules.core_attention is sentinel
    with te_attention.emulate_transformer_engine():  # tests' emulation wins over a real TE
        emulated = gpt.select_layer_spec(ModelConfig(precision="bf16"))
    assert emulated.submodules.self_attention.submodules.core_attention is te_attention.PaddingAwareEmulatedTEAttention
