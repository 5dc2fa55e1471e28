"""Stage 2 - prepare views: a streamed sample -> the prompt's token ids and image patches, plus
the PAPO-masked view (and, for evaluation, a blank view) of the same image.

All views keep the image's size, hence its grid, token ids and positions: only pixels differ.
The mask is seeded by (seed, step, sample key), so one prompt's G rollouts share it, a new step
draws a fresh one, and a resumed run draws the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from papo_mega.config import DataConfig, VisionConfig
from papo_mega.data.image import decode_image, process_array, to_rgb
from papo_mega.data.masking import mask_array_pixels, mask_patches
from papo_mega.data.prompts import build_prompt_ids
from papo_mega.data.tokenizer import Tokenizer
from papo_mega.types import RolloutPrompt

VIEWS = ("original", "masked", "blank")


@dataclass
class PreparedPrompt:
    """One question with its image in every requested view."""

    key: str
    task: str
    question: str
    answer: str
    prompt: RolloutPrompt
    """Token ids and the original image's patches."""
    views: dict[str, torch.Tensor]
    """'masked' / 'blank' -> patches [P, C*T*p*p] with the same grid as the original."""


def prepare_prompt(item: dict, tokenizer: Tokenizer, data: DataConfig, vision: VisionConfig, seed: int,
                   step: int, views: tuple[str, ...] = ("masked",)) -> PreparedPrompt:
    """A stream item ({key, image_bytes, meta: {question, answer, task}}) -> PreparedPrompt.

    Raises PromptTooLong past data.max_prompt_len and BadImage for undecodable images; the
    caller counts and skips them.
    """
    unknown = set(views) - set(VIEWS)
    if unknown:
        raise ValueError(f"unknown views {sorted(unknown)}; choose from {VIEWS}")
    meta = item["meta"]
    key = str(item["key"])
    image = decode_image(item["image_bytes"])
    raw = np.asarray(to_rgb(image))

    def process(arr: np.ndarray):
        return process_array(arr, data.min_pixels, data.max_pixels, vision.patch_size, vision.spatial_merge_size,
                             vision.temporal_patch_size)

    original = process(raw)
    ids = build_prompt_ids(meta["question"], [original.grid_thw.tolist()], tokenizer, vision.spatial_merge_size,
                           max_len=data.max_prompt_len)
    grid = original.grid_thw.reshape(1, 3)
    out: dict[str, torch.Tensor] = {}
    if "masked" in views:
        if data.mask_mode == "pixel":  # the paper's: cells on the raw image, before resizing
            masked = mask_array_pixels(raw, data.mask_ratio, data.mask_cell, seed, step, key)
            out["masked"] = process(masked).pixel_values
        else:
            out["masked"] = mask_patches(original.pixel_values, grid, data.mask_ratio, seed, step, key,
                                         vision.spatial_merge_size)
    if "blank" in views:  # every patch black: what the model answers without seeing anything
        out["blank"] = mask_patches(original.pixel_values, grid, 1.0, seed, step, key, vision.spatial_merge_size)
    prompt = RolloutPrompt(torch.tensor(ids, dtype=torch.long), original.pixel_values, grid)
    return PreparedPrompt(key, str(meta.get("task", "")), meta["question"], str(meta["answer"]), prompt, out)
