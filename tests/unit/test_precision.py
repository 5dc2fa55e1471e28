"""Layer-spec selection and the FP8 switch (the GPU path itself is checked in tests/gpu)."""

import pytest
import torch

from papo_mega.config import ModelConfig
from papo_mega.errors import ConfigError
from papo_mega.models import gpt


def test_local_spec_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    from papo_mega.models.sdpa_attention import SdpaDotProductAttention

    spec = gpt.select_layer_spec(ModelConfig(precision="bf16"))
    assert spec.submodules.self_attention.submodules.core_attention is SdpaDotProductAttention


def test_fp8_without_transformer_engine_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(gpt, "transformer_engine_usable", lambda: False)
    with pytest.raises(ConfigError, match="model.precision=fp8 needs Transformer Engine on a CUDA machine"):
        gpt.select_layer_spec(ModelConfig(precision="fp8"))


def test_fp8_reaches_the_transformer_config(monkeypatch):
    from types import SimpleNamespace

    from papo_mega.distributed.layout import ParallelLayout

    groups = SimpleNamespace(layout=ParallelLayout(), device=torch.device("cpu"))
    config = gpt.build_transformer_config(ModelConfig(precision="fp8", fp8_recipe="tensorwise"), groups)
    assert (config.fp8, config.fp8_recipe, config.params_dtype, config.bf16) == ("hybrid", "tensorwise", torch.bfloat16, True)
    plain = gpt.build_transformer_config(ModelConfig(precision="bf16"), groups)
    assert plain.fp8 is None


def test_bad_fp8_recipe():
    with pytest.raises(ConfigError, match="model.fp8_recipe='fp4' is not one of"):
        ModelConfig(precision="fp8", fp8_recipe="fp4")
