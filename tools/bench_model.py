"""Training-step speed of our megatron-core GPT against transformers' Qwen2 on CPU.

    .venv/bin/python tools/bench_model.py [--threads N] [--iters N] ...   (or `make bench`)

Builds the same decoder (RMSNorm, SwiGLU, QKV bias, rope, GQA, untied embeddings, fp32) three ways:
megatron-core with the stock local layer spec, megatron-core with the SDPA core attention of
`papo_mega.models.sdpa_attention`, and transformers' Qwen2ForCausalLM (attn_implementation="sdpa")
holding the same weights. It checks that all three compute the same logits, times
forward+backward (interleaved, median of N), measures what CPU mode's device-rewriting
TorchFunctionMode costs, and profiles where each spends its time. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# megatron-core and transformers warn about CUDA-only features at import and build time.
warnings.filterwarnings("ignore")

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.transformer.dot_product_attention import DotProductAttention  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from papo_mega.config import ModelConfig  # noqa: E402
from papo_mega.distributed import cpu_mode, init_distributed, shutdown_distributed  # noqa: E402
from papo_mega.models import gpt  # noqa: E402
from papo_mega.models.lm_hf import lm_mcore_to_hf  # noqa: E402
from papo_mega.models.qwen_vl import build_model_chunks  # noqa: E402
from papo_mega.models.sdpa_attention import SdpaDotProductAttention, get_local_layer_spec  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=688)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    p.add_argument("--iters", type=int, default=30, help="timed steps per variant (median reported)")
    p.add_argument("--profile-iters", type=int, default=3, help="profiled steps per variant; 0 skips")
    p.add_argument("--top", type=int, default=10, help="ops listed per profile")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--vlm", action="store_true", help="run the Qwen2.5-VL comparison instead (tools/bench_vlm.py)")
    return p.parse_args(argv)


@dataclass
class Variant:
    """One model under test: how to get its per-token loss and logits, and what to run it under."""

    name: str
    model: torch.nn.Module
    per_token_loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


@contextlib.contextmanager
def layer_spec(spec_fn):
    """Build with `spec_fn`'s layer spec: our builder asks `select_layer_spec` for its spec, so that
    is pointed at spec_fn for the duration of one build."""
    saved = gpt.select_layer_spec
    gpt.select_layer_spec = lambda model: spec_fn(normalization="RMSNorm")
    try:
        yield
    finally:
        gpt.select_layer_spec = saved


def build_mcore(cfg: ModelConfig, groups, spec_fn, core_attention: type, seed: int) -> torch.nn.Module:
    """Our training model (text only: no vision tower), one chunk, built with `spec_fn`."""
    with layer_spec(spec_fn):
        (chunk,) = build_model_chunks(cfg, None, groups, seed)
    built = type(chunk.lm.decoder.layers[0].self_attention.core_attention)
    if built is not core_attention:
        raise RuntimeError(f"asked for {core_attention.__name__} but the builder used {built.__name__}")
    return chunk


def build_transformers(cfg: ModelConfig) -> Qwen2ForCausalLM:
    hf_cfg = Qwen2Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rotary_base},
        tie_word_embeddings=cfg.tie_embeddings,
        use_cache=False,
        attn_implementation="sdpa",
    )
    return Qwen2ForCausalLM(hf_cfg).float()


def copy_mcore_to_transformers(chunk: torch.nn.Module, hf: Qwen2ForCausalLM, cfg: ModelConfig) -> None:
    """Load our chunk's weights into the Qwen2 model through the converter's name/layout mapping."""
    hf.load_state_dict(lm_mcore_to_hf(chunk.state_dict(), cfg), strict=True)


def mcore_variant(name: str, model, context=contextlib.nullcontext) -> Variant:
    return Variant(
        name=name,
        model=model,
        per_token_loss=lambda ids, pos, labels: model(ids, pos, attention_mask=None, labels=labels),
        logits=lambda ids, pos: model(ids, pos, attention_mask=None),
        context=context,
    )


def transformers_variant(model: Qwen2ForCausalLM) -> Variant:
    def logits(ids, pos):
        return model(input_ids=ids, position_ids=pos).logits

    def per_token_loss(ids, pos, labels):
        # The same per-token cross entropy megatron returns: no shift, labels given as targets.
        out = logits(ids, pos)
        return F.cross_entropy(out.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)

    return Variant("transformers", model, per_token_loss, logits)


@torch.no_grad()
def check_same_function(reference: Variant, others: list[Variant], ids, pos, vocab: int) -> None:
    """Print max |logit diff| of each variant against the reference (eval mode, same input).

    Only the real vocabulary's columns count: our model masks the padding columns, Qwen2 does not.
    """
    with reference.context():
        ref = reference.logits(ids, pos)[..., :vocab]
    for variant in others:
        with variant.context():
            diff = (variant.logits(ids, pos)[..., :vocab] - ref).abs().max().item()
        print(f"  max |logit diff| {variant.name:<28} vs {reference.name}: {diff:.2e}")
    print(f"  (logits span {ref.min().item():.2f} .. {ref.max().item():.2f})")


def train_step(variant: Variant, ids, pos, labels) -> None:
    with variant.context():
        variant.per_token_loss(ids, pos, labels).mean().backward()


def time_steps(variants: list[Variant], batch, warmup: int, iters: int) -> dict[str, list[float]]:
    """Seconds per forward+backward for each variant, steps interleaved so noise hits all alike.

    The order rotates every round: a variant run right after another step of the same model
    finds its weights in cache, which would otherwise favour whoever follows it.
    """
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for i in range(warmup + iters):
        for variant in variants[i % len(variants) :] + variants[: i % len(variants)]:
            variant.model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            train_step(variant, *batch)
            if i >= warmup:
                times[variant.name].append(time.perf_counter() - start)
    return times


class _CallCounter(TorchFunctionMode):
    """Counts torch calls that reach the top of the TorchFunctionMode stack, as CPU mode's does."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def count_mode_calls(variant: Variant, batch) -> int:
    """Torch calls one training step sends through a TorchFunctionMode.

    Only the forward's calls reach it: measured, backward (megatron's Python autograd Functions
    included) passes none through the mode stack.
    """
    counter = _CallCounter()
    with cpu_mode.device_mode_off(), counter:
        variant.per_token_loss(*batch).mean().backward()
    variant.model.zero_grad(set_to_none=True)
    return counter.calls


def mode_cost_per_call_us(repeats: int = 20_000) -> float:
    """CPU mode's overhead on one torch call in microseconds: mode on minus mode off, averaged over a
    Tensor method, a torch function and an nn.functional wrapper (their dispatch paths differ)."""
    x = torch.zeros(4, 4)
    calls = (lambda: x.view(16), lambda: torch.add(x, x), lambda: F.silu(x))

    def seconds_per_call() -> float:
        start = time.perf_counter()
        for call in calls:
            for _ in range(repeats):
                call()
        return (time.perf_counter() - start) / (repeats * len(calls))

    seconds_per_call()
    on = seconds_per_call()
    with cpu_mode.device_mode_off():
        off = seconds_per_call()
    return 1e6 * (on - off)


def profile_ops(variant: Variant, batch, iters: int, top: int) -> None:
    """Top ops by self CPU time per step, and the wall time no op accounts for (Python, dispatch)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(iters):
            variant.model.zero_grad(set_to_none=True)
            train_step(variant, *batch)
        wall_ms = 1e3 * (time.perf_counter() - start) / iters
    events = prof.key_averages()
    in_ops_ms = sum(e.self_cpu_time_total for e in events) / 1e3 / iters
    print(f"\n  {variant.name}: {wall_ms:.1f} ms/step under the profiler")
    for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]:
        ms = e.self_cpu_time_total / 1e3 / iters
        print(f"    {ms:7.1f} ms {100 * ms / wall_ms:5.1f}%  {e.count // iters:5d}x  {e.key}")
    outside = wall_ms - in_ops_ms
    print(f"    {outside:7.1f} ms {100 * outside / wall_ms:5.1f}%         outside any op (Python, hooks)")


def make_batch(args, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    pos = torch.arange(args.seq).expand(args.batch, -1)
    return ids, pos, labels


def build_variants(args) -> tuple[list[Variant], Variant]:
    """(megatron variants, transformers variant), all holding the same weights."""
    cfg = ModelConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        ffn_hidden_size=args.ffn,
        num_attention_heads=args.heads,
        num_query_groups=args.kv_heads,
        vocab_size=args.vocab,
        max_seq_len=args.seq,
    )
    groups = init_distributed({})
    stock = build_mcore(cfg, groups, get_gpt_layer_local_spec, DotProductAttention, args.seed)
    sdpa = build_mcore(cfg, groups, get_local_layer_spec, SdpaDotProductAttention, args.seed)
    hf = build_transformers(cfg)
    copy_mcore_to_transformers(stock, hf, cfg)
    mcore = [
        mcore_variant("mcore local spec", stock),
        mcore_variant("mcore sdpa spec", sdpa),
        mcore_variant("mcore sdpa spec, mode off", sdpa, cpu_mode.device_mode_off),
    ]
    return mcore, transformers_variant(hf)


def report(times: dict[str, list[float]], mode_calls: int, mode_us: float) -> None:
    """The figures, last in the output; the final line is the headline ratio."""
    ms = {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
    hf_ms = ms["transformers"]
    # Other jobs on the machine inflate medians far more than minima: say when that happened.
    load = os.getloadavg()[0]
    busy = "; busy, medians noisy" if load > 1.5 * torch.get_num_threads() else ""
    print(
        f"\nforward+backward, ms/step over {len(times['transformers'])} interleaved steps "
        f"(1-min load average {load:.1f} on {os.cpu_count()} cores{busy}):"
    )
    for name, ts in times.items():
        print(
            f"  {name:<28} median {ms[name]:7.1f}  min {1e3 * min(ts):7.1f}   "
            f"speed vs transformers {hf_ms / ms[name]:5.2f}x"
        )
    mode_ms = mode_calls * mode_us / 1e3
    timed_ms = ms["mcore sdpa spec"] - ms["mcore sdpa spec, mode off"]
    print(
        f"CPU mode's TorchFunctionMode: {mode_calls} calls/step x {mode_us:.1f} us/call "
        f"= {mode_ms:.1f} ms/step "
        f"({100 * mode_ms / ms['mcore sdpa spec']:.1f}%); timed on-off median difference {timed_ms:+.1f} ms"
    )
    sdpa, stock = hf_ms / ms["mcore sdpa spec"], hf_ms / ms["mcore local spec"]
    print(f"mcore/transformers speed ratio: {sdpa:.2f}x (sdpa spec; stock local spec {stock:.2f}x)")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.vlm:
        import bench_vlm  # tools/ is on sys.path when this script runs

        bench_vlm.main(["--threads", str(args.threads)])
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    mcore, hf = build_variants(args)
    variants = [*mcore, hf]
    params = sum(p.numel() for p in hf.model.parameters())
    print(
        f"torch {torch.__version__}, {args.threads} threads; {args.layers} layers, hidden {args.hidden}, "
        f"ffn {args.ffn}, {args.heads} heads / {args.kv_heads} kv, vocab {args.vocab}, batch {args.batch} x "
        f"seq {args.seq}, {params / 1e6:.1f}M params, fp32"
    )
    batch = make_batch(args, args.seed)
    for variant in variants:
        variant.model.eval()
    print("\nsame function:")
    check_same_function(mcore[0], [*mcore[1:], hf], *batch[:2], vocab=args.vocab)
    for variant in variants:
        variant.model.train()
    mode_calls = count_mode_calls(mcore[1], batch)
    mode_us = mode_cost_per_call_us()
    times = time_steps(variants, batch, args.warmup, args.iters)
    if args.profile_iters:
        print("\nprofile (self CPU time per step, share of the step, calls per step, op):")
        for variant in (mcore[0], mcore[1], hf):
            profile_ops(variant, batch, args.profile_iters, args.top)
    report(times, mode_calls, mode_us)
    shutdown_distributed()


if __name__ == "__main__":
    main()
