"""Transformer Engine's fp8 GEMM shape rule, the padding that keeps every GEMM inside it, and a CPU
checker that records the GEMM inputs a forward produces.

The rule. With fp8 on, TE's Linear / LayerNormLinear / LayerNormMLP forwards call
`assert_dim_for_fp8_exec(inputmat, weight)` (transformer_engine/pytorch/utils.py), which raises
"FP8 execution requires the product of all dimensions except the last to be divisible by 8 and the
last dimension to be divisible by 16" for the input and the weight. The MXFP8 recipe quantizes in
blocks of 32: `MXFP8Quantizer.is_quantizable` (pytorch/tensor/mxfp8_tensor.py) wants the last dim
and the product of the others % 32.

Where it applies. megatron-core enters TE's fp8 autocast inside `TransformerBlock.forward`
(transformer/transformer_block.py, `get_fp8_context` per layer): the decoder layers' linear_qkv,
linear_proj, linear_fc1 and linear_fc2. The output layer (GPTModel's tensor_parallel
ColumnParallelLinear, never a TE module, run after the block) and the vision tower (its own layer
loop before the decoder, a TransformerConfig without fp8) stay outside it.

What varies. The widths are fixed by the recipe (`fp8_dim_problem`, checked with the config). The
token count S*B of megatron's [S, B, H] activations follows the data, so under fp8:
- sequences (training, SFT, the rollout's prefill) are padded to a multiple of
  `fp8_token_multiple` = 16 (32 for mxfp8). 16, not TE's 8: it keeps S*B % 8 at every B, and in the
  backward the weight-gradient GEMM contracts over the tokens, where fp8 cuBLASLt GEMMs want
  16-element (16-byte) alignment; 64 would add up to 63 pad tokens a row for no stated rule;
- decode steps (S = 1) keep their rows at a multiple of `fp8_row_multiple` = 8 (32 for mxfp8).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from papo_mega.config import ModelConfig
from papo_mega.errors import PapoError

if TYPE_CHECKING:  # annotations only: the planner imports the padding rule and stays torch-free
    import torch


@dataclass(frozen=True)
class Fp8Rule:
    """TE's shape rule for one recipe: prod(shape[:-1]) % leading == 0 and shape[-1] % last == 0."""

    leading: int
    last: int

    def describe(self) -> str:
        return (f"the product of all dims but the last divisible by {self.leading} and the last dim "
                f"divisible by {self.last}")


def fp8_rule(recipe: str = "delayed") -> Fp8Rule:
    """delayed / tensorwise / blockwise: TE's (8, 16); mxfp8: blocks of 32 along both."""
    return Fp8Rule(32, 32) if recipe == "mxfp8" else Fp8Rule(8, 16)


def fp8_gemm_shape_ok(shape: Sequence[int], recipe: str = "delayed") -> bool:
    """Whether a GEMM operand of this shape (input or weight) passes TE's fp8 check."""
    rule = fp8_rule(recipe)
    return len(shape) >= 1 and math.prod(shape[:-1]) % rule.leading == 0 and shape[-1] % rule.last == 0


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def fp8_token_multiple(model: ModelConfig) -> int:
    """Multiple of sequence lengths under model.precision (1: no padding needed)."""
    if model.precision != "fp8":
        return 1
    return max(16, fp8_rule(model.fp8_recipe).leading)


def fp8_row_multiple(model: ModelConfig) -> int:
    """Multiple of the decode batch rows (one token each) under model.precision (1: no padding)."""
    return fp8_rule(model.fp8_recipe).leading if model.precision == "fp8" else 1


def fp8_padded_length(n: int, model: ModelConfig) -> int:
    """A sequence length of n tokens, padded so every fp8 GEMM's token count obeys TE's rule."""
    return round_up(n, fp8_token_multiple(model))


def fp8_padded_rows(n: int, model: ModelConfig) -> int:
    """Decode batch rows needed to carry n live rows under fp8 (the rest are inert)."""
    return round_up(n, fp8_row_multiple(model))


# --- Widths fixed by the recipe -----------------------------------------------------------------

GEMM_FIELDS = {
    "linear_qkv": "model.hidden_size / num_attention_heads / num_query_groups",
    "linear_proj": "model.hidden_size / num_attention_heads",
    "linear_fc1": "model.ffn_hidden_size",
    "linear_fc2": "model.ffn_hidden_size",
}
"""The config fields that set each decoder GEMM's weight shape."""


def decoder_gemm_weights(model: ModelConfig, tp_size: int) -> dict[str, tuple[int, int]]:
    """Local [out, in] weight of each decoder GEMM at this TP size (inputs are [tokens, in]):
    SwiGLU's fc1 holds gate and up; head_dim = hidden / heads (kv_channels in gpt.py)."""
    h, d = model.hidden_size, model.hidden_size // model.num_attention_heads
    q, kv = model.num_attention_heads * d // tp_size, model.num_query_groups * d // tp_size
    ffn = model.ffn_hidden_size // tp_size
    return {"linear_qkv": (q + 2 * kv, h), "linear_proj": (h, q), "linear_fc1": (2 * ffn, h), "linear_fc2": (h, ffn)}


def fp8_dim_problem(model: ModelConfig, tp_size: int) -> str | None:
    """One-line error for a decoder GEMM whose weight (so also its input's width) breaks TE's fp8
    rule whatever the padding; None when precision is not fp8 or every GEMM fits."""
    if model.precision != "fp8":
        return None
    rule = fp8_rule(model.fp8_recipe)
    for name, shape in decoder_gemm_weights(model, tp_size).items():
        if not fp8_gemm_shape_ok(shape, model.fp8_recipe):
            return (f"model.precision=fp8 (fp8_recipe={model.fp8_recipe}): the decoder's {name} weight is "
                    f"{list(shape)} per rank at tp_size={tp_size}, but Transformer Engine's fp8 GEMMs need "
                    f"{rule.describe()}; change {GEMM_FIELDS[name]} or parallel.tp_size, or set model.precision=bf16")
    return None


# --- The CPU checker ------------------------------------------------------------------------------


class Fp8ShapeError(PapoError):
    """A GEMM input that Transformer Engine's fp8 check would reject (raised by a strict checker)."""


@dataclass
class Fp8ShapeReport:
    """What the hooked GEMMs saw: every (module, input shape, weight shape), and the rule breakers."""

    recipe: str
    calls: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)


def _fp8_gemm_modules(chunk: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The linears megatron runs under TE's fp8 autocast: those inside a TransformerBlock (local
    spec: Column/RowParallelLinear; TE spec: the TE linears)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.transformer_block import TransformerBlock

    te_names = {"TELinear", "TEColumnParallelLinear", "TERowParallelLinear", "TELayerNormColumnParallelLinear"}
    found = []
    for block_name, block in chunk.named_modules():
        if not isinstance(block, TransformerBlock):
            continue
        for name, module in block.named_modules(prefix=block_name):
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear)) or type(module).__name__ in te_names:
                found.append((name, module))
    return found


@contextlib.contextmanager
def check_fp8_gemm_shapes(chunks, recipe: str = "delayed", strict: bool = False) -> Iterator[Fp8ShapeReport]:
    """Within the block, check every decoder GEMM's input and weight against TE's fp8 rule (the
    forward check TE makes when fp8 is on; on CPU the model runs fp32 and TE is absent, so tests
    turn this on explicitly). strict: raise Fp8ShapeError at the first breaker, as TE would."""
    report = Fp8ShapeReport(recipe)

    def hook(name: str):
        def check(module, args):
            inp, weight = args[0], module.weight
            report.calls.append((name, tuple(inp.shape), tuple(weight.shape)))
            for what, tensor in (("input", inp), ("weight", weight)):
                if not fp8_gemm_shape_ok(tensor.shape, recipe):
                    problem = f"{name} {what} {list(tensor.shape)}: fp8 needs {fp8_rule(recipe).describe()}"
                    report.violations.append(problem)
                    if strict:
                        raise Fp8ShapeError(problem)
        return check

    handles = [module.register_forward_pre_hook(hook(name))
               for chunk in chunks for name, module in _fp8_gemm_modules(chunk)]
    if not handles:
        raise ValueError("no decoder GEMM modules found to check; pass the model chunks")
    try:
        yield report
    finally:
        for handle in handles:
            handle.remove()
