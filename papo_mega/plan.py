"""`papo-mega plan`: memory per GPU and an estimated step time for every valid TP/PP/DP layout.

    papo-mega plan --model qwen2.5-vl-72b --gpus 32 [--gpu h100-80gb] [--config RECIPE.yaml] [overrides]

The memory model follows what papo_mega builds, term by term (docs/scaling.md, "The planner"): model
state (weights, fp32 main_grad, Adam + fp32 master sharded over DP, the reference model, TE's fp8
weight caches); the rollout (one generate batch's KV cache at full length, its prefill transient and
inputs); training (activations of the micro-batches in flight under (interleaved) 1F1B with
model.recompute, full recomputation's one-layer working set, the last stage's logits as the loss keeps
them, the micro-batch in its forward step); and on GPUs the CUDA runtime, NCCL and allocator
fragmentation, against the GPU's physical memory. The step time is an estimate: matmul FLOPs at
MODEL_FLOPS_UTILISATION of the dense peak, memory-bound decode, the 1F1B bubble and TP all-reduces.
Pure functions; the CLI only formats `plan()`'s result.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from papo_mega.config import RECIPES_DIR, Config, ModelConfig, VisionConfig
from papo_mega.errors import ConfigError, PapoError
from papo_mega.models.fp8_shapes import fp8_padded_length
from papo_mega.models.param_shapes import fp8_gemm_params, layer_shapes, numel, rank_shapes, vision_shapes
from papo_mega.plan_gpu import (
    CUDA_RUNTIME_GB,
    FP8_WEIGHT_CACHE_BYTES,
    FRAGMENTATION_FRACTION,
    LOSS_BYTES_PER_TOKEN,  # noqa: F401 - re-exported: tests and callers read the planner's constants here
    device_input_bytes,
    nccl_bytes,
    nccl_groups,
    train_input_bytes,
)

GB = 1e9
GIB = 2**30
MIB = 2**20
MODEL_FLOPS_UTILISATION = 0.40
"""Assumed share of the dense peak that training / prefill matmuls reach (a planning figure, not measured)."""
GPUS_PER_NODE = 8
"""Tensor parallelism stays inside a node (NVLink); larger TP degrees are not enumerated."""
GPU_USABLE_FRACTION = 0.95
"""Share of physical memory a layout may plan for: context, NCCL and fragmentation are terms of their
own; this margin is for what none models (optimizer-step temporaries, fp8 scaling state, cuDNN plans)."""
RECOMPUTE = ("none", "selective", "full")
STEP_TIME_TIE = 0.02
"""Estimated step times closer than this (relative) count as equal when ranking layouts."""

@dataclass(frozen=True)
class DeviceProfile:
    """What the planner needs to know about one accelerator."""

    name: str
    memory_mib: float
    """Physical memory as nvidia-smi reports it (MiB)."""
    bf16_tflops: float
    fp8_tflops: float | None
    hbm_tb_s: float
    link_gb_s: float
    """Per-GPU tensor-parallel all-reduce bandwidth (NVLink) in GB/s."""
    attention_stores_scores: bool = False
    """CPU: torch's SDPA runs the math kernel (keeps the [heads, S, S] probabilities); GPUs use flash kernels."""
    retains_init_weights: bool = False
    """CPU: glibc keeps the heap pages of the initial parameters after megatron DDP moves them into its
    contiguous buffer (measured: RSS grows by 2 x weights at wrap_ddp, grads + params); CUDA's caching
    allocator reuses those blocks for activations instead."""
    process_overhead_gb: float = 0.0
    """Memory a training process adds that no term models: on CPU, measured as the mean gap over the
    calibration runs (tests/distributed/test_plan_calibration.py: 0.11-0.19 GB at four layouts, nearly
    independent of the model's share per rank - gloo and megatron buffers, allocator arenas, the
    optimizer's transient lists). GPUs have explicit terms instead (`cuda`)."""
    cuda: bool = True
    """The GPU-only terms apply (CUDA runtime, NCCL, fp8 weight caches, device batch, fragmentation)."""

    @property
    def memory_bytes(self) -> float:
        return self.memory_mib * MIB

    @property
    def usable_bytes(self) -> float:
        return self.memory_bytes * GPU_USABLE_FRACTION


DEVICES: dict[str, DeviceProfile] = {
    # Physical HBM per nvidia-smi: H100 SXM 80GB 81559 MiB (85.5e9 bytes), H200 143771 MiB, A100 80GB 81920 MiB.
    "h100-80gb": DeviceProfile("h100-80gb", 81559, 989, 1979, 3.35, 450),
    "h200": DeviceProfile("h200", 143771, 989, 1979, 4.8, 450),
    "a100-80gb": DeviceProfile("a100-80gb", 81920, 312, None, 2.0, 300),
    # Host memory is not a limit the planner checks; the profile exists for calibration on CPU.
    "cpu": DeviceProfile("cpu", 1e12, 1.0, None, 0.05, 5, attention_stores_scores=True,
                         retains_init_weights=True, process_overhead_gb=0.17, cuda=False),
}


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    vpp: int = 1
    """Virtual pipeline chunks per pipeline rank (interleaved 1F1B; 1 = plain 1F1B)."""

    def __str__(self) -> str:
        vpp = f" vpp{self.vpp}" if self.vpp > 1 else ""
        return f"tp{self.tp} pp{self.pp}{vpp} dp{self.dp}"


@dataclass(frozen=True)
class Workload:
    """The shapes one training step works on, per data-parallel rank (see `workload_from_config`)."""

    seq_len: int
    """Tokens per training row (prompt + response, padded)."""
    micro_batch_rows: int
    """Rows per training micro-batch with gradient (x2 when the masked view gets gradient)."""
    nograd_rows: int
    """Rows per micro-batch of the no-grad log-prob forward ([original; masked] when PAPO needs both)."""
    rows_per_update: int
    """Responses per optimizer update, all DP ranks together (train.global_batch_size)."""
    updates: int
    """Optimizer updates per step (ppo_epochs x responses per step / global_batch_size)."""
    rollout_prompts: int = 0
    """Prompts rolled out per step, all DP ranks together (0: no rollout, the LM step)."""
    rollout_n: int = 1
    rollout_batch_rows: int = 0
    """rollout.max_batch_rows: rows one generate batch decodes together (0: all of a rank's rows)."""
    prompt_len: int = 0
    max_new_tokens: int = 0
    image_patches: int = 0
    """Vision patches per row (data.max_pixels / patch^2; 0 without images)."""
    reference: bool = False
    nograd_views: int = 0
    """Rows multiplier of the no-grad old-policy forward (1 original, 2 with the masked view; 0 none)."""
    micro_batch_responses: int = 0
    """Responses per training micro-batch (train.micro_batch_size; 0: micro_batch_rows)."""
    chunked_logprobs: bool = False
    """Log-probs by algo/logprobs.py (the RL step) rather than megatron's cross-entropy (the LM step)."""

    def microbatches(self, dp: int) -> int:
        """Training micro-batches per optimizer update on one DP rank."""
        return max(1, self.rows_per_update // dp // (self.micro_batch_responses or self.micro_batch_rows))


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on the busiest pipeline stage of one layout (`stage`), by term."""

    stage: int
    params: int
    weights: float
    grads: float
    optimizer: float
    reference: float
    kv_cache: float
    rollout_transient: float
    activations: float
    logits: float
    overhead: float = 0.0
    """The device profile's per-process term (process_overhead_gb)."""
    recompute_working: float = 0.0
    """Full recomputation: one layer's whole activations while its backward re-runs its forward."""
    fp8_weight_cache: float = 0.0
    """TE's cached fp8 weights and transposes (GPU, fp8 only)."""
    rollout_inputs: float = 0.0
    """One generate batch's token ids and pixels on the device (GPU; first stage)."""
    train_inputs: float = 0.0
    """The micro-batch in its forward step on the device: ids and pixels on the first stage, loss inputs on
    the last (GPU; micro-batches wait on the host, train.py)."""
    cuda_runtime: float = 0.0
    nccl: float = 0.0
    nccl_communicators: int = 0
    fragmentation_fraction: float = 0.0
    in_flight: float = 0.0
    """Micro-batches (in whole-stage units) whose activations the stage holds at its peak."""

    @property
    def state(self) -> float:
        return self.weights + self.grads + self.optimizer + self.reference + self.overhead + self.fp8_weight_cache

    @property
    def rollout_peak(self) -> float:
        return self.state + self.kv_cache + self.rollout_transient + self.rollout_inputs

    @property
    def train_peak(self) -> float:
        return self.state + self.activations + self.recompute_working + self.logits + self.train_inputs

    @property
    def allocated(self) -> float:
        """The peak torch's caching allocator hands out (torch.cuda.max_memory_allocated's counterpart)."""
        return max(self.rollout_peak, self.train_peak)

    @property
    def fragmentation(self) -> float:
        return self.allocated * self.fragmentation_fraction

    @property
    def total(self) -> float:
        """Physical memory the process needs: the allocator's peak with its fragmentation, the CUDA runtime, NCCL."""
        return self.allocated + self.fragmentation + self.cuda_runtime + self.nccl


@dataclass(frozen=True)
class LayoutPlan:
    layout: Layout
    memory: MemoryEstimate
    fits: bool
    step_s: float
    rollout_s: float
    train_s: float


@dataclass(frozen=True)
class Plan:
    model: str
    gpus: int
    device: DeviceProfile
    precision: str
    recompute: str
    layouts: list[LayoutPlan]
    rejected: dict[str, str]
    """Layouts the model cannot be split into, with the reason."""

    @property
    def fitting(self) -> list[LayoutPlan]:
        """Fitting layouts, fastest first; those within STEP_TIME_TIE of the fastest (which the
        estimate cannot tell apart) ordered by memory, so a vpp variant with no real gain and more
        activations does not win on a rounding difference."""
        fits = sorted((p for p in self.layouts if p.fits), key=lambda p: (p.step_s, p.memory.total))
        if not fits:
            return []
        near = sorted((p for p in fits if p.step_s <= fits[0].step_s * (1 + STEP_TIME_TIE)), key=lambda p: p.memory.total)
        return near + fits[len(near):]


# -- parameter counts ------------------------------------------------------------------------------
def layer_params(m: ModelConfig, tp: int) -> int:
    """One decoder layer on one TP rank: qkv (+bias), proj, SwiGLU fc1/fc2 split; the two norms replicated."""
    return numel(layer_shapes(m, tp))


def vision_params(v: VisionConfig, out_hidden: int, tp: int) -> int:
    """The vision tower on one TP rank (vision.py): patch Linear and norms replicated, blocks and merger split."""
    return numel(vision_shapes(v, out_hidden, tp))


def stage_params(m: ModelConfig, v: VisionConfig | None, tp: int, pp: int, stage: int, vpp: int = 1) -> int:
    """Trainable parameters on one rank of pipeline stage `stage` (its vpp model chunks together)."""
    return numel(rank_shapes(m, v, tp, pp, stage, vpp))


def total_params(m: ModelConfig, v: VisionConfig | None) -> int:
    return stage_params(m, v, 1, 1, 0)


# -- workload -------------------------------------------------------------------------------------
def workload_from_config(cfg: Config) -> Workload:
    """The PAPO step's shapes (train.py): rollout of prompts_per_step x n, then updates of global_batch_size."""
    views = 2 if cfg.loss.needs_masked_view else 1
    patches = 0
    if cfg.vision.enabled:
        patches = cfg.data.max_pixels // cfg.vision.patch_size**2
    responses = cfg.algo.prompts_per_step * cfg.rollout.n
    # Under fp8 the run pads token counts for TE's GEMMs (models/fp8_shapes.py): plan the padded lengths.
    def padded(n: int) -> int:
        return fp8_padded_length(n, cfg.model)

    return Workload(
        seq_len=padded(cfg.data.max_prompt_len + cfg.rollout.max_new_tokens),
        micro_batch_rows=cfg.train.micro_batch_size * (2 if cfg.loss.masked_grad else 1),
        nograd_rows=cfg.train.micro_batch_size * views,
        rows_per_update=cfg.train.global_batch_size,
        updates=max(1, cfg.train.ppo_epochs * responses // cfg.train.global_batch_size),
        rollout_prompts=cfg.algo.prompts_per_step, rollout_n=cfg.rollout.n,
        rollout_batch_rows=cfg.rollout.max_batch_rows, prompt_len=padded(cfg.data.max_prompt_len),
        max_new_tokens=cfg.rollout.max_new_tokens, image_patches=patches, reference=cfg.loss.kl_coef > 0,
        nograd_views=views, micro_batch_responses=cfg.train.micro_batch_size, chunked_logprobs=True,
    )


def lm_workload(seq_len: int, micro_batch_size: int, global_batch_size: int) -> Workload:
    """The LM step (lm_step.py): training only, no rollout, no reference, no images."""
    return Workload(seq_len=seq_len, micro_batch_rows=micro_batch_size, nograd_rows=0,
                    rows_per_update=global_batch_size, updates=1)


def rollout_chunk_prompts(work: Workload, dp: int) -> int:
    """Prompts in one generate batch on a DP rank (engine.prompt_chunks)."""
    prompts = work.rollout_prompts // dp
    if not work.rollout_batch_rows:
        return prompts
    return max(1, min(prompts, work.rollout_batch_rows // work.rollout_n))


def in_flight_microbatches(layout: Layout, stage: int, microbatches: int) -> float:
    """Micro-batches whose activations a pipeline rank holds at its peak, in units of a whole stage's
    layers. 1F1B: stage s runs pp - s forwards before its first backward. Interleaved (vpp > 1):
    megatron's warm-up is 2 (pp - s - 1) + (vpp - 1) pp model-chunk forwards, plus the one in
    progress, each holding 1/vpp of the stage's layers."""
    pp, vpp = layout.pp, layout.vpp
    if vpp == 1:
        return min(pp - stage, microbatches)
    chunks = min(2 * (pp - stage - 1) + (vpp - 1) * pp + 1, microbatches * vpp)
    return chunks / vpp


# -- memory ---------------------------------------------------------------------------------------
def param_bytes(precision: str) -> int:
    # fp8 keeps bf16 parameters (gpt.py PARAM_DTYPES); Transformer Engine casts GEMM inputs itself.
    return 4 if precision == "fp32" else 2


def token_layer_activation(m: ModelConfig, tp: int, recompute: str) -> float:
    """Elements one decoder layer keeps per token for backward (no sequence parallelism, no dropout).

    Replicated across TP: the two norm inputs and the two norm outputs feeding qkv / fc1 (4h).
    Split: q, k, v and their rotary copies, the attention output (= proj input), fc1's output
    SiLU's output and the SwiGLU product (= fc2 input):
    gpt.py turns bias_activation_fusion off, so SiLU keeps its own output. `selective` drops nothing here (flash attention already
    keeps no scores); `full` keeps only the layer input.
    """
    h, f = m.hidden_size, m.ffn_hidden_size
    kv = m.num_query_groups * (h // m.num_attention_heads)
    if recompute == "full":
        return h
    return 4 * h + (2 * (h + 2 * kv) + h + 4 * f) / tp


def vision_token_activation(v: VisionConfig, tp: int, recompute: str) -> float:
    """Per patch per vision layer; the tower's layers are not recomputed (model.recompute is the LM's)."""
    h, inner = v.hidden_size, v.intermediate_size
    return 4 * h + (2 * 3 * h + h + 3 * inner) / tp


def estimate_memory(m: ModelConfig, v: VisionConfig | None, layout: Layout, work: Workload, device: DeviceProfile,
                    *, distributed_optimizer: bool = True, recompute: str = "none") -> MemoryEstimate:
    """Peak bytes per rank on the busiest pipeline stage (the max over stages of `_stage_memory`)."""
    stages = [_stage_memory(m, v, layout, work, device, s, distributed_optimizer, recompute)
              for s in range(layout.pp)]
    return max(stages, key=lambda e: e.total)


def _stage_memory(m, v, layout: Layout, work: Workload, device: DeviceProfile, stage: int,
                  distributed_optimizer: bool, recompute: str) -> MemoryEstimate:
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    wb = param_bytes(m.precision)
    params = stage_params(m, v, tp, pp, stage, layout.vpp)
    layers = m.num_layers // pp
    weights = params * wb
    grads = params * 4  # grad_reduce_in_fp32: fp32 main_grad buffers whatever the param dtype
    opt_per_param = 8 + (4 if wb != 4 else 0)  # two Adam moments (+ fp32 master for bf16/fp8 params)
    optimizer = params * opt_per_param / (dp if distributed_optimizer else 1)
    if device.retains_init_weights:
        weights *= 2
    reference = params * wb if work.reference else 0.0
    head_dim = m.hidden_size // m.num_attention_heads
    kv_token_bytes = 2 * layers * (m.num_query_groups // tp) * head_dim * wb
    vocab_shard = m.padded_vocab_size // tp
    last, first = stage == pp - 1, stage == 0
    has_vision = first and v is not None and v.enabled and work.image_patches > 0

    # Rollout: the cache of one generate batch's rows at full length, plus its prefill's largest per-layer transient.
    kv_cache = rollout_transient = 0.0
    if work.rollout_prompts:
        prompts = rollout_chunk_prompts(work, dp)
        kv_cache = prompts * work.rollout_n * (work.prompt_len + work.max_new_tokens) * kv_token_bytes
        tokens = prompts * work.prompt_len
        rollout_transient = tokens * (m.hidden_size * 3 + 3 * m.ffn_hidden_size / tp) * wb
        if has_vision:
            rollout_transient += prompts * work.image_patches * (3 * v.hidden_size + 3 * v.intermediate_size / tp) * wb

    # Training: activations of the micro-batches in flight on this stage (1F1B), no-grad forwards are transient.
    microbatches = work.microbatches(dp)
    tokens = work.micro_batch_rows * work.seq_len
    per_mb = tokens * layers * token_layer_activation(m, tp, recompute) * wb
    if device.attention_stores_scores and recompute != "full":
        # Math SDPA keeps the attention probabilities and their pre-softmax scores, [rows, heads/tp, S, S].
        per_mb += 2 * layers * work.micro_batch_rows * (m.num_attention_heads // tp) * work.seq_len**2 * wb
    if first:
        per_mb += tokens * m.hidden_size * wb  # embedding output
    if has_vision:
        per_mb += (work.micro_batch_rows * work.image_patches * v.depth
                   * vision_token_activation(v, tp, recompute) * wb)
    in_flight = in_flight_microbatches(layout, stage, microbatches)
    activations = in_flight * per_mb
    logits = logits_bytes(work, vocab_shard, wb) if last else 0.0
    # Full recomputation: backward re-runs one layer's forward (recompute_num_layers=1, gpt.py) and keeps
    # all of that layer's activations until its gradient is done.
    recompute_working = 0.0
    if recompute == "full" and layers:
        recompute_working = tokens * token_layer_activation(m, tp, "none") * wb
    base = MemoryEstimate(stage, params, weights, grads, optimizer, reference, kv_cache, rollout_transient,
                          activations, logits, device.process_overhead_gb * GB, recompute_working,
                          in_flight=in_flight)
    if not device.cuda:
        return base
    v_in = v if has_vision else None
    groups = nccl_groups(m, layout, stage)
    return replace(base, fp8_weight_cache=FP8_WEIGHT_CACHE_BYTES * fp8_gemm_params(m, tp, pp, stage, layout.vpp),
                   rollout_inputs=rollout_input_bytes(work, v_in, dp) if first else 0.0,
                   train_inputs=train_input_bytes(work, v_in, first, last),
                   cuda_runtime=CUDA_RUNTIME_GB * GB, nccl=nccl_bytes(groups), nccl_communicators=groups,
                   fragmentation_fraction=FRAGMENTATION_FRACTION)


def rollout_input_bytes(work: Workload, v: VisionConfig | None, dp: int) -> float:
    """One generate batch on the first stage: ids at prompt + response positions, one image per prompt."""
    if not work.rollout_prompts:
        return 0.0
    prompts = rollout_chunk_prompts(work, dp)
    return device_input_bytes(work, v, prompts * work.rollout_n, work.prompt_len + work.max_new_tokens, prompts)


def logits_bytes(work: Workload, vocab_shard: int, wb: int) -> float:
    """Peak bytes of one micro-batch's logits and what the loss keeps beside them (last stage)."""
    tokens = work.micro_batch_rows * work.seq_len
    if not work.chunked_logprobs:
        # megatron's vocab_parallel_cross_entropy: the logits, an fp32 copy and the fp32 softmax it saves.
        return tokens * vocab_shard * (wb + 8)
    from papo_mega.algo.logprobs import CHUNK_BYTES

    # The gradient forward keeps its logits until backward writes their gradient beside them (both in
    # the param dtype); a no-grad forward keeps only its logits. Either works in two fp32 chunk buffers.
    nograd_tokens = work.nograd_rows * work.seq_len
    buffers = 2 * min(CHUNK_BYTES, max(tokens, nograd_tokens) * vocab_shard * 4)
    return max(2 * tokens, nograd_tokens) * vocab_shard * wb + buffers


# -- time -----------------------------------------------------------------------------------------
def estimate_step_time(m: ModelConfig, v: VisionConfig | None, layout: Layout, work: Workload,
                       device: DeviceProfile, recompute: str = "none") -> tuple[float, float]:
    """(rollout seconds, training seconds) of one step: an estimate, see the module doc."""
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    peak = (device.fp8_tflops if m.precision == "fp8" else device.bf16_tflops) * 1e12 * MODEL_FLOPS_UTILISATION
    n_lm = total_params(m, None)
    n_vision = vision_params(v, m.hidden_size, 1) if v is not None and v.enabled else 0
    model_gpus = tp * pp
    wb = param_bytes(m.precision)
    rollout = 0.0
    if work.rollout_prompts:
        prompts = work.rollout_prompts / dp
        prefill = 2 * (n_lm * prompts * work.prompt_len + n_vision * prompts * work.image_patches)
        chunk = rollout_chunk_prompts(work, dp)
        chunks = -(-(work.rollout_prompts // dp) // chunk)
        head_dim = m.hidden_size // m.num_attention_heads
        kv_token = 2 * m.num_layers * m.num_query_groups * head_dim * wb
        mean_kv = chunk * work.rollout_n * (work.prompt_len + work.max_new_tokens / 2) * kv_token
        # Each decode step reads every weight and its chunk's cache once; chunks and PP stages run one after another.
        decode = chunks * work.max_new_tokens * (n_lm * wb + mean_kv) / tp / (device.hbm_tb_s * 1e12)
        rollout = prefill / model_gpus / peak + decode
    rows = work.rows_per_update * work.updates / dp
    tokens = rows * work.seq_len
    grad_factor = 8 if recompute == "full" else 6
    train_rows = work.micro_batch_rows / max(1, work.nograd_rows or work.micro_batch_rows)
    flops = grad_factor * (n_lm * tokens * max(train_rows, 1) + n_vision * rows * work.image_patches)
    # No-grad forwards: old policy (x views) and the reference.
    flops += 2 * (n_lm * tokens + n_vision * rows * work.image_patches) * (work.nograd_views + work.reference)
    train = flops / model_gpus / peak
    microbatches = work.microbatches(dp)
    train *= 1 + (pp - 1) / (microbatches * layout.vpp)  # the (interleaved) 1F1B bubble
    if tp > 1:
        # 4 all-reduces of [tokens, hidden] per layer per forward+backward (2 for no-grad forwards).
        volume = tokens * m.hidden_size * wb * m.num_layers / pp * (4 + 2 * (work.nograd_views + work.reference))
        train += volume * 2 * (tp - 1) / tp / (device.link_gb_s * 1e9)
    return rollout, train


# -- layouts and the plan -------------------------------------------------------------------------
def candidate_layouts(m: ModelConfig, v: VisionConfig | None, gpus: int, work: Workload | None = None,
                      vpps: tuple[int, ...] = (1,)) -> tuple[list[Layout], dict[str, str]]:
    """Every tp*pp*dp = gpus split papo_mega can build (layout.py and vision.py rules), each pipelined
    one with every virtual-pipeline size in `vpps`, and why others fail."""
    from papo_mega.distributed.layout import ParallelLayout
    from papo_mega.errors import LayoutError
    from papo_mega.models.vision import check_vision_layout

    valid, rejected = [], {}
    for tp in (d for d in range(1, gpus + 1) if gpus % d == 0):
        for pp, vpp in ((d, c) for d in range(1, gpus // tp + 1) if (gpus // tp) % d == 0
                        for c in vpps if c == 1 or d > 1):
            layout = Layout(tp, pp, gpus // tp // pp, vpp)
            try:
                if tp > GPUS_PER_NODE:
                    raise LayoutError(f"tp_size={tp} spans nodes; keep tensor parallelism within {GPUS_PER_NODE} GPUs")
                par = ParallelLayout(tp_size=tp, pp_size=pp, vpp_size=vpp if vpp > 1 else None, world_size=gpus)
                par.check_model(num_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                                num_query_groups=m.num_query_groups, vocab_size=m.padded_vocab_size)
                if v is not None and v.enabled:
                    check_vision_layout(v, par)
                if work is not None:
                    _check_batch(work, layout)
            except PapoError as err:
                rejected[str(layout)] = str(err)
                continue
            valid.append(layout)
    return valid, rejected


def _check_batch(work: Workload, layout: Layout) -> None:
    from papo_mega.errors import LayoutError

    if work.rows_per_update % (layout.dp * (work.micro_batch_responses or work.micro_batch_rows)):
        raise LayoutError(f"global batch {work.rows_per_update} does not split into dp={layout.dp} x micro-batches")
    if work.rollout_prompts and work.rollout_prompts % layout.dp:
        raise LayoutError(f"algo.prompts_per_step={work.rollout_prompts} is not divisible by dp={layout.dp}")
    if work.rows_per_update % layout.dp:
        raise LayoutError(f"train.global_batch_size={work.rows_per_update} is not divisible by dp={layout.dp}")
    microbatches = work.microbatches(layout.dp)
    if layout.vpp > 1 and microbatches % layout.pp:
        raise LayoutError(f"interleaved pipelining needs micro-batches ({microbatches}) divisible by pp={layout.pp}")


def device_profile(name: str, precision: str) -> DeviceProfile:
    if name not in DEVICES:
        raise ConfigError(f"unknown GPU type '{name}'; choose one of: {', '.join(DEVICES)}")
    device = DEVICES[name]
    if precision == "fp8" and device.fp8_tflops is None:
        raise ConfigError(f"{name} has no fp8 tensor cores; use model.precision=bf16 or --gpu h100-80gb / h200")
    return device


def plan_config(cfg: Config, gpus: int, device_name: str = "h100-80gb", recompute: str | None = None) -> Plan:
    """Estimate every valid layout of `cfg`'s model on `gpus` GPUs of type `device_name`
    (recompute: None takes the recipe's model.recompute)."""
    recompute = cfg.model.recompute if recompute is None else recompute
    if recompute not in RECOMPUTE:
        raise ConfigError(f"--recompute {recompute!r} is not one of {' | '.join(RECOMPUTE)}")
    if gpus < 1:
        raise ConfigError(f"--gpus {gpus} must be >= 1")
    device = device_profile(device_name, cfg.model.precision)
    m, v = cfg.model, cfg.vision if cfg.vision.enabled else None
    work = workload_from_config(cfg)
    # Interleaved pipelining as an option of every pipelined layout: vpp 2, and the recipe's own size.
    vpps = tuple(sorted({1, 2, cfg.parallel.vpp_size or 1}))
    layouts, rejected = candidate_layouts(m, v, gpus, work, vpps)
    budget = device.usable_bytes
    plans = []
    for layout in layouts:
        memory = estimate_memory(m, v, layout, work, device, distributed_optimizer=cfg.parallel.use_distributed_optimizer,
                                 recompute=recompute)
        rollout_s, train_s = estimate_step_time(m, v, layout, work, device, recompute)
        plans.append(LayoutPlan(layout, memory, memory.total <= budget, rollout_s + train_s, rollout_s, train_s))
    return Plan(cfg.preset or "custom", gpus, device, m.precision, recompute, plans, rejected)


def plan(model: str, gpus: int, device_name: str = "h100-80gb", config_path: str | None = None,
         overrides: list[str] | None = None, recompute: str | None = None) -> Plan:
    """`papo-mega plan`: the recipe (or the defaults) with `model`'s preset."""
    from papo_mega.config import load_config
    from papo_mega.models.presets import PRESETS

    if model not in PRESETS:
        raise ConfigError(f"unknown model preset '{model}' for the planner; choose one of: {', '.join(PRESETS)}")
    if device_name not in DEVICES:
        raise ConfigError(f"unknown GPU type '{device_name}'; choose one of: {', '.join(DEVICES)}")
    if config_path is None:  # the recipe we ship for this model, if any: its precision, batch and recompute
        shipped = RECIPES_DIR / f"papo_g_{model.rsplit('-', 1)[-1]}.yaml"
        config_path = str(shipped) if model.startswith("qwen") and shipped.is_file() else None
        if config_path:
            print(f"[papo-mega] plan: workload from {shipped.name} (pass --config to plan another)", flush=True)
    # --model wins over the recipe's preset: the recipe's model section keeps its own keys (precision etc).
    cfg = load_config(config_path, [*(overrides or []), f"preset={model}"])
    return plan_config(cfg, gpus, device_name, recompute)


def require_fit(result: Plan) -> list[LayoutPlan]:
    """The fitting layouts, best first, or a PapoError saying why none fits."""
    fitting = result.fitting
    if fitting:
        return fitting
    if not result.layouts:
        reasons = "; ".join(sorted(set(result.rejected.values())))[:400]
        raise PapoError(f"no layout of {result.model} splits over {result.gpus} GPUs ({reasons}); "
                        f"use a GPU count that is a multiple of the tp*pp degrees the model allows")
    best = min(result.layouts, key=lambda p: p.memory.total)
    e = best.memory
    need = e.total / GB
    if e.rollout_peak >= e.train_peak:
        fix = (f"the rollout peaks ({e.kv_cache / GB:.0f} GB KV cache): set rollout.max_batch_rows to decode "
               f"fewer rows at once, or lower algo.prompts_per_step / rollout.max_new_tokens")
    else:
        fix = (f"training peaks ({(e.activations + e.logits) / GB:.0f} GB activations + logits): lower "
               f"train.micro_batch_size or use --recompute full")
    raise PapoError(
        f"no layout fits: {result.model} ({result.precision}) needs at least {need:.0f} GB per GPU "
        f"({best.layout}) but {result.device.name} has {result.device.memory_bytes / GB:.1f} GB x "
        f"{GPU_USABLE_FRACTION:.0%} usable; {fix}; or use more GPUs"
    )


__all__ = ["DEVICES", "Plan", "Workload", "estimate_memory", "estimate_step_time", "plan", "plan_config",
           "replace"]
