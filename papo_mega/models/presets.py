"""Architecture presets: the published Qwen2.5-VL numbers, and a tiny one for tests and the demo.

Figures from the models' released config.json files (Qwen/Qwen2.5-VL-{3B,7B,32B,72B}-Instruct).
A preset fills the `model` and `vision` sections; the recipe and command-line overrides win.
"""

from __future__ import annotations

from papo_mega.errors import ConfigError

# Shared by every released size: the vision tower differs only in its output width.
_QWEN_VISION = dict(
    enabled=True, depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3,
    patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31], norm_eps=1e-6,
)
_QWEN_TEXT = dict(rotary_base=1_000_000.0, norm_eps=1e-6, mrope_section=[16, 24, 24], max_seq_len=128000)

PRESETS: dict[str, dict] = {
    "tiny": {
        "model": dict(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                      num_query_groups=2, vocab_size=256, max_seq_len=1024, rotary_base=10000.0,
                      mrope_section=[2, 3, 3], tie_embeddings=True, image_token_id=250, video_token_id=251,
                      vision_start_token_id=252, vision_end_token_id=253),
        "vision": dict(enabled=True, depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                       window_size=56, fullatt_block_indexes=[1]),
    },
    "qwen2.5-vl-3b": {
        "model": dict(num_layers=36, hidden_size=2048, ffn_hidden_size=11008, num_attention_heads=16,
                      num_query_groups=2, vocab_size=151936, tie_embeddings=True, **_QWEN_TEXT),
        "vision": _QWEN_VISION,
    },
    "qwen2.5-vl-7b": {
        "model": dict(num_layers=28, hidden_size=3584, ffn_hidden_size=18944, num_attention_heads=28,
                      num_query_groups=4, vocab_size=152064, tie_embeddings=False, **_QWEN_TEXT),
        "vision": _QWEN_VISION,
    },
    "qwen2.5-vl-32b": {
        "model": dict(num_layers=64, hidden_size=5120, ffn_hidden_size=27648, num_attention_heads=40,
                      num_query_groups=8, vocab_size=152064, tie_embeddings=False, **_QWEN_TEXT),
        "vision": _QWEN_VISION,
    },
    "qwen2.5-vl-72b": {
        "model": dict(num_layers=80, hidden_size=8192, ffn_hidden_size=29568, num_attention_heads=64,
                      num_query_groups=8, vocab_size=152064, tie_embeddings=False, **_QWEN_TEXT),
        "vision": _QWEN_VISION,
    },
}


def preset_tree(name: str) -> dict:
    """The config sections a preset sets (copies, safe to modify)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset '{name}'; choose one of: {', '.join(PRESETS)}")
    return {section: dict(values) for section, values in PRESETS[name].items()}
