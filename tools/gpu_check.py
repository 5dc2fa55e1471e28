#!/usr/bin/env python
"""papo_mega's first GPU check: the risks of issue 15, retired on one GPU in at most ~8 minutes.

    python tools/gpu_check.py [--out runs/gpu_check.json] [--budget-s 480] [--quick] [--no-pytest]

Every check prints one line `[PASS|FAIL|INFO|SKIP] <id>: {figures}` and the whole record goes to the
JSON file (--out). A failing check is a finding, recorded with its error, never a crash of the
script: each check runs on its own. The exit code is 0 when no check failed.

  env          versions (torch, CUDA, NCCL, TE, megatron-core) and papo_mega.gpu_env's verdict
  lm_step      lm_step.forward_backward on CUDA: loss and gradients on the device, finite
  te_norm_init the TE spec's fused norm weights (`layer_norm_weight`) start at 1       (needs TE)
  rollout_pad  a short prompt batched with a long one = the short prompt alone, greedy tokens and
               log-probs, under the TE spec and under the local spec as the control
  fp8_shapes   training forward/backward and rollout at awkward lengths under fp8   (needs TE, sm90)
  ckpt_spec    a model directory saved on CPU (local spec, subprocess) loads here; logits agree
  decode_cost  ms per decode step vs context length on a 7B-width slice (KV-cache growth)
  tests_gpu    the repo's own GPU tier: pytest tests/gpu (with the time left)

Without CUDA every check reports "skipped: no CUDA" and the script exits 0 (CI runs it so: see
tests/unit/test_gpu_check.py). Without Transformer Engine the checks that need it say so and the
non-TE half runs. Figures from a run go into docs/scaling.md ("First GPU check").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

import torch  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "no TE here"
        return False
    return True


def hopper() -> bool:
    return DEVICE.type == "cuda" and torch.cuda.get_device_capability()[0] >= 9


class Skip(Exception):
    """A check that cannot run on this machine (its reason is recorded)."""


class Fail(Exception):
    """A check that ran and found the behaviour wrong (its figures are recorded)."""

    def __init__(self, **figures):
        super().__init__("check failed")
        self.figures = figures


@dataclass
class Check:
    name: str
    run: Callable[..., dict]
    needs_te: bool = False
    needs_hopper: bool = False


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def tiny(*overrides: str):
    from papo_mega.config import load_config

    return load_config(None, ["preset=tiny", *overrides])


# -- checks ---------------------------------------------------------------------------------------
def check_env(groups, args) -> dict:
    import megatron.core

    from papo_mega import gpu_env

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(),
            "capability": list(torch.cuda.get_device_capability()),
            "nccl": ".".join(map(str, torch.cuda.nccl.version())), "mcore": megatron.core.__version__,
            "te": gpu_env.installed_version("transformer-engine"), "backend": groups.backend,
            "hbm_mib": torch.cuda.get_device_properties(0).total_memory // 2**20}
    try:
        gpu_env.check_gpu_environment(precision="fp8" if te_available() else "bf16")
        info["gpu_env"] = "ok"
    except Exception as err:  # noqa: BLE001 - the verdict is the figure
        info["gpu_env"] = str(err)
    return info


def check_lm_step(groups, args) -> dict:
    """SFT, smoke, the demo's SFT stage and tests/gpu all go through lm_step.forward_backward."""
    from papo_mega.lm_step import make_lm_batch, split_microbatches, train_step
    from papo_mega.models.qwen_vl import build_model_chunks
    from papo_mega.optim import attach_grad_finalisation, build_optimizer, wrap_ddp

    cfg = tiny("vision.enabled=false", "model.precision=bf16")
    cfg.model.mrope_section = []  # lm_step feeds 1D positions
    chunks = wrap_ddp(build_model_chunks(cfg.model, None, groups, seed=3), groups, False)
    attach_grad_finalisation(chunks)
    optimizer = build_optimizer(chunks, cfg.train, False, "bf16")
    losses = []
    for step in range(3):
        batch = make_lm_batch(4, 32, cfg.model.vocab_size, 3, step)
        losses.append(train_step(chunks, optimizer, batch, groups, 2)["loss"])
    assert split_microbatches(batch, groups, 2)  # the host-side split still yields micro-batches
    grads = [p.main_grad for c in chunks for p in c.parameters() if getattr(p, "main_grad", None) is not None]
    on_device = all(g.device.type == "cuda" for g in grads)
    figures = {"losses": [round(x, 4) for x in losses], "grads_on_cuda": on_device}
    if not (on_device and all(map(torch.isfinite, torch.tensor(losses)))):
        raise Fail(**figures)
    return figures


def check_te_norm_init(groups, args) -> dict:
    from papo_mega.distributed.sharding import named_local_params
    from papo_mega.models.qwen_vl import build_model_chunks

    cfg = tiny("vision.enabled=false", "model.precision=bf16")
    chunk = build_model_chunks(cfg.model, None, groups, seed=3)[0]
    norms = {n: p for n, p in named_local_params(chunk) if n.endswith("layer_norm_weight")}
    not_one = sorted(n for n, p in norms.items() if not bool(torch.all(p == 1)))
    attn = chunk.lm.decoder.layers[0].self_attention
    figures = {"te_norm_params": len(norms), "not_initialised_to_one": not_one[:4],
               "linear_qkv": type(attn.linear_qkv).__name__, "core_attention": type(attn.core_attention).__name__}
    if not norms or not_one:
        raise Fail(**figures)
    return figures


def _padding_gap(groups, force_local: bool) -> dict:
    from papo_mega.config import RolloutConfig
    from papo_mega.models import gpt
    from papo_mega.models.qwen_vl import build_model_chunks
    from papo_mega.rollout.engine import MegatronEngine
    from papo_mega.types import RolloutPrompt

    original = gpt.transformer_engine_usable
    if force_local:
        gpt.transformer_engine_usable = lambda: False
    try:
        cfg = tiny("vision.enabled=false", "model.precision=bf16")
        chunks = build_model_chunks(cfg.model, None, groups, seed=5)
    finally:
        gpt.transformer_engine_usable = original
    for chunk in chunks:
        chunk.eval()
    engine = MegatronEngine(chunks, groups, cfg.model, cfg.vision.spatial_merge_size, [], 0)
    gen = torch.Generator().manual_seed(0)
    short = RolloutPrompt(torch.randint(1, 250, (5,), generator=gen))
    long = RolloutPrompt(torch.randint(1, 250, (27,), generator=gen))
    params = RolloutConfig(n=1, temperature=0.0, max_new_tokens=8)
    alone = engine.generate([short], params, seed=0, step=0)
    both = engine.generate([short, long], params, seed=0, step=0)
    equal = int((alone.response_ids[0] == both.response_ids[0]).long().cumprod(0).sum())
    upto = max(equal, 1)
    gap = float((alone.logprobs[0, :upto] - both.logprobs[0, :upto]).abs().max())
    return {"equal_prefix_tokens": equal, "of": params.max_new_tokens, "max_logprob_gap": gap}


def check_rollout_padding(groups, args) -> dict:
    """bf16: batching changes rounding a little (GEMM shapes), never the function: tokens equal."""
    spec = "te" if te_available() else "local"
    figures = {spec: _padding_gap(groups, force_local=False)}
    if spec == "te":
        figures["local_control"] = _padding_gap(groups, force_local=True)
    first = figures[spec]
    if first["equal_prefix_tokens"] < first["of"] or first["max_logprob_gap"] > 0.05:
        raise Fail(**figures)
    return figures


def check_fp8_shapes(groups, args) -> dict:
    """TE's fp8 GEMMs need leading dims % 8 and last dim % 16: the rollout (6 rows, prompts of 5 and
    17 tokens, rows finishing at different steps) and the PAPO update on its responses (micro-batch
    1, the step's longest sequence) must run under fp8 at such awkward lengths."""
    from papo_mega.algo.policy import attach_old_logprobs, papo_forward_backward
    from papo_mega.config import RolloutConfig
    from papo_mega.models.qwen_vl import build_model_chunks
    from papo_mega.optim import attach_grad_finalisation, wrap_ddp
    from papo_mega.rollout.assemble import assemble_policy_rows, longest_sequence
    from papo_mega.rollout.engine import MegatronEngine
    from papo_mega.types import RolloutPrompt

    cfg = tiny("vision.enabled=false", "model.precision=fp8", "model.fp8_recipe=tensorwise")
    chunks = wrap_ddp(build_model_chunks(cfg.model, None, groups, seed=3), groups, False)
    attach_grad_finalisation(chunks)
    engine = MegatronEngine(chunks, groups, cfg.model, cfg.vision.spatial_merge_size, [2], 0)
    gen = torch.Generator().manual_seed(2)
    figures = {}
    for lengths, n in (((5, 17), 3), ((16, 16), 4)):  # 6 rows of awkward prompts; 8 aligned rows
        prompts = [RolloutPrompt(torch.randint(3, 250, (length,), generator=gen)) for length in lengths]
        key = f"prompts{'_'.join(map(str, lengths))}_rows{len(lengths) * n}"
        try:
            for chunk in chunks:
                chunk.eval()
            out = engine.generate(prompts, RolloutConfig(n=n, temperature=1.0, max_new_tokens=7), seed=0, step=0)
            figures[f"rollout_{key}"] = f"ok, lengths {out.lengths.tolist()}"
        except Exception as err:  # noqa: BLE001 - the error is the finding
            figures[f"rollout_{key}"] = f"{type(err).__name__}: {str(err)[:200]}"
            continue
        try:
            for chunk in chunks:
                chunk.train()
            seq_len = longest_sequence(prompts, out, cfg.model)
            advantages = torch.randn(len(out.lengths), generator=gen)
            batches = [assemble_policy_rows(prompts, out, advantages, cfg.model, cfg.vision.spatial_merge_size, 0,
                                            None, seq_len, range(r, r + 1)) for r in range(len(out.lengths))]
            batches = attach_old_logprobs(chunks, groups, batches, cfg.loss)
            metrics = papo_forward_backward(chunks, groups, batches, cfg.loss)
            figures[f"update_{key}"] = f"ok, seq_len {seq_len}, loss {metrics['loss']:.4f}"
        except Exception as err:  # noqa: BLE001
            figures[f"update_{key}"] = f"{type(err).__name__}: {str(err)[:200]}"
    if any(not str(v).startswith("ok") for v in figures.values()):
        raise Fail(**figures)
    return figures


CPU_SAVE = r"""
import sys, torch
sys.path.insert(0, sys.argv[2])
from papo_mega.config import load_config
from papo_mega.distributed import init_distributed
from papo_mega.model_dir import save_model
from papo_mega.models.qwen_vl import build_model_chunks
cfg = load_config(None, ["preset=tiny", "model.precision=fp32", "vision.enabled=false"])
groups = init_distributed({}, seed=1)
chunks = build_model_chunks(cfg.model, None, groups, seed=3)
save_model(chunks, sys.argv[1])
ids = torch.arange(1, 17)[None]
with torch.no_grad():
    logits = chunks[0](ids, torch.arange(16)[None].expand(3, 1, 16))
torch.save(logits, sys.argv[1] + "/cpu_logits.pt")
"""


def check_ckpt_cross_spec(groups, args) -> dict:
    """A model directory written on CPU (local spec) loads under this machine's spec."""
    from papo_mega.model_dir import load_model
    from papo_mega.models.qwen_vl import build_model_chunks

    directory = tempfile.mkdtemp(prefix="papo_gpu_check_")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", CPU_SAVE, directory, str(ROOT)], env=env, capture_output=True,
                          text=True, timeout=240)
    if proc.returncode:
        raise Fail(stage="cpu save", stderr=proc.stderr.strip().splitlines()[-3:])
    cfg = tiny("model.precision=fp32", "vision.enabled=false")
    chunks = build_model_chunks(cfg.model, None, groups, initialise=False)
    load_model(chunks, directory)
    ids = torch.arange(1, 17, device=DEVICE)[None]
    with torch.no_grad():
        logits = chunks[0](ids, torch.arange(16, device=DEVICE)[None].expand(3, 1, 16)).float().cpu()
    reference = torch.load(directory + "/cpu_logits.pt")
    gap = float((logits - reference).abs().max())
    figures = {"max_logit_gap_vs_cpu": gap, "spec": "te" if te_available() else "local"}
    if gap > 2e-2:  # TF32 / fused-kernel rounding on a 2-layer fp32 model stays far below this
        raise Fail(**figures)
    return figures


def _decode_step_ms(groups, layers: int, context: int, prompts: int, n: int, new_tokens: int) -> float:
    from papo_mega.config import RolloutConfig, load_config
    from papo_mega.models.qwen_vl import build_model_chunks
    from papo_mega.rollout.engine import MegatronEngine
    from papo_mega.types import RolloutPrompt

    cfg = load_config(None, ["preset=qwen2.5-vl-7b", f"model.num_layers={layers}", "vision.enabled=false",
                             "model.precision=bf16"])
    chunks = build_model_chunks(cfg.model, None, groups, seed=3, initialise=False)
    for chunk in chunks:
        chunk.eval()
    engine = MegatronEngine(chunks, groups, cfg.model, cfg.vision.spatial_merge_size, [], 0)
    gen = torch.Generator().manual_seed(1)
    batch = [RolloutPrompt(torch.randint(1, 1000, (context,), generator=gen)) for _ in range(prompts)]

    def timed(max_new: int) -> float:
        sync()
        start = time.perf_counter()
        engine.generate(batch, RolloutConfig(n=n, temperature=1.0, max_new_tokens=max_new), seed=0, step=0)
        sync()
        return time.perf_counter() - start

    timed(2)  # warm-up: allocator, cuBLAS plans
    prefill = min(timed(1), timed(1))
    total = timed(1 + new_tokens)
    return round((total - prefill) / new_tokens * 1e3, 2)


def check_decode_cost(groups, args) -> dict:
    """Decode ms/step on a 7B-width slice at 160 rows (the 72B recipe's rollout.max_batch_rows)."""
    new = 8 if args.quick else 16
    contexts = (256, 1024, 2048)
    figures = {"rows": 160, "layers": 4,
               "ms_per_step": {str(c): _decode_step_ms(groups, 4, c, 16, 10, new) for c in contexts}}
    ms = figures["ms_per_step"]
    figures["growth_2048_over_256"] = round(ms["2048"] / ms["256"], 2)
    return figures


def check_tests_gpu(groups, args, seconds_left: float) -> dict:
    if seconds_left < 90:
        raise Skip(f"only {seconds_left:.0f} s of the budget left")
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/gpu", "-q", "-p", "no:cacheprovider"],
                          cwd=ROOT, capture_output=True, text=True, timeout=seconds_left)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-6:]
    if proc.returncode:
        raise Fail(rc=proc.returncode, tail=tail)
    return {"tail": tail}


CHECKS = [
    Check("env", check_env),
    Check("lm_step", check_lm_step),
    Check("te_norm_init", check_te_norm_init, needs_te=True),
    Check("rollout_pad", check_rollout_padding),
    Check("fp8_shapes", check_fp8_shapes, needs_te=True, needs_hopper=True),
    Check("ckpt_spec", check_ckpt_cross_spec),
    Check("decode_cost", check_decode_cost),
]


# -- driver ---------------------------------------------------------------------------------------
def record(results: dict, name: str, status: str, figures: dict) -> None:
    results[name] = {"status": status, **figures}
    print(f"[{status}] {name}: {json.dumps(figures, default=str)}", flush=True)


def run_one(results: dict, check: Check, call: Callable[[], dict]) -> None:
    start = time.perf_counter()
    try:
        if DEVICE.type != "cuda":
            raise Skip("no CUDA")
        if check.needs_te and not te_available():
            raise Skip("no Transformer Engine (pip install papo_mega[gpu] or use docker/)")
        if check.needs_hopper and not hopper():
            raise Skip("fp8 needs compute capability >= 9.0 (H100/H200)")
        figures = call()
        status = "INFO" if check.name in ("env", "decode_cost") else "PASS"
    except Skip as why:
        status, figures = "SKIP", {"reason": f"skipped: {why}"}
    except Fail as found:
        status, figures = "FAIL", found.figures
    except Exception as err:  # noqa: BLE001 - a crash inside a check is its finding
        status = "FAIL"
        figures = {"error": f"{type(err).__name__}: {str(err).strip()[:300]}",
                   "where": traceback.format_exc().strip().splitlines()[-3:-1]}
    figures["seconds"] = round(time.perf_counter() - start, 1)
    record(results, check.name, status, figures)
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gpu_check.json", help="where the JSON record goes")
    parser.add_argument("--budget-s", type=float, default=480.0, help="no check starts after this many seconds")
    parser.add_argument("--quick", action="store_true", help="fewer decode steps per timing")
    parser.add_argument("--no-pytest", action="store_true", help="leave out tests/gpu")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results: dict = {}
    groups = None
    if DEVICE.type == "cuda":
        from papo_mega.distributed import init_distributed

        groups = init_distributed({}, seed=1)
    for check in CHECKS:
        if time.perf_counter() - start > args.budget_s:
            record(results, check.name, "SKIP", {"reason": "skipped: time budget spent"})
            continue
        run_one(results, check, lambda c=check: c.run(groups, args))
    if groups is not None:
        from papo_mega.distributed import shutdown_distributed

        shutdown_distributed()
    tests = Check("tests_gpu", check_tests_gpu)
    if args.no_pytest:
        record(results, tests.name, "SKIP", {"reason": "skipped: --no-pytest"})
    else:
        left = args.budget_s + 60 - (time.perf_counter() - start)
        run_one(results, tests, lambda: check_tests_gpu(groups, args, left))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    failed = sorted(name for name, r in results.items() if r["status"] == "FAIL")
    print(f"wrote {out} after {time.perf_counter() - start:.0f} s; failed: {failed or 'none'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
