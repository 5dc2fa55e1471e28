#!/usr/bin/env python
"""Convert a megatron-core checkpoint (from convert_hf_to_mcore.py or training) back to Hugging Face.

    python tools/convert_mcore_to_hf.py --ckpt CKPT_DIR --out HF_DIR

CKPT_DIR: a model directory (convert_hf_to_mcore.py output, RUN_DIR/final, sft output) or a training
checkpoint (RUN_DIR/checkpoints/step_N). The HF folder carries the model's tokenizer files.
"""

from __future__ import annotations

import argparse
import sys
import time

from papo_mega.convert.jobs import run_job, run_tool
from papo_mega.convert.mcore_to_hf import check_output_dir, export_rank
from papo_mega.model_dir import read_model_source


def export(args) -> int:
    check_output_dir(args.out)
    read_model_source(args.ckpt)  # a clear error before any process starts
    start = time.perf_counter()
    result = run_job(export_rank, 1, (args.ckpt, args.out), args.timeout)[0]
    tokenizer = result["tokenizer"] or "no tokenizer (none stored; copy the HF model's tokenizer files in)"
    print(f"exported {args.ckpt} -> {args.out}: {result['tensors']} tensors, {tokenizer}, "
          f"in {time.perf_counter() - start:.1f}s")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="model directory (papo_model.json + model/) or RUN_DIR/checkpoints/step_N")
    parser.add_argument("--out", required=True, help="new directory for the Hugging Face model")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds before a stuck job is stopped")
    args = parser.parse_args(argv)
    return run_tool("convert_mcore_to_hf", lambda: export(args))


if __name__ == "__main__":
    sys.exit(main())
