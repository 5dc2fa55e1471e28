#!/usr/bin/env python
"""Costs of the PAPO algorithm pieces on CPU: two-view batching, chunked log-probs, loss overhead.

    .venv/bin/python tools/bench_algo.py [--quick] [--repeats 15] [--threads N]

Prints three figures last, each a ratio of two things measured in this run (docs/algorithm.md):

(a) two-view batching, tiny VLM preset, one process: `sequential / batched` time (> 1: batching
    wins). No-grad pass: compute_logprobs(views=(original, masked)) against compute_logprobs over
    (original,) plus over (masked,). Training step (masked_grad=true): one papo_forward_backward
    whose forward carries both views, against two papo_forward_backward calls of one view each
    (masked_grad=false: the original pixels, then the masked pixels in their place, masked_logp
    given). The baseline runs the same schedule, DDP and loss code as the batched step, so only
    the batching differs; it is what a second, separate forward+backward costs (the reference
    code's approach), not the same gradient.
(b) peak memory of vocab_parallel_logprobs(with_entropy=True), forward + backward of a loss on
    both outputs, against a naive float log_softmax / gather / -(p * log p).sum(-1); chunked/naive.
    CPU has no allocator peak counter: LiveBytes counts the storages ops create (checked first).
(c) compute_papo_loss forward + backward, PAPO terms on (masked_logp, prcp, both entropies, ref)
    against GRPO (ref only) on [B, T] tensors; papo/grpo. Then the PAPO/GRPO step cost on the
    tiny VLM from the timings of (a): old(+masked) pass + reference pass + update.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
import weakref
from dataclasses import replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# megatron-core warns about CUDA-only features at import and build time.
warnings.filterwarnings("ignore")

from papo_mega.algo.logprobs import vocab_parallel_logprobs  # noqa: E402
from papo_mega.algo.losses import compute_papo_loss  # noqa: E402
from papo_mega.algo.policy import attach_old_logprobs, compute_logprobs, papo_forward_backward  # noqa: E402
from papo_mega.algo.views import MASKED, ORIGINAL  # noqa: E402
from papo_mega.config import LossConfig, load_config  # noqa: E402
from papo_mega.distributed import init_distributed, shutdown_distributed  # noqa: E402
from papo_mega.models.qwen_vl import build_model_chunks  # noqa: E402
from papo_mega.models.rope_index import compute_mrope_position_ids  # noqa: E402
from papo_mega.optim import attach_grad_finalisation, wrap_ddp  # noqa: E402
from papo_mega.types import PolicyMicroBatch  # noqa: E402

MB = 2**20
PAPO = dict(kl_coef=0.01, prcp_coef=0.02, entropy_coef=0.05, masked_entropy_coef=0.05)  # PAPO-G 7B
GRPO = dict(kl_coef=0.01, prcp_coef=0.0, entropy_coef=0.0, masked_entropy_coef=0.0)


def timed(runs: dict, warmup: int, repeats: int, before=lambda: None) -> dict[str, list[float]]:
    """ms per call of each callable, per round; interleaved, order rotated each round (bench_model.py)."""
    names, times = list(runs), {k: [] for k in runs}
    for i in range(warmup + repeats):
        for name in names[i % len(names):] + names[: i % len(names)]:
            before()
            start = time.perf_counter()
            runs[name]()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {k: [1e3 * t for t in v] for k, v in times.items()}


def ratio(times: dict, num: list[str], den: list[str]) -> float:
    """Median over rounds of sum(num) / sum(den) within the round: on a shared machine the load
    drifts, and calls made seconds apart see the same load, so paired ratios are far steadier than
    a ratio of medians (measured: 0.5x-1.6x for the loss figure across runs with the latter)."""
    return statistics.median(sum(times[n][i] for n in num) / sum(times[d][i] for d in den)
                             for i in range(len(times[num[0]])))


def report(times: dict) -> None:
    for name, ts in times.items():
        print(f"    {name:<14} median {statistics.median(ts):8.2f} ms  min {min(ts):8.2f} ms")


# ----- (a) two views in one forward vs two forwards -------------------------------------------------

def vlm_batch(model, vision, sequences: int, prompt: int, response: int, seed: int) -> PolicyMicroBatch:
    """`sequences` rows [prompt text, <vs>, 8x8-patch image, <ve>, response], equal length, no padding."""
    gen = torch.Generator().manual_seed(seed)
    merge = vision.spatial_merge_size
    grid = torch.tensor([[1, 8, 8]] * sequences)
    n_image = 64 // merge**2
    text = lambda n: torch.randint(0, model.image_token_id, (sequences, n), generator=gen)  # noqa: E731
    col = lambda token: torch.full((sequences, 1), token)  # noqa: E731
    ids = torch.cat([text(prompt), col(model.vision_start_token_id), col(model.image_token_id).repeat(1, n_image),
                     col(model.vision_end_token_id), text(response)], dim=1)
    mask = torch.zeros(ids.shape)
    mask[:, -response - 1 : -1] = 1.0  # column t predicts ids[:, t + 1]: the response tokens
    pixels = torch.randn(64 * sequences, vision.in_channels * vision.temporal_patch_size * vision.patch_size**2,
                         generator=gen)
    keep = (torch.rand(pixels.shape[0], 1, generator=gen) > 0.6).float()  # PAPO's 0.6 patch mask ratio
    return PolicyMicroBatch(
        input_ids=ids, position_ids=compute_mrope_position_ids(ids, grid, model.image_token_id, merge),
        targets=torch.roll(ids, -1, dims=1), response_mask=mask, advantages=torch.randn(sequences, generator=gen),
        pixel_values=pixels, masked_pixel_values=pixels * keep, image_grid_thw=grid)


def bench_views(args) -> dict[str, list[float]]:
    cfg = load_config(None, ["preset=tiny"])
    groups = init_distributed({}, seed=1234)  # a world of one: plain process, gloo, CPU mode
    chunks = wrap_ddp(build_model_chunks(cfg.model, cfg.vision, groups, seed=11), groups, use_distributed_optimizer=False)
    attach_grad_finalisation(chunks)
    mb = vlm_batch(cfg.model, cfg.vision, args.sequences, 16, args.response, seed=0)
    (mb,) = attach_old_logprobs(chunks, groups, [mb], LossConfig(**PAPO), with_masked=True)
    mb.ref_logp = mb.old_logp + 0.1 * torch.randn(mb.old_logp.shape)
    print(f"(a) tiny VLM, one micro-batch of {tuple(mb.input_ids.shape)} tokens + {len(mb.image_grid_thw)} images "
          f"of 64 patches, {int(mb.response_mask.sum())} response tokens")
    both, detached = LossConfig(**PAPO, masked_grad=True), LossConfig(**PAPO)
    grpo_mb = replace(mb, masked_logp=None)
    swapped = replace(mb, pixel_values=mb.masked_pixel_values)  # the masked view, run as a pass of its own
    logp = lambda views: compute_logprobs(chunks, groups, [mb], 1.0, views)  # noqa: E731
    step = lambda batch, loss_cfg: papo_forward_backward(chunks, groups, [batch], loss_cfg)  # noqa: E731
    runs = {
        "logp 2 views": lambda: logp((ORIGINAL, MASKED)),
        "logp original": lambda: logp((ORIGINAL,)),
        "logp masked": lambda: logp((MASKED,)),
        "fb 2 views": lambda: step(grpo_mb, both),  # masked_grad: both views in the training forward
        "fb original": lambda: step(mb, detached),  # = PAPO's update with masked_grad=false
        "fb masked": lambda: step(swapped, detached),
        "fb grpo": lambda: step(grpo_mb, LossConfig(**GRPO)),
    }
    zero = lambda: [c.zero_grad_buffer() for c in chunks]  # noqa: E731
    times = timed(runs, args.warmup, args.repeats, before=zero)
    report(times)
    shutdown_distributed()
    return times


# ----- (b) peak memory of the log-prob + entropy computation ----------------------------------------

class LiveBytes(TorchDispatchMode):
    """Bytes of storages created by ops while active, and their peak. A storage counts from the op
    that returns it until it is freed (weakref.finalize: torch keeps a storage's Python object alive
    as long as the storage, so this fires on the real free). Views and in-place results reuse an
    input's storage and are not counted; kernels' internal scratch is invisible (not op outputs)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in inputs or key in self.live or storage.nbytes() == 0:
                continue
            self.live[key] = storage.nbytes()
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._free, key)
        return out


def check_tracker() -> None:
    """Known cases, or the figure cannot be trusted: 4+4 MB live -> peak 8; a view keeps its base;
    what autograd saves counts until the graph goes; the gradient of a leaf counts."""
    x = torch.randn(MB // 4, requires_grad=True)
    with LiveBytes() as t:
        a, b = torch.empty(MB), torch.ones(MB)
        view = a[:10]
        del a, b
        c = torch.zeros(MB // 2)
        after_del = t.now
        del view, c
        y = x.exp().sum()  # saves exp's 1 MB output for backward
        saved = t.now
        y.backward()
        del y
    assert t.peak == 8 * MB and after_del == 6 * MB and saved == MB + 4 and t.now == MB, (t.peak, after_del, saved, t.now)
    print("(b) LiveBytes check ok: peak 8 MB of 4+4 MB, views, saved tensors and .grad counted as expected")


def naive_logprobs(logits, targets, tp_group=None, temperature=1.0, with_entropy=True, chunk_tokens=None):
    """Full-vocabulary float log_softmax, gather, -(p * log p).sum(-1): the obvious implementation
    (vocab_parallel_logprobs' signature; TP 1, temperature 1: no division, no extra [N, V] copy)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(log_probs.exp() * log_probs).sum(-1)


def bench_memory(tokens: int, vocab: int, chunk_tokens: int) -> dict:
    """Peak live MB above the inputs (logits [tokens, vocab] fp32 made before tracking), each way,
    forward + backward of a loss on both outputs; the logits' gradient is part of both."""
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(tokens, vocab, generator=gen)).requires_grad_()
    targets, weights = torch.randint(0, vocab, (tokens,), generator=gen), torch.rand(tokens, generator=gen)
    result, outputs = {"tokens": tokens, "vocab": vocab, "grad": logits.numel() * 4 / MB}, {}
    for name, fn in (("chunked", vocab_parallel_logprobs), ("naive", naive_logprobs)):
        logits.grad = None
        with LiveBytes() as t:
            start = time.perf_counter()
            logp, entropy = fn(logits, targets, None, 1.0, with_entropy=True, chunk_tokens=chunk_tokens)
            ((logp * weights).sum() + (entropy * weights).sum()).backward()
            seconds = time.perf_counter() - start
        outputs[name], result[name] = (logp.detach(), entropy.detach(), logits.grad), t.peak / MB
        print(f"    tokens {tokens} x vocab {vocab}: {name:<7} peak {t.peak / MB:8.0f} MB  {seconds:6.2f} s")
    diffs = [(a - b).abs().max().item() for a, b in zip(outputs["chunked"], outputs["naive"])]
    print("    same function: max |diff| logp {:.1e}, entropy {:.1e}, grad {:.1e}".format(*diffs))
    return result


# ----- (c) loss overhead --------------------------------------------------------------------------

def bench_loss(batch: int, seq: int, warmup: int, repeats: int) -> dict[str, list[float]]:
    gen = torch.Generator().manual_seed(0)
    old = -torch.rand(batch, seq, generator=gen) * 3
    logp = (old + 0.1 * torch.randn(batch, seq, generator=gen)).requires_grad_()
    ref, masked = old + 0.1 * torch.randn(batch, seq, generator=gen), old - torch.rand(batch, seq, generator=gen)
    adv, mask = torch.randn(batch, generator=gen), (torch.rand(batch, seq, generator=gen) > 0.2).float()
    papo, grpo = LossConfig(**PAPO), LossConfig(**GRPO)
    runs = {
        "papo": lambda: compute_papo_loss(logp, old, adv, mask, papo, masked_logp=masked, ref_logp=ref)[0].backward(),
        "grpo": lambda: compute_papo_loss(logp, old, adv, mask, grpo, ref_logp=ref)[0].backward(),
    }
    print(f"(c) compute_papo_loss forward+backward on [{batch}, {seq}] tensors")
    times = timed(runs, warmup, repeats, before=lambda: setattr(logp, "grad", None))
    report(times)
    return times


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run of a few seconds")
    p.add_argument("--repeats", type=int, default=15, help="timed rounds (medians reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--sequences", type=int, default=8, help="(a) sequences in the micro-batch")
    p.add_argument("--response", type=int, default=128, help="(a) response tokens per sequence")
    p.add_argument("--chunk-tokens", type=int, default=None, help="(b) vocab_parallel_logprobs chunk (default: its 64 MiB budget)")
    args = p.parse_args(argv)
    if args.quick:
        args.sequences, args.response, args.repeats, args.warmup = 2, 16, min(args.repeats, 3), 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.repeats} timed rounds")
    views = bench_views(args)
    check_tracker()
    sizes = [(512, 4096)] if args.quick else [(4096, 32768), (2048, 151936)]
    memory = [bench_memory(tokens, vocab, args.chunk_tokens) for tokens, vocab in sizes]
    loss = bench_loss(*((64, 256) if args.quick else (640, 2048)), args.warmup, args.repeats)

    t = {**views, **{f"loss {k}": v for k, v in loss.items()}}
    # Other jobs on a shared machine inflate the timings (not the memory figures): say how busy it was.
    print(f"\nfigures (each a ratio within this run, timings paired per round; "
          f"1-min load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores):")
    print(f"(a) no-grad log-prob pass, 2 views: sequential/batched "
          f"{ratio(t, ['logp original', 'logp masked'], ['logp 2 views']):.2f}x   training fwd+bwd (masked_grad): "
          f"sequential/batched {ratio(t, ['fb original', 'fb masked'], ['fb 2 views']):.2f}x")
    for r in memory:
        print(f"(b) chunked/naive peak memory, {r['tokens']} x {r['vocab']}: {r['chunked'] / r['naive']:.2f}x "
              f"({r['chunked']:.0f} / {r['naive']:.0f} MB, both incl. the {r['grad']:.0f} MB logits grad; "
              f"without it {(r['chunked'] - r['grad']) / (r['naive'] - r['grad']):.2f}x)")
    # A GRPO step: old-logp pass + reference pass + update; PAPO adds the masked view to the old pass.
    grpo = ["logp original", "logp original", "fb grpo"]
    ours = ratio(t, ["logp 2 views", "logp original", "fb original"], grpo)
    separate = ratio(t, ["logp original", "logp masked", "logp original", "fb original"], grpo)
    print(f"(c) papo/grpo loss fwd+bwd {ratio(t, ['loss papo'], ['loss grpo']):.2f}x   tiny-VLM step papo/grpo "
          f"{ours:.2f}x (masked view batched; {separate:.2f}x as a separate pass)")


if __name__ == "__main__":
    main()
