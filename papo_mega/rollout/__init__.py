"""Generation on the training model itself: KV-cached, batched, at any TP/PP layout."""
