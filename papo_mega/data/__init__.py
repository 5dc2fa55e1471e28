"""Data: shards, image processing, PAPO masking, tokenizers and prompts, the synthetic task suite."""
