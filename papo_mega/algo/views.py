"""Both image views in one forward: stack [original; masked] along the batch.

The masked view has the same token ids, positions and image grids - only the pixels differ - so
a micro-batch of B sequences becomes 2B rows: the vision tower runs once over 2x the images and
the language model once over 2x the sequences, instead of a second pass (the reference code's
+19% to +42% step time). Images fill placeholders in (row, position) order, so the original
images come first, then the masked ones.
"""

from __future__ import annotations

import torch

from papo_mega.errors import PapoError
from papo_mega.types import ModelInputs, PolicyMicroBatch

ORIGINAL, MASKED = "original", "masked"


def stack_views(mb: PolicyMicroBatch, views: tuple[str, ...]) -> ModelInputs:
    """Model inputs with the rows of each view in turn ([B*len(views), S])."""
    pixels = []
    for view in views:
        source = mb.pixel_values if view == ORIGINAL else mb.masked_pixel_values
        if view not in (ORIGINAL, MASKED):
            raise ValueError(f"unknown view {view!r}")
        if view == MASKED and mb.pixel_values is not None and source is None:
            raise PapoError("the masked view was asked for but the micro-batch has no masked_pixel_values; "
                            "mask the images (data.masking) before the forward")
        pixels.append(source)
    n = len(views)
    has_images = mb.pixel_values is not None
    position_dim = 1 if mb.position_ids.dim() == 3 else 0
    return ModelInputs(
        input_ids=mb.input_ids.repeat(n, 1),
        position_ids=torch.cat([mb.position_ids] * n, dim=position_dim),
        pixel_values=torch.cat(pixels) if has_images else None,
        image_grid_thw=torch.cat([mb.image_grid_thw] * n) if has_images else None,
        image_index=(torch.cat([mb.image_index + v * len(mb.image_grid_thw) for v in range(n)])
                     if has_images and mb.image_index is not None else None),
    )


def split_views(rows: torch.Tensor, views: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Undo stack_views on a per-row result [B*len(views), ...] -> {view: [B, ...]}."""
    return dict(zip(views, rows.chunk(len(views), dim=0)))
