"""Image preprocessing: parity with transformers' slow (PIL) Qwen2-VL processor, resize rules, decoding."""

from __future__ import annotations

import functools
import io
import math
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from papo_mega.data.image import (
    OPENAI_CLIP_MEAN,
    BadImage,
    decode_image,
    normalised_black,
    patchify_normalise,
    process_array,
    process_image,
    rgb_array,
    smart_resize,
)

hf_qwen = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")

MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 1280


@functools.cache
def _hf_processor(min_pixels: int, max_pixels: int):
    return hf_qwen.Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


def hf_process(img: Image.Image, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS):
    """transformers' reference: pixel_values float32 [P, 1176], grid_thw int64 [3]."""
    out = _hf_processor(min_pixels, max_pixels)(images=img, return_tensors="np")
    return out["pixel_values"], out["image_grid_thw"][0]


def assert_parity(img: Image.Image, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> None:
    ours = process_image(img, min_pixels=min_pixels, max_pixels=max_pixels)
    ref_values, ref_grid = hf_process(img, min_pixels, max_pixels)
    assert ours.grid_thw.tolist() == ref_grid.tolist()
    assert ours.grid_thw.dtype == torch.long and ours.pixel_values.dtype == torch.float32
    assert ours.pixel_values.shape == ref_values.shape
    np.testing.assert_allclose(ours.pixel_values.numpy(), ref_values, rtol=0, atol=1e-5)


def noisy_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 [H, W, 3]: a smooth gradient plus noise (structure for bicubic, every value used)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // max(width, 1), yy * 255 // max(height, 1), (xx + yy) % 256], -1)
    return np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    "height,width",
    [
        (448, 448),
        (1, 1),
        (5, 3),
        (14, 14),
        (42, 70),
        (37, 91),
        (29, 57),
        (13, 2000),
        (2000, 13),
        (1100, 1000),
    ],
)
def test_parity_rgb_sizes(height, width):
    assert_parity(Image.fromarray(noisy_rgb(height, width, seed=height * 7 + width)))


def _image_in_mode(mode: str) -> Image.Image:
    rgb = noisy_rgb(61, 83, seed=3)
    rng = np.random.default_rng(4)
    alpha = rng.integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    if mode == "RGBA":
        return Image.fromarray(np.dstack([rgb, alpha]))
    if mode == "LA":
        return Image.fromarray(np.dstack([rgb[:, :, 0], alpha])).convert("LA")
    if mode == "I;16":
        # Values past 255 too: Pillow (and so transformers) clips them on the way to RGB.
        return Image.fromarray(rng.integers(0, 600, rgb.shape[:2], dtype=np.uint16))
    if mode == "P+transparency":
        pal = Image.fromarray(rgb).convert("P")
        pal.info["transparency"] = 5
        return pal
    if mode == "RGB+transparency":
        img = Image.fromarray(rgb)
        img.info["transparency"] = tuple(int(v) for v in rgb[0, 0])
        return img
    return Image.fromarray(rgb).convert(mode)


@pytest.mark.parametrize(
    "mode",
    [
        "L",
        "LA",
        "RGBA",
        "P",
        "PA",
        "P+transparency",
        "RGB+transparency",
        "CMYK",
        "I;16",
        "I",
        "F",
        "1",
        "YCbCr",
    ],
)
def test_parity_modes(mode):
    assert_parity(_image_in_mode(mode))


@pytest.mark.parametrize(
    "min_pixels,max_pixels,size",
    [
        (28 * 28 * 16, 28 * 28 * 64, (30, 40)),  # upscaled to reach min_pixels
        (28 * 28 * 16, 28 * 28 * 64, (900, 700)),  # downscaled under max_pixels
        (28 * 28 * 4, 28 * 28 * 4, (300, 500)),  # min == max (the aspect wins: 2x4 patches)
        (56 * 56, 12845056, (650, 750)),  # generous max: no resize beyond rounding
    ],
)
def test_parity_pixel_limits(min_pixels, max_pixels, size):
    img = Image.fromarray(noisy_rgb(*size, seed=size[0]))
    assert_parity(img, min_pixels, max_pixels)
    grid = process_image(img, min_pixels=min_pixels, max_pixels=max_pixels).grid_thw
    area = int(grid[1] * grid[2]) * 14 * 14
    assert area <= max_pixels
    if size[0] * size[1] < min_pixels:  # rounding down to whole patches may undershoot min otherwise
        assert area >= min_pixels


def test_smart_resize_matches_transformers():
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 5000, (1500, 2))]
    # Banker's rounding boundaries (x.5 patches), tiny and extreme-but-legal shapes.
    sizes += [(14, 14), (42, 42), (70, 98), (1, 200), (200, 1), (28, 5600), (3, 599), (1, 1)]
    for height, width in sizes:
        if max(height, width) / min(height, width) > 200:
            continue
        for lo, hi in [(MIN_PIXELS, MAX_PIXELS), (28 * 28 * 16, 28 * 28 * 64), (100, 200_000)]:
            assert smart_resize(height, width, 28, lo, hi) == hf_qwen.smart_resize(height, width, 28, lo, hi)


def test_smart_resize_contract():
    height, width = smart_resize(1000, 3000, 28, MIN_PIXELS, MAX_PIXELS)
    assert height % 28 == 0 and width % 28 == 0 and height * width <= MAX_PIXELS
    assert smart_resize(1, 1) == (56, 56)
    assert smart_resize(14, 14) == (56, 56)  # round(0.5) == 0, then grown to min_pixels
    with pytest.raises(BadImage, match="aspect ratio"):
        smart_resize(1, 201)
    with pytest.raises(ValueError):  # BadImage is a ValueError, like transformers' error
        smart_resize(2000, 5)
    with pytest.raises(BadImage, match="empty"):
        smart_resize(0, 10)


def test_rescale_in_float32_is_exact():
    """patchify_normalise divides in float32; transformers multiplies by 1/255 in float64."""
    values = np.arange(256)
    ref = (values.astype(np.float64) * (1 / 255)).astype(np.float32)
    assert np.array_equal(values.astype(np.float32) / np.float32(255), ref)


def test_bitwise_on_typical_image():
    img = Image.fromarray(noisy_rgb(300, 500, seed=9))
    ref_values, _ = hf_process(img)
    assert np.array_equal(process_image(img).pixel_values.numpy(), ref_values)


def test_process_array_equals_process_image():
    arr = noisy_rgb(123, 321, seed=5)
    a, b = process_array(arr), process_image(Image.fromarray(arr))
    assert torch.equal(a.pixel_values, b.pixel_values) and torch.equal(a.grid_thw, b.grid_thw)
    assert a.num_patches == 4 * a.num_tokens == int(a.grid_thw.prod())
    with pytest.raises(ValueError, match="uint8"):
        process_array(arr.astype(np.float32))


def test_normalised_black_is_processed_zero():
    values = process_image(Image.new("RGB", (56, 56))).pixel_values
    black = normalised_black()
    expected = np.repeat(black, 2 * 14 * 14)
    assert np.array_equal(values.numpy(), np.broadcast_to(expected, values.shape))
    assert np.allclose(
        black, -np.asarray(OPENAI_CLIP_MEAN) / np.asarray((0.26862954, 0.26130258, 0.27577711))
    )


def test_patchify_rejects_unaligned():
    with pytest.raises(ValueError, match="multiple"):
        patchify_normalise(np.zeros((30, 28, 3), np.uint8))


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_decode_round_trip(fmt):
    img = Image.fromarray(noisy_rgb(40, 50))
    data = _encode(img, fmt)
    decoded = decode_image(data)
    reference = Image.open(io.BytesIO(data))
    assert decoded.size == (50, 40)
    assert np.array_equal(rgb_array(decoded), rgb_array(reference))


def test_decode_applies_exif_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = _encode(Image.fromarray(noisy_rgb(40, 50)), "JPEG", exif=exif.tobytes())
    assert decode_image(data).size == (40, 50)
    assert decode_image(data, exif_transpose=False).size == (50, 40)


def test_decode_tolerates_corrupt_exif(recwarn):
    corrupt = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff\x01\x12"
    data = _encode(Image.fromarray(noisy_rgb(20, 30)), "JPEG", exif=corrupt)
    assert decode_image(data).size == (30, 20)
    assert not [w for w in recwarn if "EXIF" in str(w.message)]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_decode_truncated_raises(fmt):
    data = _encode(Image.fromarray(noisy_rgb(64, 64)), fmt)
    with pytest.raises(BadImage, match="cannot decode"):
        decode_image(data[: len(data) // 2])


@pytest.mark.parametrize(
    "data", [b"", b"not an image at all", bytes(range(256)) * 4, b"\x89PNG\r\n\x1a\n" + b"\0" * 40]
)
def test_decode_garbage_raises(data):
    with pytest.raises(BadImage):
        decode_image(data)


def _png_with_declared_size(width: int, height: int) -> bytes:
    """A valid small PNG whose IHDR claims another size (a decompression-bomb header)."""
    data = bytearray(_encode(Image.new("RGB", (8, 8)), "PNG"))
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def test_decode_bomb_guard():
    with pytest.raises(BadImage, match="max_image_pixels"):
        decode_image(_png_with_declared_size(12000, 12000))
    with pytest.raises(BadImage):  # past Pillow's own hard limit as well
        decode_image(_png_with_declared_size(100_000, 100_000), max_image_pixels=10**12)
    small = _encode(Image.fromarray(noisy_rgb(64, 64)), "PNG")
    with pytest.raises(BadImage, match="64x64 = 4096 pixels"):
        decode_image(small, max_image_pixels=4000)
    assert decode_image(small, max_image_pixels=4096).size == (64, 64)


def test_bad_image_is_value_error():
    assert issubclass(BadImage, ValueError)
    assert math.isfinite(float(process_image(Image.new("L", (3, 3))).pixel_values.sum()))
