"""Tiny random Hugging Face Qwen2.5-VL checkpoints built from configs (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch

from papo_mega.config import ModelConfig, VisionConfig
from papo_mega.convert.hf_config import hf_config_kwargs

# Several shapes: tied and untied embeddings, GQA, odd widths, different window/full patterns.
TINY_HF_CONFIGS = {
    "tied_gqa": dict(text=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=300, mrope=[2, 3, 3], tie=True),
                     vision=dict(depth=3, hidden_size=48, intermediate_size=40, num_heads=2, window_size=56,
                                 fullatt_block_indexes=[1])),
    "untied_odd": dict(text=dict(hidden_size=96, intermediate_size=136, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=4, vocab_size=263, mrope=[4, 4, 4], tie=False),
                       vision=dict(depth=4, hidden_size=40, intermediate_size=72, num_heads=2, window_size=56,
                                   fullatt_block_indexes=[0, 3])),
}


def make_tiny_hf(directory: Path, name: str, dtype: torch.dtype = torch.float32, seed: int = 0,
                 weight_scale: float = 1.0) -> Path:
    """Save a random Qwen2.5-VL of the named tiny shape with transformers; returns the directory.

    weight_scale multiplies every matrix: at transformers' init (std 0.02) a tiny model's next
    token barely depends on its context, so greedy decoding repeats one token; generation tests
    scale up to get varied, context-dependent output.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    spec = TINY_HF_CONFIGS[name]
    text, vision = dict(spec["text"]), dict(spec["vision"])
    vocab = text["vocab_size"]
    model = ModelConfig(
        num_layers=text["num_hidden_layers"], hidden_size=text["hidden_size"],
        ffn_hidden_size=text["intermediate_size"], num_attention_heads=text["num_attention_heads"],
        num_query_groups=text["num_key_value_heads"], vocab_size=vocab, mrope_section=text["mrope"],
        tie_embeddings=text["tie"], rotary_base=10000.0, norm_eps=1e-6, max_seq_len=1024,
        image_token_id=vocab - 4, video_token_id=vocab - 3, vision_start_token_id=vocab - 2,
        vision_end_token_id=vocab - 1)
    config = Qwen2_5_VLConfig(**hf_config_kwargs(model, VisionConfig(enabled=True, **vision)))
    torch.manual_seed(seed)
    hf_model = Qwen2_5_VLForConditionalGeneration(config)
    with torch.no_grad():  # non-trivial norms and biases, so a mapping mistake cannot hide
        for pname, param in hf_model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
            elif param.dim() >= 2:
                param.mul_(weight_scale)
    hf_model.to(dtype).save_pretrained(directory)
    return directory
