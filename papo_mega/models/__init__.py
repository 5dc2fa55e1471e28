"""Models on megatron-core: layer specs and builders (Qwen2.5-VL arrives in its own modules)."""
