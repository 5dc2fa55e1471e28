"""Payloads passed between stages (shapes in the field docs)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class ModelInputs:
    """A batch of right-padded sequences with any number of images each, as the model takes it."""

    input_ids: torch.Tensor
    """[B, S] token ids; image placeholders appear as one token per merged patch."""
    position_ids: torch.Tensor
    """[3, B, S] multimodal rotary positions ([B, S] for a text-only 1D-rope model)."""
    attention_mask: torch.Tensor | None = None
    """[B, S] 1 for real tokens, 0 for right padding (causal attention keeps padding harmless)."""
    pixel_values: torch.Tensor | None = None
    """[P, C*T*p*p] flattened patches of every image, images in order of appearance."""
    image_grid_thw: torch.Tensor | None = None
    """[N, 3] patch grid (t, h, w) of each image."""

    def to(self, device) -> ModelInputs:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return replace(self, **moved)
