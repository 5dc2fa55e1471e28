#!/usr/bin/env python
"""Convert a Hugging Face Qwen2.5-VL checkpoint into a megatron-core distributed checkpoint.

    python tools/convert_hf_to_mcore.py --hf HF_DIR --out CKPT_DIR --tp 2 --pp 2

Runs tp*pp ranks (local processes, or the ranks of torchrun/srun/mpirun when launched by one);
each reads only the tensors it holds. The result loads at any layout.
"""

from __future__ import annotations

import argparse
import sys
import time

from papo_mega.convert.hf_config import configs_from_hf, read_hf_config
from papo_mega.convert.hf_to_mcore import convert_rank
from papo_mega.convert.jobs import run_job, run_tool
from papo_mega.convert.mcore_to_hf import check_output_dir
from papo_mega.convert.safetensors_io import SafetensorsReader
from papo_mega.distributed.layout import ParallelLayout


def convert(args) -> int:
    check_output_dir(args.out)
    model, vision, dtype = configs_from_hf(read_hf_config(args.hf))
    SafetensorsReader(args.hf)  # fail on missing shards before starting any process
    layout = ParallelLayout(tp_size=args.tp, pp_size=args.pp, world_size=args.tp * args.pp)
    layout.check_model(num_layers=model.num_layers, num_attention_heads=model.num_attention_heads,
                       num_query_groups=model.num_query_groups, vocab_size=model.padded_vocab_size)
    if vision.num_heads % args.tp:
        from papo_mega.errors import LayoutError

        raise LayoutError(f"{vision.num_heads} vision heads are not divisible by --tp {args.tp}; choose a divisor")
    start = time.perf_counter()
    result = run_job(convert_rank, args.tp * args.pp, (args.hf, args.out, {"tp_size": args.tp, "pp_size": args.pp}),
                     args.timeout)[0]
    seconds = time.perf_counter() - start
    gib = result["hf_bytes"] / 2**30
    print(f"converted {args.hf} ({gib:.3f} GiB, {dtype}) -> {args.out} at {result['layout']}")
    files = result["tokenizer_files"]
    print(f"tokenizer: {', '.join(files)} copied into {args.out}/tokenizer" if files else
          f"tokenizer: none in {args.hf} (no tokenizer.json); eval and training need data.tokenizer=PATH/tokenizer.json")
    growth = result["peak_rss_growth"]
    print(f"seconds {seconds:.1f}  seconds_per_GiB {seconds / max(gib, 1e-9):.1f}  "
          f"peak_rss_GiB {result['peak_rss'] / 2**30:.3f} (per rank; {growth / 2**30:.3f} above the "
          f"process baseline = {growth / result['hf_bytes']:.2f}x the model size)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf", required=True, help="Hugging Face model directory (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="new directory for the megatron checkpoint")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to convert at")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to convert at")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds before a stuck job is stopped")
    args = parser.parse_args(argv)
    return run_tool("convert_hf_to_mcore", lambda: convert(args))


if __name__ == "__main__":
    sys.exit(main())
