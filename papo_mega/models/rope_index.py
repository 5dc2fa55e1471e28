"""3D (temporal, height, width) position ids for Qwen2.5-VL's multimodal rotary embedding.

Text tokens advance all three coordinates together by 1. The tokens of one image (its merged
patches, row-major) share the temporal coordinate `start` and take `start + row` / `start + col`
as height / width; the text after the image resumes at `start + max(rows, cols)`. This is
Qwen2.5-VL's `get_rope_index` for still images.
"""

from __future__ import annotations

import torch


def compute_mrope_position_ids(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    image_token_id: int,
    spatial_merge_size: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Position ids [3, B, S] for token ids [B, S]; images' grids [N, 3] in order of appearance.

    Padding positions (attention_mask == 0) get position 0 and are skipped when counting.
    Raises ValueError when the image tokens do not match the grids.
    """
    batch, seq = input_ids.shape
    positions = torch.zeros(3, batch, seq, dtype=torch.long)
    grids = iter([] if image_grid_thw is None else image_grid_thw.tolist())
    for b in range(batch):
        keep = torch.ones(seq, dtype=torch.bool) if attention_mask is None else attention_mask[b].bool()
        tokens = input_ids[b][keep].tolist()
        row = _positions_for_sequence(tokens, grids, image_token_id, spatial_merge_size)
        positions[:, b, keep] = row
    if next(grids, None) is not None:
        raise ValueError("more image grids than images in the token ids")
    return positions


def _positions_for_sequence(tokens: list[int], grids, image_token_id: int, merge: int) -> torch.Tensor:
    out = torch.empty(3, len(tokens), dtype=torch.long)
    current, i = 0, 0
    while i < len(tokens):
        if tokens[i] != image_token_id:
            out[:, i] = current
            current += 1
            i += 1
            continue
        try:
            t, h, w = next(grids)
        except StopIteration:
            raise ValueError("image tokens found without a matching image grid") from None
        rows, cols = h // merge, w // merge
        count = t * rows * cols
        if tokens[i : i + count] != [image_token_id] * count:
            raise ValueError(f"an image of grid {(t, h, w)} needs {count} consecutive image tokens")
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(rows), torch.arange(cols), indexing="ij")
        out[:, i : i + count] = torch.stack([tt, hh, ww]).reshape(3, -1) + current
        current += max(rows, cols)
        i += count
    return out
