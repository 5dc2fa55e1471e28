"""Image pipeline throughput: decode + mask + resize + patchify, samples per second per core.

    .venv/bin/python tools/bench_data.py [--size 448 448] [--samples 150] [--profile]

Generates three PNGs in memory (uniform noise, a noisy gradient "photo", a smooth gradient)
and runs, single-threaded, what a loader does per sample:

    ours:          decode_image -> rgb_array -> mask_array_pixels -> process_array
    transformers:  decode_image -> mask_image_pixels -> Qwen2VLImageProcessorPil (slow PIL path)

plus both views (clean and masked, one decode) and each pipeline without the decode. Per-stage
CPU costs per content kind come first; --profile adds cProfile's top functions (CPU time).

Throughput is samples per CPU-second of this process (time.process_time), so other load on a
shared machine inflates it less than wall time would; the median of --rounds is reported.
The figure for the spec'd pipeline (one masked view) is printed last as `samples/s/core: X`.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from papo_mega.data.image import decode_image, process_array, process_image, rgb_array
from papo_mega.data.masking import mask_array_pixels, mask_image_pixels

warnings.filterwarnings("ignore")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--size", type=int, nargs=2, default=(448, 448), metavar=("H", "W"), help="source image size"
    )
    p.add_argument("--samples", type=int, default=150, help="samples per timed round")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (median reported)")
    p.add_argument("--ratio", type=float, default=0.6, help="mask ratio")
    p.add_argument("--cell", type=int, default=14, help="mask cell in pixels")
    p.add_argument("--min-pixels", type=int, default=56 * 56)
    p.add_argument("--max-pixels", type=int, default=28 * 28 * 1280)
    p.add_argument("--profile", action="store_true", help="cProfile our pipeline and print the top functions")
    p.add_argument("--no-reference", action="store_true", help="skip the transformers reference")
    return p.parse_args(argv)


def make_pngs(height: int, width: int, seed: int = 0) -> dict[str, bytes]:
    """PNG bytes (Pillow's default compression) of three kinds of content, worst case first."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    smooth = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 255 // (height + width)], -1)
    images = {
        "noise": rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
        "photo": np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8),
        "smooth": smooth.astype(np.uint8),
    }
    out = {}
    for name, arr in images.items():
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        out[name] = buf.getvalue()
    return out


def rate(fn: Callable[[bytes, int], object], inputs: list[bytes], samples: int, rounds: int) -> float:
    """Median samples per CPU-second of fn(data, prompt_id) over `rounds` rounds of `samples`."""
    fn(inputs[0], 0)  # warm-up: first-call imports and allocations
    rates = []
    for _ in range(rounds):
        start = time.process_time()
        for i in range(samples):
            fn(inputs[i % len(inputs)], i)
        rates.append(samples / (time.process_time() - start))
    return statistics.median(rates)


def pipelines(args: argparse.Namespace) -> dict[str, Callable[[bytes, int], object]]:
    """Name -> fn(png_bytes, prompt_id): the full pipelines and each stage on its own."""
    lim = {"min_pixels": args.min_pixels, "max_pixels": args.max_pixels}
    mask = {"ratio": args.ratio, "cell": args.cell, "seed": 1234, "step": 1}

    def masked_view(data: bytes, pid: int):
        arr = rgb_array(decode_image(data))
        return process_array(mask_array_pixels(arr, prompt_id=pid, **mask), **lim)

    def both_views(data: bytes, pid: int):
        img = decode_image(data)  # the clean view resizes the PIL image directly (one copy less)
        masked = mask_array_pixels(rgb_array(img), prompt_id=pid, **mask)
        return process_image(img, **lim), process_array(masked, **lim)

    decoded: dict[bytes, np.ndarray] = {}  # bytes cache their hash: the lookup is O(1)

    def no_decode(data: bytes, pid: int):
        arr = decoded.get(data)
        if arr is None:
            arr = decoded[data] = rgb_array(decode_image(data))
        return process_array(mask_array_pixels(arr, prompt_id=pid, **mask), **lim)

    return {
        "ours: decode+mask+resize+patchify": masked_view,
        "ours: decode + clean and masked views": both_views,
        "ours: mask+resize+patchify of decoded RGB (no decode)": no_decode,
    }


def stage_costs(data: bytes, args: argparse.Namespace, reps: int = 100) -> dict[str, float]:
    """CPU milliseconds per call of each stage on one input."""
    img = decode_image(data)
    arr = rgb_array(img)
    mask = {"ratio": args.ratio, "cell": args.cell, "seed": 1234, "step": 1, "prompt_id": 0}
    stages = {
        "decode_image (PNG)": lambda: decode_image(data),
        "rgb_array": lambda: rgb_array(img),
        "mask_array_pixels": lambda: mask_array_pixels(arr, **mask),
        "process_array (resize+patchify)": lambda: process_array(arr, args.min_pixels, args.max_pixels),
    }
    costs = {}
    for name, fn in stages.items():
        fn()
        start = time.process_time()
        for _ in range(reps):
            fn()
        costs[name] = (time.process_time() - start) / reps * 1e3
    return costs


def reference_pipelines(args: argparse.Namespace) -> dict[str, Callable[[bytes, int], object]]:
    """transformers' slow PIL processor on the same masked images, with and without the decode."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    proc = Qwen2VLImageProcessorPil(min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    decoded: dict[bytes, Image.Image] = {}

    def with_decode(data: bytes, pid: int):
        img = mask_image_pixels(decode_image(data), args.ratio, args.cell, 1234, 1, pid)
        return proc(images=img, return_tensors="np")

    def no_decode(data: bytes, pid: int):
        img = decoded.get(data) or decoded.setdefault(data, decode_image(data))
        return proc(images=mask_image_pixels(img, args.ratio, args.cell, 1234, 1, pid), return_tensors="np")

    return {"decode+mask+processor": with_decode, "mask+processor (no decode)": no_decode}


def profile(fn: Callable[[bytes, int], object], inputs: list[bytes], samples: int, top: int = 12) -> None:
    prof = cProfile.Profile(time.process_time)  # CPU time, like the figures (not wall time)
    prof.enable()
    for i in range(samples):
        fn(inputs[i % len(inputs)], i)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    height, width = args.size
    pngs = make_pngs(height, width)
    inputs = list(pngs.values())
    print(
        f"source {height}x{width}: " + ", ".join(f"{k} PNG {len(v) / 1024:.0f} KiB" for k, v in pngs.items())
    )
    print("CPU ms per call, per content kind:")
    for kind, data in pngs.items():
        print(f"  {kind:6s} " + "  ".join(f"{k} {v:.2f}" for k, v in stage_costs(data, args).items()))
    ours = pipelines(args)
    rates = {name: rate(fn, inputs, args.samples, args.rounds) for name, fn in ours.items()}
    main_name = next(iter(ours))
    if not args.no_reference:
        ours_names = list(ours)
        for (name, fn), mine in zip(reference_pipelines(args).items(), (ours_names[0], ours_names[2])):
            ref = rate(fn, inputs, max(args.samples // 4, 10), args.rounds)
            print(
                f"transformers slow (PIL), {name}: {ref:.1f} samples/s/core, ours {rates[mine] / ref:.2f}x that"
            )
    if args.profile:
        profile(ours[main_name], inputs, args.samples)
    for name, value in rates.items():
        print(f"{name}: {value:.1f} samples/s/core")
    print(f"samples/s/core: {rates[main_name]:.1f}")


if __name__ == "__main__":
    main()
