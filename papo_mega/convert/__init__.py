"""Hugging Face <-> megatron-core checkpoint conversion for Qwen2.5-VL."""
