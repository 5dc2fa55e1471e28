"""From rollouts to the policy update's rows: prompt + response sequences, aligned for next-token
log-probs, with both image views (stage 3 -> 5 of docs/architecture)."""

from __future__ import annotations

import torch

from papo_mega.config import ModelConfig
from papo_mega.models.fp8_shapes import fp8_padded_length
from papo_mega.models.rope_index import compute_mrope_position_ids
from papo_mega.types import PolicyMicroBatch, RolloutBatch, RolloutPrompt


def assemble_policy_rows(
    prompts: list[RolloutPrompt],
    rollout: RolloutBatch,
    advantages: torch.Tensor,
    model: ModelConfig,
    spatial_merge_size: int,
    pad_token_id: int,
    masked_pixel_values: list[torch.Tensor | None] | None = None,
    seq_len: int | None = None,
    rows: range | None = None,
) -> PolicyMicroBatch:
    """Rollout rows (all, or `rows`) as one right-padded batch [R, S] (S = longest, or seq_len).

    advantages: [R_all] for every rollout row (sliced to `rows` here). Call once per micro-batch
    with a common seq_len so pipeline stages see fixed shapes. Under model.precision=fp8, S is
    padded up to the fp8 token multiple (models/fp8_shapes.py): right padding carries no loss and,
    causal attention looking only back, leaves every real token's log-prob unchanged.

    Column t is about token t+1: targets[:, t] = ids[:, t+1]; response_mask marks response tokens;
    old_logp is left empty (the no-grad forward fills it) - the rollout's own log-probs are kept
    by the caller for comparison. masked_pixel_values[g] is prompt g's masked image patches.
    """
    selected = list(rows if rows is not None else range(len(rollout.prompt_index)))
    prompt_of = [int(rollout.prompt_index[r]) for r in selected]
    rows = []
    for r, g in zip(selected, prompt_of):
        response = rollout.response_ids[r, : int(rollout.lengths[r])]
        rows.append((prompts[g], torch.cat([prompts[g].input_ids, response])))
    longest = max(len(ids) for _, ids in rows)
    width = fp8_padded_length(seq_len or longest, model)
    if width < longest:
        raise ValueError(f"seq_len={seq_len} is shorter than the longest prompt + response ({longest})")
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    real = torch.zeros(len(rows), width, dtype=torch.long)
    response_mask = torch.zeros(len(rows), width)
    for r, (prompt, seq) in enumerate(rows):
        ids[r, : len(seq)] = seq
        real[r, : len(seq)] = 1
        # Position t predicts token t+1: responses start at prompt_len, so at column prompt_len-1.
        response_mask[r, len(prompt.input_ids) - 1 : len(seq) - 1] = 1.0
    # Each prompt's images are stored once; image_index repeats them for the prompt's G rows.
    unique = list(dict.fromkeys(g for g in prompt_of if prompts[g].pixel_values is not None))
    has_images = bool(unique)
    grids = image_index = None
    if has_images:
        counts = [len(prompts[g].image_grid_thw) for g in unique]
        first = dict(zip(unique, torch.tensor([0, *counts]).cumsum(0).tolist()))
        grids = torch.cat([prompts[g].image_grid_thw for g in unique])
        image_index = torch.tensor([first[g] + i for g in prompt_of if g in first
                                    for i in range(len(prompts[g].image_grid_thw))], dtype=torch.long)
    positions = compute_mrope_position_ids(ids, None if grids is None else grids[image_index],
                                           model.image_token_id, spatial_merge_size, real)
    if not model.mrope_section:
        positions = positions[0]
    return PolicyMicroBatch(
        input_ids=ids,
        position_ids=positions,
        targets=torch.roll(ids, -1, dims=1),
        response_mask=response_mask,
        advantages=advantages[selected].float(),
        pixel_values=torch.cat([prompts[g].pixel_values for g in unique]) if has_images else None,
        masked_pixel_values=(torch.cat([masked_pixel_values[g] for g in unique])
                             if has_images and masked_pixel_values is not None else None),
        image_grid_thw=grids,
        image_index=image_index,
    )


def longest_sequence(prompts: list[RolloutPrompt], rollout: RolloutBatch, model: ModelConfig | None = None) -> int:
    """Longest prompt + response over all rows (the common seq_len for micro-batches), padded to
    the fp8 token multiple when model.precision is fp8."""
    longest = max(len(prompts[int(g)].input_ids) + int(n) for g, n in zip(rollout.prompt_index, rollout.lengths))
    return longest if model is None else fp8_padded_length(longest, model)
