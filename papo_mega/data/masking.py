"""PAPO's masked view I_mask: random blackening of image cells, reproducible per (seed, step, prompt).

Two modes (`DataConfig.mask_mode`):

- pixel (the paper and the reference code): a grid of `cell` x `cell` pixel cells over the RAW
  image, before resizing; each cell is set to 0 independently with probability `ratio`. Cells at
  the right/bottom edge that are cut short are cells too. The masked image then goes through the
  ordinary processor, so bicubic resizing softens the cell borders exactly as it would for a
  real black square.
- patch: after patchify, whole vision patches (rows of pixel_values) are set to the processed
  value of a black pixel, (0 - mean) / std per channel - what pixel mode gives when a cell
  covers exactly one patch and no resize happens.

Both keep the image size, grid_thw, the number of vision tokens and their positions: only the
pixel input differs between the two views.

Seeding: the Bernoulli draws come from SHAKE-256 of (seed, step, prompt_id, image_index), a
standard extendable-output hash, so masks are identical across processes, machines and numpy
versions, shared by all rollouts of a prompt, and fresh at every step.
"""

from __future__ import annotations

import hashlib
import numbers

import numpy as np
import torch
from PIL import Image

from papo_mega.data.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalised_black, to_rgb

PromptId = int | str | bytes


def _id_token(value: PromptId) -> str:
    """Typed text for a key part, so that prompt 5 and prompt "5" get different masks."""
    if isinstance(value, numbers.Integral):
        return f"i{int(value)}"
    if isinstance(value, bytes):
        return f"b{value.hex()}"
    if isinstance(value, str):
        return f"s{value.encode().hex()}"
    raise TypeError(f"prompt_id must be an int, str or bytes, got {type(value).__name__}")


def mask_key(seed: int, step: int, prompt_id: PromptId, image_index: int = 0) -> bytes:
    """The hash input naming one mask.

    Pixel and patch modes share it on purpose: both draw in raster order, so for an image that
    needs no resize with cell == patch size the two modes black out the same squares (a test
    checks this). Changing the text changes every mask: bump the version tag if you do.
    """
    parts = ("papo-mask-v1", _id_token(seed), _id_token(step), _id_token(prompt_id), _id_token(image_index))
    return "|".join(parts).encode()


def bernoulli(shape: tuple[int, ...], ratio: float, key: bytes) -> np.ndarray:
    """bool array of `shape`, each True with probability `ratio`, a pure function of `key`.

    One uint32 per element from SHAKE-256(key); True when below round(ratio * 2^32), so ratio 0
    never masks and ratio 1 always does (compared in uint64: 2^32 does not fit uint32).
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio {ratio} must be within [0, 1]")
    count = int(np.prod(shape, dtype=np.int64))
    words = np.frombuffer(hashlib.shake_256(key).digest(4 * count), dtype="<u4")
    threshold = np.uint64(round(ratio * 2**32))
    return (words.astype(np.uint64) < threshold).reshape(shape)


def cell_grid(height: int, width: int, cell: int) -> tuple[int, int]:
    """(rows, cols) of cells covering a height x width image; edge cells may be partial."""
    if cell < 1:
        raise ValueError(f"mask cell size {cell} must be >= 1")
    return -(-height // cell), -(-width // cell)


def cell_mask(
    height: int,
    width: int,
    ratio: float,
    cell: int,
    seed: int,
    step: int,
    prompt_id: PromptId,
    image_index: int = 0,
) -> np.ndarray:
    """bool [rows, cols]: True for cells to blacken (see cell_grid for the grid)."""
    key = mask_key(seed, step, prompt_id, image_index)
    return bernoulli(cell_grid(height, width, cell), ratio, key)


def expand_cells(cells: np.ndarray, height: int, width: int, cell: int, channels: int = 1) -> np.ndarray:
    """[rows, cols] -> [height, width * channels]: each cell value repeated over its pixels'
    bytes (channels-last rows), partial edge cells cropped."""
    per_row = np.repeat(cells, cell * channels, axis=1)[:, : width * channels]
    return np.repeat(per_row, cell, axis=0)[:height]


def mask_array_pixels(
    arr: np.ndarray, ratio: float, cell: int, seed: int, step: int, prompt_id: PromptId, image_index: int = 0
) -> np.ndarray:
    """uint8 [H, W, C] or [H, W] -> a new array of the same shape with masked cells set to 0.

    The input is not modified. Multiplying the image, seen as [H, W*C] bytes, by a same-shaped
    0/1 keep map is one contiguous pass; broadcasting over a trailing C=3 axis was 10x slower.
    """
    height, width = arr.shape[:2]
    channels = arr.shape[2] if arr.ndim == 3 else 1
    cells = cell_mask(height, width, ratio, cell, seed, step, prompt_id, image_index)
    keep = expand_cells((~cells).astype(arr.dtype), height, width, cell, channels)
    flat = np.ascontiguousarray(arr).reshape(height, width * channels)
    return (flat * keep).reshape(arr.shape)


def mask_image_pixels(
    img: Image.Image, ratio: float, cell: int, seed: int, step: int, prompt_id: PromptId, image_index: int = 0
) -> Image.Image:
    """PIL image -> RGB PIL image of the same size with the masked cells black.

    The image is converted to RGB first (as the processor would): zeroing an alpha band would
    make cells transparent (composited to white) and palette index 0 need not be black.
    """
    arr = np.asarray(to_rgb(img))
    return Image.fromarray(mask_array_pixels(arr, ratio, cell, seed, step, prompt_id, image_index))


def merge_order(t: int, h: int, w: int, merge_size: int = 2) -> np.ndarray:
    """int64 [t*h*w]: row r of pixel_values holds the patch at raster index order[r].

    transformers orders patches (t, h/m, w/m, m, m); raster order is (t, h, w).
    """
    raster = np.arange(t * h * w).reshape(t, h // merge_size, merge_size, w // merge_size, merge_size)
    return raster.transpose(0, 1, 3, 2, 4).reshape(-1)


def patch_mask(
    grid_thw: torch.Tensor,
    ratio: float,
    seed: int,
    step: int,
    prompt_id: PromptId,
    merge_size: int = 2,
    image_index: int = 0,
) -> np.ndarray:
    """bool [t*h*w] in pixel_values row order: True for patches to blacken.

    Drawn in raster order and then permuted, so the mask of a patch depends on where it sits in
    the image, not on the merge grouping.
    """
    t, h, w = (int(v) for v in torch.as_tensor(grid_thw).reshape(3))
    raster = bernoulli((t * h * w,), ratio, mask_key(seed, step, prompt_id, image_index))
    return raster[merge_order(t, h, w, merge_size)]


def mask_patches(
    pixel_values: torch.Tensor,
    grid_thw: torch.Tensor,
    ratio: float,
    seed: int,
    step: int,
    prompt_id: PromptId,
    merge_size: int = 2,
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN,
    std: tuple[float, ...] = OPENAI_CLIP_STD,
) -> torch.Tensor:
    """float [P, C*T*p*p] -> a new tensor with masked patches set to normalised black.

    grid_thw is [3] for one image or [N, 3] for N images whose rows are concatenated in
    pixel_values; image i draws its own mask (image_index = i). Each row is laid out
    (C, T, p, p), so a black row is each channel's black value repeated T*p*p times.
    """
    grids = torch.as_tensor(grid_thw).reshape(-1, 3)
    rows = [patch_mask(g, ratio, seed, step, prompt_id, merge_size, i) for i, g in enumerate(grids)]
    masked = torch.from_numpy(np.concatenate(rows))
    if masked.numel() != pixel_values.shape[0]:
        raise ValueError(
            f"grid_thw {grids.tolist()} has {masked.numel()} patches, pixel_values {pixel_values.shape[0]} rows"
        )
    black = torch.from_numpy(normalised_black(mean, std)).to(pixel_values.dtype)
    black_row = black.repeat_interleave(pixel_values.shape[1] // black.numel())
    out = pixel_values.clone()
    out[masked.to(pixel_values.device)] = black_row.to(pixel_values.device)
    return out


def masked_fraction(mask: np.ndarray | torch.Tensor) -> float:
    """Share of True entries in a cell or patch mask."""
    return float(torch.as_tensor(mask).float().mean()) if torch.as_tensor(mask).numel() else 0.0


def black_pixel_fraction(img: Image.Image | np.ndarray) -> float:
    """Share of pixels whose channels are all exactly 0 (for checking pixel-mode masks)."""
    arr = np.asarray(img)
    arr = arr if arr.ndim == 3 else arr[:, :, None]
    return float((arr == 0).all(axis=2).mean())
