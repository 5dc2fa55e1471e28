"""Qwen2.5-VL image preprocessing in plain PIL/numpy/torch.

Equal to transformers' slow PIL processor (`Qwen2VLImageProcessorPil`, which Qwen2.5-VL reuses):

    bytes --decode_image--> PIL --to_rgb--> uint8 (H, W, 3) --smart_resize + PIL bicubic-->
    uint8 (h, w, 3) --patchify_normalise--> float32 (P, 3*2*14*14), grid_thw (1, h/14, w/14)

The result is bitwise equal to transformers' (tests/unit/test_image.py checks <= 1e-5), and
5-9x cheaper without the decode (tools/bench_data.py): transformers rescales in float64 and
normalises and transposes the whole image in floats; here the reorder runs on uint8 (1 byte per
value), the float work is three float32 passes, and the temporal duplication one broadcast copy.

    img = decode_image(png_bytes)
    out = process_image(img, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
    out.pixel_values  # float32 [P, 1176], rows grouped by 2x2 merge unit like transformers
    out.grid_thw      # int64 [3] = (1, h/14, w/14)
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

# transformers.image_utils.OPENAI_CLIP_MEAN / OPENAI_CLIP_STD (the Qwen2-VL processor defaults).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Decode guard: a few-KB file can declare a gigapixel canvas. 64 Mi pixels (e.g. 8192 x 8192) is
# far above anything max_pixels keeps, and below Pillow's own warning threshold (~89 M).
DEFAULT_MAX_IMAGE_PIXELS = 64 * 1024 * 1024

# transformers rejects extreme aspect ratios (the resized image would be a sliver of patches).
MAX_ASPECT_RATIO = 200


class BadImage(ValueError):
    """An image that cannot be used: corrupt, truncated, empty, absurdly large or of extreme shape.

    The message names the reason; a data loader skips the sample and counts it.
    """


@dataclass(frozen=True)
class ProcessedImage:
    """One image ready for the vision tower.

    pixel_values: float32 [P, C * T * patch * patch], P = t * h * w patches, rows ordered like
        transformers (each merge_size x merge_size block of neighbouring patches is contiguous).
    grid_thw: int64 [3] = (t, h, w) in patches (t = 1 for an image).
    """

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    merge_size: int = 2

    @property
    def num_patches(self) -> int:
        return int(self.pixel_values.shape[0])

    @property
    def num_tokens(self) -> int:
        """Language-model placeholder tokens: patches after the merge_size^2 patch merger."""
        return self.num_patches // (self.merge_size * self.merge_size)


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """(height, width) divisible by `factor`, area within [min_pixels, max_pixels], aspect kept.

    A literal copy of transformers' `smart_resize` (Python's banker's rounding included, so that
    the patch grid matches exactly); extreme aspect ratios and empty sizes raise BadImage.
    """
    if height <= 0 or width <= 0:
        raise BadImage(f"image has an empty size {width}x{height}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise BadImage(
            f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got "
            f"{max(height, width) / min(height, width)} ({width}x{height})"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB, the way transformers' `convert_to_rgb` does it.

    Images with an alpha band (LA, RGBA, PA, ...) or a transparency key (P or RGB with tRNS) are
    composited onto white; everything else (L, P, CMYK, I;16, 1, ...) uses Pillow's convert.
    Note: like transformers, Pillow clips 16-bit values to 255 rather than scaling them.
    """
    has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # convert() to the same mode copies; an RGB image is already what we want.
    return img if img.mode == "RGB" else img.convert("RGB")


def rgb_array(img: Image.Image) -> np.ndarray:
    """PIL image (any mode) -> uint8 [H, W, 3] (read-only; copy before writing)."""
    return np.asarray(to_rgb(img))


def resize_array(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [height, width, 3] with Pillow bicubic (transformers' resample).

    Pillow returns an unchanged copy when the size already matches, so skipping it is exact.
    """
    if arr.shape[:2] == (height, width):
        return arr
    resized = Image.fromarray(arr).resize((width, height), resample=Image.Resampling.BICUBIC)
    return np.asarray(resized)


def _norm_constants(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """float32 [C, 1] mean and std, the dtype transformers' `normalize` casts them to."""
    return (
        np.asarray(mean, dtype=np.float32).reshape(-1, 1),
        np.asarray(std, dtype=np.float32).reshape(-1, 1),
    )


def normalised_black(
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN, std: tuple[float, ...] = OPENAI_CLIP_STD
) -> np.ndarray:
    """float32 [C]: the processed value of a pixel equal to 0, (0 - mean) / std per channel."""
    m, s = _norm_constants(mean, std)
    return ((np.zeros_like(m) - m) / s).reshape(-1)


def patchify_normalise(
    arr: np.ndarray,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN,
    std: tuple[float, ...] = OPENAI_CLIP_STD,
) -> np.ndarray:
    """uint8 [H, W, C] (H, W multiples of patch*merge) -> float32 [P, C*T*patch*patch].

    Row order and values match transformers: patches grouped by merge unit (gh/m, gw/m, m, m),
    each row laid out (C, T, patch, patch) with the single frame repeated T times.
    Values: transformers computes float32(float64(u) / 255), then (x - mean) / std in float32;
    float32(u) / float32(255) is the same float for all 256 u (a unit test checks it), so the
    result is bitwise identical while never touching float64.
    """
    height, width, channels = arr.shape
    unit = patch_size * merge_size
    if height % unit or width % unit:
        raise ValueError(
            f"image {width}x{height} is not a multiple of patch*merge = {unit}; smart_resize first"
        )
    gh, gw, m, p = height // patch_size, width // patch_size, merge_size, patch_size
    # Reorder while still uint8 (a quarter of the bytes of float32). One 7-D transpose would
    # run its innermost loop over only p strided pixels; two steps with long or opaque inner
    # items measured ~10% less for this whole function:
    # 1. move each patch row (p pixels x C channels, contiguous bytes) as one opaque item;
    rows = np.ascontiguousarray(arr).reshape(height, gw, p * channels).view(f"V{p * channels}")
    rows = rows.reshape(gh // m, m, p, gw // m, m).transpose(0, 3, 1, 4, 2)  # (gh/m, gw/m, m, m, p)
    pixels = rows.copy().view(np.uint8).reshape(gh * gw, p * p, channels)
    # 2. de-interleave channels: [P, p*p, C] -> [P, C, p*p], inner loops p*p long.
    planar = pixels.transpose(0, 2, 1).copy()
    mean_c, std_c = _norm_constants(mean, std)
    x = np.divide(planar, np.float32(255), dtype=np.float32)  # cast and rescale in one pass
    x -= mean_c
    x /= std_c
    out = np.empty((gh * gw, channels, temporal_patch_size, p * p), dtype=np.float32)
    out[...] = x[:, :, None, :]
    return out.reshape(gh * gw, channels * temporal_patch_size * p * p)


def _grid(grid_h: int, grid_w: int) -> torch.Tensor:
    """int64 [3] = (1, grid_h, grid_w); via numpy: ~3 us instead of torch.tensor(list)'s ~7 us."""
    return torch.from_numpy(np.array([1, grid_h, grid_w], dtype=np.int64))


def process_array(
    arr: np.ndarray,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
) -> ProcessedImage:
    """uint8 RGB [H, W, 3] -> ProcessedImage (smart resize, bicubic, normalise, patchify)."""
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] RGB array, got {arr.dtype} {list(arr.shape)}")
    height, width = smart_resize(arr.shape[0], arr.shape[1], patch_size * merge_size, min_pixels, max_pixels)
    arr = resize_array(arr, height, width)
    values = patchify_normalise(arr, patch_size, merge_size, temporal_patch_size)
    grid = _grid(height // patch_size, width // patch_size)
    return ProcessedImage(torch.from_numpy(values), grid, merge_size)


def process_image(
    img: Image.Image,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
) -> ProcessedImage:
    """PIL image (any mode) -> ProcessedImage, equal to transformers' Qwen2VLImageProcessorPil.

    pixel_values float32 [P, 3*T*patch^2]; grid_thw int64 [3] (transformers returns [1, 3]).
    """
    rgb = to_rgb(img)
    height, width = smart_resize(rgb.height, rgb.width, patch_size * merge_size, min_pixels, max_pixels)
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), resample=Image.Resampling.BICUBIC)
    values = patchify_normalise(np.asarray(rgb), patch_size, merge_size, temporal_patch_size)
    grid = _grid(height // patch_size, width // patch_size)
    return ProcessedImage(torch.from_numpy(values), grid, merge_size)


def decode_image(
    data: bytes, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, exif_transpose: bool = True
) -> Image.Image:
    """Encoded bytes (PNG, JPEG, WebP, GIF, ...) -> a fully loaded PIL image in its own mode.

    Raises BadImage (with the reason) for empty, unreadable, corrupt or truncated data, and for
    canvases over `max_image_pixels` - checked from the header before any pixel is decoded.
    Multi-frame files give their first frame. exif_transpose applies the EXIF orientation, as
    transformers' `load_image` does. Pillow's own bomb guard (~179 M pixels) still applies above.
    """
    if not data:
        raise BadImage("empty image bytes")
    try:
        with warnings.catch_warnings():
            # We apply our own, configurable limit; Pillow's warning would only duplicate it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # Pillow warns (e.g. "Corrupt EXIF data") about metadata it skips; bad pixel data
            # raises instead. A warning per sample would flood a loader's log.
            warnings.simplefilter("ignore", UserWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width <= 0 or height <= 0:
                raise BadImage(f"image declares an empty size {width}x{height}")
            if width * height > max_image_pixels:
                raise BadImage(
                    f"image is {width}x{height} = {width * height} pixels, over max_image_pixels={max_image_pixels}"
                )
            img.load()
    except BadImage:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow plugins raise many types on malformed data
        raise BadImage(f"cannot decode image ({len(data)} bytes): {type(exc).__name__}: {exc}") from exc
    if exif_transpose:
        # Broken metadata on good pixels: keep the pixels as stored, without a warning per sample.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ImageOps.exif_transpose(img, in_place=True)
            except Exception:  # noqa: BLE001
                pass
    return img
