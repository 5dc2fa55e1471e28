"""The planner's GPU-only memory terms (papo_mega/plan.py adds them on every profile but `cpu`).

Zero on the `cpu` profile, whose measured per-process overhead covers its runtime and the batch in
host memory. No GPU has measured them yet: each is assumed from the libraries' behaviour, to be
measured on GPU (tools/gpu_check.py, tests/gpu/test_plan_gpu.py). Pure functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from papo_mega.config import ModelConfig, VisionConfig

if TYPE_CHECKING:
    from papo_mega.plan import Layout, Workload

FP8_WEIGHT_CACHE_BYTES = 2
"""Per fp8-GEMM weight: TE's cached fp8 copy and its transpose for backward, 1 byte each. megatron's
TELinear.forward passes `None if self.disable_parameter_transpose_cache else self.is_first_microbatch`
(megatron/core/extensions/transformer_engine.py), so TE keeps both between micro-batches."""
CUDA_RUNTIME_GB = 1.0
"""CUDA context (~0.5 GB with lazy module loading) plus cuBLAS / cuBLASLt and TE workspaces per process."""
NCCL_BASE_GB, NCCL_PER_GROUP_GB = 0.5, 0.25
"""NCCL: proxy and bootstrap, plus buffers (NCCL_BUFFSIZE 4 MiB per channel, protocol and peer) per
communicator, which torch creates per process group at its first collective."""
FRAGMENTATION_FRACTION = 0.05
"""The caching allocator's reserved-but-unused share above the allocated peak (expandable segments on)."""
LOSS_BYTES_PER_TOKEN = 32
"""Last stage, per token: labels (int64); loss mask, old, reference, masked-view log-probs, advantage (fp32)."""
POSITION_IDS = 4
"""int64 ids per token on the first stage: the token id and the three M-RoPE position ids."""


def device_input_bytes(work: Workload, v: VisionConfig | None, rows: int, tokens: int, images: int) -> float:
    """Inputs copied to the first stage: token and M-RoPE position ids (int64) of rows x tokens, and the
    images' pixels - fp32 as the loader makes them plus the param-dtype copy the patch embedding casts to."""
    pixels = images * work.image_patches * v.in_channels * v.temporal_patch_size * v.patch_size**2 if v else 0
    return rows * tokens * POSITION_IDS * 8 + pixels * (4 + 2)


def train_input_bytes(work: Workload, v: VisionConfig | None, first: bool, last: bool) -> float:
    """The micro-batch in its forward step (train.py keeps the others on the host): its inputs on the first
    stage (the no-grad forward's both views), its loss inputs on the last; middle stages get hidden states."""
    rows = max(work.micro_batch_rows, work.nograd_rows)
    inputs = device_input_bytes(work, v, rows, work.seq_len, rows) if first else 0.0
    return inputs + (rows * work.seq_len * LOSS_BYTES_PER_TOKEN if last else 0.0)


def nccl_groups(m: ModelConfig, layout: Layout, stage: int) -> int:
    """NCCL communicators one rank of `stage` uses: tensor, pipeline and data parallel groups of more than
    one rank, the model-parallel group (gradient norm) and the world group (the stop flag) where they are
    distinct from those, and the embedding group of a tied model's first and last stages."""
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    groups = [tp > 1, pp > 1, dp > 1, tp > 1 and pp > 1, dp > 1 and tp * pp > 1,
              m.tie_embeddings and pp > 1 and stage in (0, pp - 1)]
    return sum(groups)


def nccl_bytes(groups: int) -> float:
    return (NCCL_BASE_GB + NCCL_PER_GROUP_GB * groups) * 1e9 if groups else 0.0  # GB = 1e9 bytes, as the planner
