"""The algorithm: advantages, vocab-parallel log-probs, the PAPO loss, two-view batching, reductions."""
