"""Read a Hugging Face Qwen2.5-VL config.json into our model/vision config sections.

Both layouts transformers has written are understood: text fields at the top level with
`rope_scaling` (4.x), and a nested `text_config` with `rope_parameters` (5.x).
"""

from __future__ import annotations

import json
from pathlib import Path

from papo_mega.config import ModelConfig, VisionConfig
from papo_mega.errors import ConfigError

_DTYPES = {"float32": "fp32", "bfloat16": "bf16"}


def read_hf_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found; point --hf at a Hugging Face model directory")
    config = json.loads(path.read_text())
    model_type = config.get("model_type")
    if model_type != "qwen2_5_vl":
        raise ConfigError(
            f"{path} is a '{model_type}' checkpoint, not Qwen2.5-VL (model_type 'qwen2_5_vl'); "
            f"convert a Qwen2.5-VL model"
        )
    return config


def _rope(text: dict) -> tuple[float, list]:
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    theta = rope.get("rope_theta", text.get("rope_theta", 1_000_000.0))
    section = rope.get("mrope_section")
    if not section:
        raise ConfigError("config.json has no mrope_section; it is not a Qwen2.5-VL language model")
    return float(theta), list(section)


def configs_from_hf(config: dict) -> tuple[ModelConfig, VisionConfig, str]:
    """(ModelConfig, VisionConfig, hf dtype name) for a Qwen2.5-VL config.json dict."""
    text = config.get("text_config") or config
    vision = config["vision_config"]
    theta, section = _rope(text)
    dtype = config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or "float32"
    if dtype not in _DTYPES:
        raise ConfigError(f"checkpoint dtype {dtype} is not supported; use float32 or bfloat16 weights")
    tie = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    model = ModelConfig(
        num_layers=text["num_hidden_layers"],
        hidden_size=text["hidden_size"],
        ffn_hidden_size=text["intermediate_size"],
        num_attention_heads=text["num_attention_heads"],
        num_query_groups=text.get("num_key_value_heads", text["num_attention_heads"]),
        vocab_size=text["vocab_size"],
        max_seq_len=text.get("max_position_embeddings", 32768),
        tie_embeddings=bool(tie),
        rotary_base=theta,
        norm_eps=text.get("rms_norm_eps", 1e-6),
        precision=_DTYPES[dtype],
        mrope_section=section,
        image_token_id=config.get("image_token_id", text.get("image_token_id", 151655)),
        video_token_id=config.get("video_token_id", text.get("video_token_id", 151656)),
        vision_start_token_id=config.get("vision_start_token_id", 151652),
        vision_end_token_id=config.get("vision_end_token_id", 151653),
    )
    if vision.get("out_hidden_size", model.hidden_size) != model.hidden_size:
        raise ConfigError("vision_config.out_hidden_size differs from the language model's hidden_size")
    vision_cfg = VisionConfig(
        enabled=True,
        depth=vision["depth"],
        hidden_size=vision["hidden_size"],
        intermediate_size=vision["intermediate_size"],
        num_heads=vision["num_heads"],
        in_channels=vision.get("in_channels", vision.get("in_chans", 3)),
        patch_size=vision.get("patch_size", 14),
        temporal_patch_size=vision.get("temporal_patch_size", 2),
        spatial_merge_size=vision.get("spatial_merge_size", 2),
        window_size=vision.get("window_size", 112),
        fullatt_block_indexes=list(vision.get("fullatt_block_indexes", [])),
    )
    return model, vision_cfg, dtype


def hf_config_kwargs(model: ModelConfig, vision: VisionConfig) -> dict:
    """Keyword arguments of transformers' `Qwen2_5_VLConfig` for our model/vision sections
    (the inverse of `configs_from_hf`, for checkpoints that did not come from Hugging Face)."""
    return dict(
        text_config=dict(
            hidden_size=model.hidden_size, intermediate_size=model.ffn_hidden_size,
            num_hidden_layers=model.num_layers, num_attention_heads=model.num_attention_heads,
            num_key_value_heads=model.num_query_groups, vocab_size=model.vocab_size,
            rope_scaling={"type": "mrope", "mrope_section": list(model.mrope_section)},
            rope_theta=model.rotary_base, rms_norm_eps=model.norm_eps,
            max_position_embeddings=model.max_seq_len, tie_word_embeddings=model.tie_embeddings),
        vision_config=dict(
            depth=vision.depth, hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
            num_heads=vision.num_heads, out_hidden_size=model.hidden_size, window_size=vision.window_size,
            fullatt_block_indexes=list(vision.fullatt_block_indexes), patch_size=vision.patch_size,
            spatial_merge_size=vision.spatial_merge_size, temporal_patch_size=vision.temporal_patch_size,
            in_channels=vision.in_channels),
        image_token_id=model.image_token_id, video_token_id=model.video_token_id,
        vision_start_token_id=model.vision_start_token_id, vision_end_token_id=model.vision_end_token_id,
        tie_word_embeddings=model.tie_embeddings,
    )


def precision_dtype(precision: str) -> str:
    """The HF dtype name weights of this precision are exported in (fp8 training keeps bf16 weights)."""
    return {"fp32": "float32", "bf16": "bfloat16", "fp8": "bfloat16"}[precision]


def hf_config_dict(model: ModelConfig, vision: VisionConfig) -> dict:
    """transformers' Qwen2_5_VLConfig of our sections, as the dict a config.json holds."""
    from transformers import Qwen2_5_VLConfig
    from transformers.utils import logging as hf_logging

    # A tiny vocabulary makes transformers warn that Qwen's default bos/eos ids lie outside it;
    # they are unused by export and eval, so keep the run's output clean.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return Qwen2_5_VLConfig(**hf_config_kwargs(model, vision)).to_dict()
    finally:
        hf_logging.set_verbosity(verbosity)
