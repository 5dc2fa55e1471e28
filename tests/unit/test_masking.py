"""PAPO masking: statistics, reproducibility, pixel-mode and patch-mode semantics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from papo_mega.data.image import normalised_black, process_array, process_image, rgb_array
from papo_mega.data.masking import (
    bernoulli,
    black_pixel_fraction,
    cell_grid,
    cell_mask,
    expand_cells,
    mask_array_pixels,
    mask_image_pixels,
    mask_key,
    mask_patches,
    masked_fraction,
    patch_mask,
)

KEY = {"seed": 1234, "step": 7, "prompt_id": 42}


def nonzero_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 [H, W, 3] in 1..255, so a zero pixel can only come from the mask."""
    return np.random.default_rng(seed).integers(1, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("ratio", [0.1, 0.6, 0.9])
def test_ratio_statistics(ratio):
    mask = cell_mask(2800, 2800, ratio, 14, **KEY)  # 200 x 200 = 40000 independent cells
    sigma = math.sqrt(ratio * (1 - ratio) / mask.size)
    assert abs(masked_fraction(mask) - ratio) < 5 * sigma
    # Independence, roughly: neighbouring cells agree as often as two independent draws would.
    agree = float((mask[:, 1:] == mask[:, :-1]).mean())
    expected = ratio**2 + (1 - ratio) ** 2
    assert abs(agree - expected) < 0.02


def test_masks_are_reproducible_and_keyed():
    base = cell_mask(448, 448, 0.6, 14, **KEY)
    assert np.array_equal(base, cell_mask(448, 448, 0.6, 14, **KEY))
    for change in ({"step": 8}, {"prompt_id": 43}, {"seed": 1235}, {"prompt_id": "42"}):
        other = cell_mask(448, 448, 0.6, 14, **{**KEY, **change})
        assert not np.array_equal(base, other), change
    assert not np.array_equal(base, cell_mask(448, 448, 0.6, 14, **KEY, image_index=1))
    # numpy integers are the same ids as Python ints (ids often come out of arrays).
    assert np.array_equal(base, cell_mask(448, 448, 0.6, 14, 1234, np.int64(7), np.int32(42)))
    with pytest.raises(TypeError):
        mask_key(1, 2, 3.5)


def test_golden_mask():
    """A fixed key gives a fixed mask on every machine and numpy version (SHAKE-256 stream)."""
    expected = [[0, 0, 1, 0, 1], [0, 1, 1, 0, 1], [0, 0, 0, 1, 0], [1, 0, 0, 0, 0]]
    assert cell_mask(56, 70, 0.5, 14, **KEY).astype(int).tolist() == expected


def test_threshold_extremes():
    assert not bernoulli((1000,), 0.0, b"k").any()
    assert bernoulli((1000,), 1.0, b"k").all()
    with pytest.raises(ValueError, match="ratio"):
        bernoulli((3,), 1.5, b"k")


def test_cell_grid_includes_partial_cells():
    assert cell_grid(28, 28, 14) == (2, 2)
    assert cell_grid(29, 41, 14) == (3, 3)
    assert cell_grid(1, 1, 14) == (1, 1)
    with pytest.raises(ValueError):
        cell_grid(10, 10, 0)


@pytest.mark.parametrize("height,width,cell", [(448, 448, 14), (31, 45, 14), (100, 37, 9), (5, 5, 14)])
def test_pixel_mask_blackens_exactly_the_drawn_cells(height, width, cell):
    arr = nonzero_rgb(height, width)
    out = mask_array_pixels(arr, 0.6, cell, **KEY)
    cells = cell_mask(height, width, 0.6, cell, **KEY)
    assert out.shape == arr.shape and out.dtype == np.uint8
    for r, c in np.ndindex(*cells.shape):
        window = (slice(r * cell, (r + 1) * cell), slice(c * cell, (c + 1) * cell))
        if cells[r, c]:
            assert not out[window].any()
        else:
            assert np.array_equal(out[window], arr[window])
    # Pixel-weighted fraction: partial edge cells count by their area.
    area = expand_cells(cells.astype(np.uint8), height, width, cell)
    assert black_pixel_fraction(out) == pytest.approx(float(area.mean()))


def test_mask_does_not_modify_input():
    arr = nonzero_rgb(64, 64)
    before = arr.copy()
    mask_array_pixels(arr, 1.0, 14, **KEY)
    assert np.array_equal(arr, before)


def test_ratio_zero_and_one():
    arr = nonzero_rgb(50, 70)
    assert np.array_equal(mask_array_pixels(arr, 0.0, 14, **KEY), arr)
    assert not mask_array_pixels(arr, 1.0, 14, **KEY).any()
    img = Image.fromarray(arr)
    assert np.array_equal(rgb_array(mask_image_pixels(img, 0.0, 14, **KEY)), arr)
    assert black_pixel_fraction(mask_image_pixels(img, 1.0, 14, **KEY)) == 1.0


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "LA"])
def test_mask_image_pixels_keeps_size_and_masks_black(mode):
    rgb = nonzero_rgb(45, 61, seed=2)
    img = Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])) if mode == "RGBA" else None
    img = img or Image.fromarray(rgb).convert(mode)
    masked = mask_image_pixels(img, 0.6, 14, **KEY)
    assert masked.size == img.size and masked.mode == "RGB"
    cells = expand_cells(cell_mask(45, 61, 0.6, 14, **KEY).astype(np.uint8), 45, 61, 14).astype(bool)
    out = np.asarray(masked)
    assert not out[cells].any()  # black, not the white an alpha of 0 would composite to
    assert np.array_equal(out[~cells], rgb_array(img)[~cells])


def test_pixel_mode_keeps_grid_and_tokens():
    img = Image.fromarray(nonzero_rgb(333, 517))
    clean = process_image(img)
    masked = process_image(mask_image_pixels(img, 0.6, 14, **KEY))
    assert torch.equal(clean.grid_thw, masked.grid_thw)
    assert clean.pixel_values.shape == masked.pixel_values.shape
    assert not torch.equal(clean.pixel_values, masked.pixel_values)


def test_patch_mask_sets_normalised_black_and_keeps_the_rest():
    out = process_array(nonzero_rgb(200, 300, seed=1))
    values, grid = out.pixel_values, out.grid_thw
    masked = mask_patches(values, grid, 0.6, **KEY)
    rows = torch.from_numpy(patch_mask(grid, 0.6, **KEY))
    assert masked.shape == values.shape and masked.dtype == values.dtype
    assert 0 < rows.sum() < rows.numel()
    black_rows = process_image(Image.new("RGB", (56, 56))).pixel_values[0]
    assert torch.equal(masked[rows], black_rows.expand(int(rows.sum()), -1))
    assert torch.equal(masked[~rows], values[~rows])
    assert torch.equal(values, out.pixel_values)  # input untouched
    assert np.array_equal(black_rows.view(3, -1)[:, 0].numpy(), normalised_black())


def test_patch_mask_extremes_and_bf16():
    out = process_array(nonzero_rgb(112, 56))
    assert torch.equal(mask_patches(out.pixel_values, out.grid_thw, 0.0, **KEY), out.pixel_values)
    black = torch.from_numpy(np.repeat(normalised_black(), 2 * 14 * 14))
    all_black = mask_patches(out.pixel_values, out.grid_thw, 1.0, **KEY)
    assert torch.equal(all_black, black.expand_as(all_black))
    bf16 = mask_patches(out.pixel_values.bfloat16(), out.grid_thw, 1.0, **KEY)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, black.bfloat16().expand_as(bf16))


def test_patch_mode_equals_pixel_mode_when_cells_are_patches():
    """No resize (448 = 16 * 28) and cell = patch = 14: both modes black out the same squares.

    This pins the patch mask's raster -> merge-grouped row reordering.
    """
    arr = nonzero_rgb(448, 448, seed=8)
    via_pixels = process_array(mask_array_pixels(arr, 0.6, 14, **KEY)).pixel_values
    clean = process_array(arr)
    via_patches = mask_patches(clean.pixel_values, clean.grid_thw, 0.6, **KEY)
    assert torch.equal(via_pixels, via_patches)


def test_patch_mask_several_images():
    a, b = process_array(nonzero_rgb(56, 112)), process_array(nonzero_rgb(84, 56, seed=1))
    values = torch.cat([a.pixel_values, b.pixel_values])
    grids = torch.stack([a.grid_thw, b.grid_thw])
    masked = mask_patches(values, grids, 0.5, **KEY)
    first = mask_patches(a.pixel_values, a.grid_thw, 0.5, **KEY)
    assert torch.equal(masked[: a.num_patches], first)  # image 0 draws as a single image would
    rows_b = torch.from_numpy(patch_mask(b.grid_thw, 0.5, **KEY, image_index=1))
    assert torch.equal(masked[a.num_patches :][~rows_b], b.pixel_values[~rows_b])
    with pytest.raises(ValueError, match="patches"):
        mask_patches(values[:-4], grids, 0.5, **KEY)
