#!/usr/bin/env python
"""Training-step speed of our Qwen2.5-VL (megatron-core) against transformers', CPU, one run.

    .venv/bin/python tools/bench_vlm.py [--preset tiny] [--iters 20]   (or: tools/bench_model.py --vlm)

Builds a random transformers Qwen2.5-VL of the preset's shape, converts its weights into our
model (the production converter's mapping), checks both give the same logits on a batch of two
sequences with one image each, then times forward+backward (interleaved, median) and prints
`vlm mcore/transformers speed ratio: <x>` last (> 1 means ours is faster).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")

from papo_mega.config import load_config  # noqa: E402
from papo_mega.convert.hf_config import hf_config_kwargs  # noqa: E402
from papo_mega.convert.hf_to_mcore import fill_from_hf  # noqa: E402
from papo_mega.convert.parity import build_probe_inputs  # noqa: E402
from papo_mega.convert.safetensors_io import SafetensorsReader  # noqa: E402
from papo_mega.distributed import init_distributed, shutdown_distributed  # noqa: E402
from papo_mega.models.qwen_vl import build_model_chunks  # noqa: E402


def hf_model_of(cfg, directory: Path):
    """A random transformers Qwen2.5-VL with our config's shape, saved to `directory`."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(**hf_config_kwargs(cfg.model, cfg.vision))
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.save_pretrained(directory)
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(directory, dtype=torch.float32,
                                                              attn_implementation="sdpa")


def steps(cfg, ours, theirs, inputs):
    """One forward+backward callable per side on the same tokens and images."""
    labels = torch.roll(inputs.input_ids, -1, dims=1)
    real = inputs.attention_mask.float()
    mm = (inputs.input_ids == cfg.model.image_token_id).int()

    def ours_step():
        loss = ours(inputs.input_ids, inputs.position_ids, labels=labels, pixel_values=inputs.pixel_values,
                    image_grid_thw=inputs.image_grid_thw)
        ((loss * real).sum() / real.sum()).backward()

    def theirs_step():
        out = theirs(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, pixel_values=inputs.pixel_values,
                     image_grid_thw=inputs.image_grid_thw, mm_token_type_ids=mm, labels=inputs.input_ids)
        out.loss.backward()

    return ours_step, theirs_step


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(None, [f"preset={args.preset}"])
    groups = init_distributed({})
    with tempfile.TemporaryDirectory() as tmp:
        theirs = hf_model_of(cfg, Path(tmp))
        (ours,) = build_model_chunks(cfg.model, cfg.vision, groups, initialise=False)
        fill_from_hf([ours], groups, SafetensorsReader(tmp), cfg.model, cfg.vision, torch.float32, False)
    inputs = build_probe_inputs(cfg.model, cfg.vision, seed=3)
    with torch.no_grad():
        from papo_mega.convert.parity import max_abs_logit_diff

        mine = ours(inputs.input_ids, inputs.position_ids, pixel_values=inputs.pixel_values,
                    image_grid_thw=inputs.image_grid_thw)[..., : cfg.model.vocab_size]
        ref = theirs(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                     pixel_values=inputs.pixel_values, image_grid_thw=inputs.image_grid_thw,
                     mm_token_type_ids=(inputs.input_ids == cfg.model.image_token_id).int()).logits
    print(f"preset {args.preset}, {args.threads} threads, batch {tuple(inputs.input_ids.shape)}, "
          f"{len(inputs.image_grid_thw)} images; same function: max |logit diff| "
          f"{max_abs_logit_diff(mine, ref, inputs.attention_mask):.2e}")
    runs = dict(zip(("mcore", "transformers"), steps(cfg, ours, theirs, inputs)))
    models = {"mcore": ours, "transformers": theirs}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(args.warmup + args.iters):
        for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
            models[name].zero_grad(set_to_none=True)
            start = time.perf_counter()
            runs[name]()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    median = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    for name, ms in median.items():
        print(f"{name:14s} forward+backward median {ms:8.2f} ms  min {min(times[name]) * 1e3:8.2f} ms")
    shutdown_distributed()
    print(f"vlm mcore/transformers speed ratio: {median['transformers'] / median['mcore']:.2f}x")


if __name__ == "__main__":
    main()
