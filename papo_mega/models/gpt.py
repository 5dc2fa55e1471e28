"""The decoder language model on megatron-core: its `TransformerConfig` and one `GPTModel` chunk.

On CUDA with Transformer Engine the TE layer spec is used (and `precision: fp8` turns on TE's FP8
autocast with the configured recipe) with megatron's fusions on; otherwise megatron-core's local
spec, with fusions off. Parameters are initialised on their device (the CPU in CPU mode), then
overwritten by the layout-invariant init.
"""

from __future__ import annotations

import torch

from papo_mega.config import ModelConfig
from papo_mega.distributed.runtime import ParallelGroups
from papo_mega.errors import ConfigError

# fp8 keeps bf16 parameters; Transformer Engine casts GEMM inputs to fp8 inside its autocast.
PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}


def transformer_engine_usable() -> bool:
    """Transformer Engine imports and a CUDA device is present."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def select_layer_spec(model: ModelConfig):
    """Transformer Engine's fused spec on CUDA with TE; megatron-core's local spec otherwise. In both
    the core attention applies the rollout's padding mask (papo_mega/models/te_attention.py)."""
    from megatron.core.models.gpt import gpt_layer_specs

    from papo_mega.models.te_attention import (
        emulating_transformer_engine,
        local_core_attention,
        padding_aware_te_attention,
    )

    if transformer_engine_usable() and not emulating_transformer_engine():
        # TE ignores the rollout's left-padding mask (te_attention.py): masked calls go to SDPA.
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
        spec.submodules.self_attention.submodules.core_attention = padding_aware_te_attention()
        return spec
    if model.precision == "fp8":
        raise ConfigError(
            "model.precision=fp8 needs Transformer Engine on a CUDA machine; run in the NGC PyTorch container "
            "or pip install transformer-engine[pytorch] (papo_mega[gpu]) on a GPU node, or set model.precision=bf16"
        )
    # megatron's local spec with SDPA core attention where that is the same function (causal
    # without a mask, the rollout's padding mask): 0.73x -> ~0.9-1.0x of transformers' speed on CPU
    # (docs/benchmarks.md).
    from papo_mega.models.sdpa_attention import get_local_layer_spec

    return get_local_layer_spec(normalization="RMSNorm", core_attention=local_core_attention())


def shared_transformer_settings(precision: str, device: torch.device) -> dict:
    """TransformerConfig settings shared by the language model and the vision tower.

    Everything but CUDA counts as a host build: CPU runs and the dry run's meta device, where
    megatron's CPU init path allocates with plain torch.empty and so stays on meta (its GPU path
    names a device and would allocate every weight of the rank for real).
    """
    on_cpu = device.type != "cuda"
    dtype = PARAM_DTYPES[precision]
    return dict(
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Weights are overwritten by the layout-invariant init or a checkpoint, but megatron's own
        # draw stays on: with it off, megatron 0.16 never marks weights as tensor-parallel
        # (partition_dim etc.), which sharding, DDP and checkpoints rely on. On CUDA the draw is
        # made on the device (tensor_parallel/layers.py _initialize_affine_weight_gpu marks the
        # weights too): no full fp32 copy of every weight on the host.
        use_cpu_initialization=on_cpu,
        perform_initialization=True,
        **fusion_settings(on_cpu),
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,  # the local spec's norm refuses it; TE's spec handles its own
        deallocate_pipeline_outputs=not on_cpu,
        # gloo matches messages between one pair of ranks in posting order. Batched p2p posts
        # send_prev before send_next, so with pp=2 (prev == next) interleaved schedules swap
        # activations and gradients of equal shape silently; unbatched p2p uses one group per
        # direction and stays exact.
        batch_p2p_comm=not on_cpu,
    )


def fusion_settings(on_cpu: bool) -> dict:
    """megatron's fused kernels: on with Transformer Engine on CUDA, off elsewhere (plain torch).

    SwiGLU and bias-dropout-add are megatron's jit-fused functions (fusions/fused_bias_swiglu.py,
    fused_bias_dropout.py; bias=None is handled: add_bias_linear is off). The fused wgrad GEMM
    accumulates into main_grad; TE's linears take it natively, but the output layer is megatron's
    ColumnParallelLinear, which raises without apex's fused_weight_gradient_mlp_cuda
    (tensor_parallel/layers.py _grad_accum_fusion_available), so that flag follows the extension.
    """
    if on_cpu or not transformer_engine_usable():
        return dict(bias_activation_fusion=False, bias_dropout_fusion=False, gradient_accumulation_fusion=False)
    from megatron.core.tensor_parallel import layers

    return dict(bias_activation_fusion=True, bias_dropout_fusion=True,
                gradient_accumulation_fusion=bool(getattr(layers, "_grad_accum_fusion_available", False)))


def build_transformer_config(model: ModelConfig, groups: ParallelGroups):
    """megatron-core's TransformerConfig for the language model at this layout."""
    from megatron.core.transformer import TransformerConfig

    layout = groups.layout
    fp8 = model.precision == "fp8"
    return TransformerConfig(
        **shared_transformer_settings(model.precision, groups.device),
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.hidden_size // model.num_attention_heads,
        tensor_model_parallel_size=layout.tp_size,
        pipeline_model_parallel_size=layout.pp_size,
        virtual_pipeline_model_parallel_size=layout.vpp_size,
        context_parallel_size=layout.cp_size,
        layernorm_epsilon=model.norm_eps,
        add_bias_linear=False,
        init_method_std=model.init_std,
        # The token-mean over the whole global batch is done by finalize_model_grads (exact
        # under any number of micro-batches and DP ranks), not by dividing per micro-batch.
        calculate_per_token_loss=True,
        mrope_section=list(model.mrope_section) or None,
        fp8=model.fp8_format if fp8 else None,
        fp8_recipe=model.fp8_recipe,
        # megatron keeps layers [0, start) and [num_layers - end, num_layers) out of the fp8 autocast.
        first_last_layers_bf16=fp8 and bool(model.fp8_bf16_layers_start or model.fp8_bf16_layers_end),
        num_layers_at_start_in_bf16=model.fp8_bf16_layers_start,
        num_layers_at_end_in_bf16=model.fp8_bf16_layers_end,
        # megatron's activation recomputation: "full" keeps only each layer's input and reruns the
        # layer in backward (uniform, one layer per checkpoint); "selective" reruns core attention.
        **recompute_settings(model.recompute),
    )


def recompute_settings(mode: str) -> dict:
    """TransformerConfig fields for model.recompute."""
    if mode == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    if mode == "selective":
        return {"recompute_granularity": "selective"}
    return {}


def build_language_model(model: ModelConfig, config, groups: ParallelGroups, vp_stage: int | None):
    """One pipeline chunk of the decoder LM (megatron-core GPTModel; TE or local spec, see select_layer_spec)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    return GPTModel(
        config=config,
        transformer_layer_spec=select_layer_spec(model),
        vocab_size=model.padded_vocab_size,
        max_sequence_length=model.max_seq_len,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type="mrope" if model.mrope_section else "rope",
        rotary_base=int(model.rotary_base),
        vp_stage=vp_stage,
    ).to(groups.device)
