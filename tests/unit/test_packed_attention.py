"""Segmented attention (segment lengths) == one SDPA over the packed sequence with a block mask."""

import pytest
import torch

from papo_mega.models.packed_attention import _segmented_sdpa, build_segment_mask, segment_lengths


def _reference(q, k, v, segment_ids, gqa):
    allowed = ~build_segment_mask(segment_ids)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=0.3, enable_gqa=gqa)


@pytest.mark.parametrize("lengths", [[16] * 6, [16, 4, 16, 12, 4, 8], [37]])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_segmented_equals_masked(lengths, kv_heads):
    torch.manual_seed(0)
    s = sum(lengths)
    q = torch.randn(1, 4, s, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, kv_heads, s, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, kv_heads, s, 8, dtype=torch.float64, requires_grad=True)
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    assert segment_lengths(ids).tolist() == lengths
    gqa = kv_heads != 4
    out = _segmented_sdpa(q, k, v, lengths, 0.3, 0.0, gqa)
    ref = _reference(q, k, v, ids, gqa)
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_non_contiguous_segments_are_refused():
    with pytest.raises(ValueError, match="contiguous"):
        segment_lengths(torch.tensor([0, 0, 1, 0]))
