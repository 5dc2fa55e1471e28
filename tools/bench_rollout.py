#!/usr/bin/env python
"""Rollout speed on CPU: our KV-cached MegatronEngine.generate against transformers' generate, one run.

    .venv/bin/python tools/bench_rollout.py [--quick] [--threads 1] [--repeats 5] [--profile]

Builds a random transformers Qwen2.5-VL of the preset's shape (matrices scaled by --weight-scale so
greedy output depends on the context), converts its weights into our model in the same process
(the production mapping, as tools/bench_vlm.py does) and times, with the same torch thread count
(transformers without CPU mode's TorchFunctionMode, as it runs on its own; also with it, for scale):

  A. 8 prompts with one image each x n=1, greedy, --new tokens: ours vs transformers' generate
     (KV cache, sdpa, the same left-padded batch, the vision special tokens banned on both sides);
  B. 2 prompts x n=4, sampling T=1: ours (prefill once per prompt, cache rows repeated G times) vs
     generate(do_sample, num_return_sequences=4), which runs the prompt through 8 rows;
  C. ours with the KV cache vs the same engine without it (every step a full prefill of prompt +
     tokens so far, vision tower included) at --long new tokens, greedy, 8 prompts.

No stop token anywhere: every row generates exactly the requested tokens. Medians and minima after
warm-up, runs interleaved; tok/s = generated tokens (rows x new) / whole call, prefill included.
--profile adds a cProfile breakdown of one call of ours (A). The ratios are printed last.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")

from papo_mega.config import RolloutConfig, load_config  # noqa: E402
from papo_mega.convert.hf_config import hf_config_kwargs  # noqa: E402
from papo_mega.convert.hf_to_mcore import fill_from_hf  # noqa: E402
from papo_mega.convert.parity import build_probe_inputs  # noqa: E402
from papo_mega.convert.safetensors_io import SafetensorsReader  # noqa: E402
from papo_mega.distributed import cpu_mode, init_distributed, shutdown_distributed  # noqa: E402
from papo_mega.models.qwen_vl import build_model_chunks  # noqa: E402
from papo_mega.rollout.engine import MegatronEngine  # noqa: E402
from papo_mega.types import RolloutPrompt  # noqa: E402

PAD_ID = 0


def build_models(cfg, directory: Path, weight_scale: float):
    """A random transformers Qwen2.5-VL of the config's shape and our model holding its weights."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    hf = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**hf_config_kwargs(cfg.model, cfg.vision)))
    with torch.no_grad():  # as tests/distributed/hf_fixtures.py: context-dependent greedy output
        for name, param in hf.named_parameters():
            if param.dim() >= 2 and "norm" not in name:
                param.mul_(weight_scale)
    hf.save_pretrained(directory)
    theirs = Qwen2_5_VLForConditionalGeneration.from_pretrained(directory, dtype=torch.float32,
                                                                attn_implementation="sdpa").eval()
    groups = init_distributed({})
    (ours,) = build_model_chunks(cfg.model, cfg.vision, groups, initialise=False)
    fill_from_hf([ours], groups, SafetensorsReader(str(directory)), cfg.model, cfg.vision, torch.float32, False)
    return theirs, ours.eval(), groups


def probe_prompts(cfg, count: int) -> list[RolloutPrompt]:
    """`count` prompts of 15-17 tokens with one image each (4x6 or 8x4 patches): the parity probe's rows."""
    prompts = []
    for seed in range((count + 1) // 2):
        probe = build_probe_inputs(cfg.model, cfg.vision, seed=seed)
        starts = [0, int(probe.image_grid_thw[0].prod())]
        for row in range(2):
            length, patches = int(probe.attention_mask[row].sum()), int(probe.image_grid_thw[row].prod())
            prompts.append(RolloutPrompt(probe.input_ids[row, :length].clone(),
                                         probe.pixel_values[starts[row] : starts[row] + patches],
                                         probe.image_grid_thw[row : row + 1]))
    return prompts[:count]


def hf_generate(theirs, cfg, prompts: list[RolloutPrompt], new: int, n: int, sample: bool) -> torch.Tensor:
    """transformers' generate on the prompts as one left-padded batch; the new tokens [rows, new]."""
    length = max(len(p.input_ids) for p in prompts)
    ids = torch.full((len(prompts), length), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, length - len(p.input_ids) :], mask[row, length - len(p.input_ids) :] = p.input_ids, 1
    m = cfg.model
    banned = [[t] for t in (m.image_token_id, m.video_token_id, m.vision_start_token_id, m.vision_end_token_id)]
    extra = dict(temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=n) if sample else {}
    pixels, grids = (torch.cat([getattr(p, key) for p in prompts]) for key in ("pixel_values", "image_grid_thw"))
    with torch.no_grad():
        out = theirs.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grids,
                              mm_token_type_ids=(ids == m.image_token_id).int(), max_new_tokens=new,
                              min_new_tokens=new, eos_token_id=None, pad_token_id=PAD_ID, bad_words_ids=banned,
                              use_cache=True, do_sample=sample, **extra)
    return out[:, length:]


def recompute_greedy(engine, prompts: list[RolloutPrompt], new: int) -> torch.Tensor:
    """Greedy decoding without a KV cache: each step is a fresh one-token generate (a full prefill)."""
    one = RolloutConfig(n=1, temperature=0.0, max_new_tokens=1)
    tokens = torch.empty(len(prompts), 0, dtype=torch.long)
    for t in range(new):
        grown = [RolloutPrompt(torch.cat([p.input_ids, tokens[row]]), p.pixel_values, p.image_grid_thw)
                 for row, p in enumerate(prompts)]
        tokens = torch.cat([tokens, engine.generate(grown, one, seed=0, step=t).response_ids], dim=1)
    return tokens


def interleaved(runs: dict, warmup: int, repeats: int) -> dict:
    """{name: (median s, min s, last result)}; each round calls every run once, in a rotated order,
    so none always runs on a warm (or a busy) machine. Names ending in 'transformers' run with
    CPU mode's TorchFunctionMode popped."""
    times, last = {name: [] for name in runs}, {}
    for i in range(warmup + repeats):
        names = list(runs)[i % len(runs):] + list(runs)[: i % len(runs)]
        for name in names:
            with cpu_mode.device_mode_off() if name.endswith("transformers") else contextlib.nullcontext():
                start = time.perf_counter()
                last[name] = runs[name]()
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t), min(t), last[name]) for name, t in times.items()}


# Where a call's time goes, cProfile cumulative time per function (nested rows overlap).
BREAKDOWN = [
    ("model forward (QwenVLChunk)", "qwen_vl.py", "forward"),
    ("  vision tower (prefill only)", "vision.py", "forward"),
    ("  self-attention block", "attention.py", "forward"),
    ("    QKV projection", "attention.py", "get_query_key_value_tensors"),
    ("    KV cache write/read", "attention.py", "_adjust_key_value_for_inference"),
    ("    rotary on q and every cached k", "rope_utils.py", "apply_rotary_pos_emb"),
    ("    core attention", "sdpa_attention.py", "forward"),
    ("      stock DotProductAttention path", "dot_product_attention.py", "forward"),
    ("  MLP", "mlp.py", "forward"),
    ("  RMSNorm (torch.nn)", "normalization.py", "forward"),
    ("  mrope table over all positions", "rotary_pos_embedding.py", "forward"),
    ("  output layer + last-token logits", "gpt_model.py", "_postprocess"),
    ("sampling", "sampling.py", "sample_tokens"),
    ("log-probs", "sampling.py", "token_logprobs"),
    ("broadcast to other stages", "engine.py", "_share_last_stage"),
]


def profile(fn, top: int = 25) -> None:
    """cProfile of one call: time by component, CPU mode's hook, then the top functions by own time."""
    prof = cProfile.Profile()
    prof.runcall(fn)
    stats = pstats.Stats(prof)
    total = max(ct for (_, _, _, ct, _) in stats.stats.values())
    print(f"--- cProfile of one call: {total * 1e3:.0f} ms under the profiler (it inflates Python-heavy parts) ---")
    ct, hook = {}, None
    for (file, _, func), (_, calls, own, cum, _) in stats.stats.items():
        key = (Path(file).name, func)
        ct[key] = max(ct.get(key, 0.0), cum)
        hook = (calls, own) if key == ("cpu_mode.py", "__torch_function__") else hook
    rows = [(label, ct.get((file, func), 0.0)) for label, file, func in BREAKDOWN]
    if ("forward.py", "run_schedule") in ct:  # megatron's schedule around the model call
        rows.append(("pipeline schedule bookkeeping", ct[("forward.py", "run_schedule")] - rows[0][1]))
    for label, seconds in rows + ([(f"CPU mode hook, {hook[0]} calls (own time only)", hook[1])] if hook else []):
        print(f"{label:46s} {seconds * 1e3:8.1f} ms {100 * seconds / total:5.1f} %")
    stats.strip_dirs().sort_stats("tottime").print_stats(top)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides (1: steadiest)")
    parser.add_argument("--new", type=int, default=64, help="new tokens per row for A and B")
    parser.add_argument("--long", type=int, default=256, help="new tokens per row for C (cache vs recompute)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--recompute-runs", type=int, default=2, help="runs of C without the cache (~15 s each)")
    parser.add_argument("--weight-scale", type=float, default=8.0)
    parser.add_argument("--profile", action="store_true", help="also cProfile one call of ours (A)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, 1 warm-up, C at 32 tokens")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.long, args.recompute_runs = 1, 1, 32, 1
    torch.set_num_threads(args.threads)
    cfg = load_config(None, [f"preset={args.preset}"])
    with tempfile.TemporaryDirectory() as tmp:
        theirs, ours, groups = build_models(cfg, Path(tmp), args.weight_scale)
    engine = MegatronEngine([ours], groups, cfg.model, cfg.vision.spatial_merge_size, [], PAD_ID)
    eight = probe_prompts(cfg, 8)
    greedy = RolloutConfig(n=1, temperature=0.0, max_new_tokens=args.new)
    step = iter(range(10**6))  # a new seed stream per call, as in training
    sampled = RolloutConfig(n=4, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.new)
    long_greedy = RolloutConfig(n=1, temperature=0.0, max_new_tokens=args.long)
    runs = {
        "A ours": lambda: engine.generate(eight, greedy, seed=0, step=next(step)).response_ids,
        "A transformers": lambda: hf_generate(theirs, cfg, eight, args.new, 1, sample=False),
        "A transformers, CPU mode on": lambda: hf_generate(theirs, cfg, eight, args.new, 1, sample=False),
        "B ours": lambda: engine.generate(eight[:2], sampled, seed=0, step=next(step)).response_ids,
        "B transformers": lambda: hf_generate(theirs, cfg, eight[:2], args.new, 4, sample=True),
        "C ours, KV cache": lambda: engine.generate(eight, long_greedy, seed=0, step=0).response_ids,
    }
    res = interleaved(runs, args.warmup, args.repeats)
    recompute = []
    for _ in range(args.recompute_runs):  # long: no warm-up (the cached runs above warmed up)
        start = time.perf_counter()
        recomputed = recompute_greedy(engine, eight, args.long)
        recompute.append(time.perf_counter() - start)
    res["C ours, recompute"] = (statistics.median(recompute), min(recompute), recomputed)
    for name, (_, _, out) in res.items():
        assert out.shape == (8, args.long if name.startswith("C") else args.new), (name, out.shape)
    if args.profile:
        profile(runs["A ours"])
    shutdown_distributed()

    same = (res["A ours"][2] == res["A transformers"][2]).float().mean().item()
    same_long = (res["C ours, KV cache"][2] == recomputed).float().mean().item()
    print(f"\npreset {args.preset}, torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} cpus, "
          f"load average {os.getloadavg()[0]:.1f}; prompts of {sorted({len(p.input_ids) for p in eight})} tokens "
          f"with one image each; median of {args.repeats} after {args.warmup} warm-up, runs interleaved")
    print(f"A greedy tokens equal to transformers': {same:.1%} ({len(set(res['A ours'][2].flatten().tolist()))} "
          f"distinct tokens); C tokens equal with and without the cache: {same_long:.1%}")
    for name, (med, low, out) in res.items():
        print(f"{name:30s} {med * 1e3:9.1f} ms  min {low * 1e3:9.1f} ms  {out.numel() / med:7.0f} tok/s "
              f"(max {out.numel() / low:5.0f})")
    ratio = {k: [res[f"{k} transformers"][i] / res[f"{k} ours"][i] for i in (0, 1)] for k in "AB"}
    speedup = [res["C ours, recompute"][i] / res["C ours, KV cache"][i] for i in (0, 1)]
    print(f"rollout KV cache speed-up over recompute at {args.long} new tokens: {speedup[0]:.1f}x "
          f"(minima: {speedup[1]:.1f}x)")
    print(f"rollout ours/transformers tok/s ratio: A {ratio['A'][0]:.2f}x, B {ratio['B'][0]:.2f}x "
          f"(minima: A {ratio['A'][1]:.2f}x, B {ratio['B'][1]:.2f}x)")


if __name__ == "__main__":
    main()
