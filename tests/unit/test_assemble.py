"""assemble_policy_rows stores each prompt's image once for its G rows, and the rows it builds
are the ones a per-row (duplicated) layout would give: same ids, positions and image order."""

import torch

from papo_mega.config import load_config
from papo_mega.models.rope_index import compute_mrope_position_ids
from papo_mega.rollout.assemble import assemble_policy_rows
from papo_mega.types import RolloutBatch, RolloutPrompt

CFG = load_config(None, ["preset=tiny"])
IMG = CFG.model.image_token_id


def _prompt(grid: tuple[int, int, int], seed: int) -> RolloutPrompt:
    tokens = grid[0] * grid[1] * grid[2] // 4
    ids = torch.tensor([5, 6, *[IMG] * tokens, 7, 8])
    pixels = torch.randn(grid[0] * grid[1] * grid[2], 12, generator=torch.Generator().manual_seed(seed))
    return RolloutPrompt(ids, pixels, torch.tensor([grid]))


def test_each_prompt_image_is_stored_once_and_indexed_per_row():
    prompts = [_prompt((1, 4, 4), 0), _prompt((1, 2, 4), 1)]
    g = 3
    responses = torch.randint(10, 20, (2 * g, 4))
    lengths = torch.tensor([4, 2, 3, 1, 4, 2])
    rollout = RolloutBatch(torch.arange(2).repeat_interleave(g), responses, torch.ones(2 * g, 4),
                           torch.zeros(2 * g, 4), lengths, ["stop"] * (2 * g))
    masked = [p.pixel_values * 0 for p in prompts]
    mb = assemble_policy_rows(prompts, rollout, torch.arange(2 * g).float(), CFG.model, 2, 0, masked)
    assert mb.image_index.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(mb.pixel_values, torch.cat([p.pixel_values for p in prompts]))
    assert mb.masked_pixel_values.shape == mb.pixel_values.shape
    # Positions as if every row carried its own copy of the image.
    per_row_grids = torch.cat([prompts[int(i)].image_grid_thw for i in rollout.prompt_index])
    real = (torch.arange(mb.input_ids.shape[1])[None] < torch.tensor(
        [len(prompts[int(p)].input_ids) + int(n) for p, n in zip(rollout.prompt_index, lengths)])[:, None]).long()
    expected = compute_mrope_position_ids(mb.input_ids, per_row_grids, IMG, 2, real)
    assert torch.equal(mb.position_ids, expected)
    # A slice of rows from the second prompt only keeps that prompt's image.
    tail = assemble_policy_rows(prompts, rollout, torch.zeros(2 * g), CFG.model, 2, 0, masked, rows=range(4, 6))
    assert tail.image_index.tolist() == [0, 0] and torch.equal(tail.pixel_values, prompts[1].pixel_values)
