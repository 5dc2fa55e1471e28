"""Chunking a rank's rollout (rollout.max_batch_rows): which prompts go together, and how the chunk
results are put back into one grouped RolloutBatch."""

import pytest
import torch

from papo_mega.config import ConfigError, RolloutConfig
from papo_mega.rollout.engine import merge_chunks, prompt_chunks
from papo_mega.types import RolloutBatch


def test_no_limit_or_a_large_limit_is_one_batch_in_order():
    assert prompt_chunks([5, 3, 9], 4, 0) == [[0, 1, 2]]
    assert prompt_chunks([5, 3, 9], 4, 12) == [[0, 1, 2]]


def test_chunks_hold_max_rows_over_n_prompts_sorted_by_length():
    lengths = [7, 2, 9, 4, 4, 1, 8]
    chunks = prompt_chunks(lengths, 2, 5)  # 5 // 2 = 2 prompts per chunk
    assert [len(c) for c in chunks] == [2, 2, 2, 1]
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    flat = [lengths[i] for c in chunks for i in c]
    assert flat == sorted(lengths)


def _chunk_result(prompts: list[int], group: int, width: int, tag: int) -> RolloutBatch:
    """A fake chunk output whose row contents encode (original prompt, sample) for checking the merge."""
    rows = len(prompts) * group
    local = torch.arange(len(prompts)).repeat_interleave(group)
    ids = torch.tensor([[100 * prompts[int(p)] + s] * width for p, s in zip(local, list(range(group)) * len(prompts))])
    lengths = torch.full((rows,), width - tag)
    mask = (torch.arange(width)[None] < lengths[:, None]).float()
    return RolloutBatch(prompt_index=local, response_ids=ids, response_mask=mask, logprobs=-mask,
                        lengths=lengths, finish_reason=[f"r{prompts[int(p)]}" for p in local])


def test_merge_restores_prompt_order_and_pads_to_the_widest_chunk():
    parts = [([3, 1], _chunk_result([3, 1], 2, 4, 1)), ([0, 2], _chunk_result([0, 2], 2, 6, 2))]
    out = merge_chunks(parts, pad_token_id=-1)
    assert out.prompt_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert out.response_ids.shape == (8, 6)
    # Row contents followed their prompt, samples in order within a group.
    assert out.response_ids[:, 0].tolist() == [0, 1, 100, 101, 200, 201, 300, 301]
    assert out.response_ids[2, 4:].tolist() == [-1, -1]  # the narrower chunk is padded with the pad id
    assert out.lengths.tolist() == [4, 4, 3, 3, 4, 4, 3, 3]
    assert out.response_mask.sum(1).tolist() == out.lengths.float().tolist()
    assert out.finish_reason == ["r0", "r0", "r1", "r1", "r2", "r2", "r3", "r3"]


def test_max_batch_rows_below_the_group_size_is_refused():
    with pytest.raises(ConfigError, match="max_batch_rows=3 is below rollout.n=5"):
        RolloutConfig(n=5, max_batch_rows=3)
