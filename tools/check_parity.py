#!/usr/bin/env python
"""Logits parity: transformers' Qwen2.5-VL vs our megatron-core model at a TP/PP layout.

    python tools/check_parity.py --hf HF_DIR --ckpt CKPT_DIR --tp 2 --pp 2

Prints `max_abs_logit_diff <value>` as its last line; exits 0 only within tolerance.
"""

from __future__ import annotations

import argparse
import sys

from papo_mega.convert.hf_config import configs_from_hf, read_hf_config
from papo_mega.convert.hf_to_mcore import read_metadata
from papo_mega.convert.jobs import run_job, run_tool
from papo_mega.convert.parity import (
    build_probe_inputs,
    hf_logits,
    max_abs_logit_diff,
    our_logits_rank,
    shape_differences,
)
from papo_mega.errors import PapoError

FP32_TOLERANCE = 1e-4


def check(args) -> int:
    _, model, vision = read_metadata(args.ckpt)
    hf_model, hf_vision, _ = configs_from_hf(read_hf_config(args.hf))
    differ = shape_differences((hf_model, hf_vision), (model, vision))
    if differ:
        raise PapoError(f"{args.hf} and {args.ckpt} are different models ({'; '.join(differ)}); compare a "
                        f"checkpoint with the HF model it was converted from")
    inputs = build_probe_inputs(model, vision, seed=args.seed)
    theirs = hf_logits(args.hf, inputs, model.image_token_id)
    ours = run_job(our_logits_rank, args.tp * args.pp,
                   (args.ckpt, {"tp_size": args.tp, "pp_size": args.pp}, inputs), args.timeout)[0]
    diff = max_abs_logit_diff(ours, theirs, inputs.attention_mask)
    verdict = "ok" if diff <= args.tolerance else f"FAILED (tolerance {args.tolerance:g})"
    print(f"layout tp{args.tp} pp{args.pp}; {int(inputs.attention_mask.sum())} real tokens, "
          f"{len(inputs.image_grid_thw)} images; {verdict}")
    print(f"max_abs_logit_diff {diff:.3e}")
    return 0 if diff <= args.tolerance else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf", required=True, help="Hugging Face model directory")
    parser.add_argument("--ckpt", required=True, help="our checkpoint (from convert_hf_to_mcore.py)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="seed of the probe batch")
    parser.add_argument("--tolerance", type=float, default=FP32_TOLERANCE, help="max |logit diff| (fp32)")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args(argv)
    return run_tool("check_parity", lambda: check(args))


if __name__ == "__main__":
    sys.exit(main())
