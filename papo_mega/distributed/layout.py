"""The parallel layout: how the world's ranks split into tensor, pipeline and data parallel groups.

tp * pp * cp * dp = world size, with dp derived. Megatron's rank order is tp fastest, then cp,
then dp, then pp (the default "tp-cp-ep-dp-pp" order), so a tensor-parallel group is made of
neighbouring ranks - on a GPU node, GPUs joined by NVLink.
"""

from __future__ import annotations

from dataclasses import dataclass

from papo_mega.errors import LayoutError


@dataclass(frozen=True)
class ParallelLayout:
    """A validated parallel layout for one world size."""

    tp_size: int = 1
    """Tensor-parallel degree: each layer's matrices are split across this many ranks."""
    pp_size: int = 1
    """Pipeline-parallel degree: the layers are split into this many consecutive stages."""
    vpp_size: int | None = None
    """Virtual pipeline chunks per pipeline rank (interleaved 1F1B); None for plain 1F1B."""
    cp_size: int = 1
    """Context parallelism (reserved: only 1 is supported)."""
    world_size: int = 1
    """Total number of ranks."""

    def __post_init__(self) -> None:
        for name in ("tp_size", "pp_size", "cp_size", "world_size"):
            if getattr(self, name) < 1:
                raise LayoutError(f"{name}={getattr(self, name)} must be >= 1")
        if self.cp_size != 1:
            raise LayoutError(f"cp_size={self.cp_size}: context parallelism is not supported yet; set cp_size=1")
        if self.vpp_size is not None:
            if self.vpp_size < 1:
                raise LayoutError(f"vpp_size={self.vpp_size} must be >= 1 (or unset)")
            if self.vpp_size > 1 and self.pp_size < 2:
                raise LayoutError(
                    f"vpp_size={self.vpp_size} needs pp_size >= 2; set pp_size>=2 or unset vpp_size"
                )
        model_parallel = self.tp_size * self.pp_size * self.cp_size
        if self.world_size % model_parallel:
            raise LayoutError(
                f"world size {self.world_size} is not divisible by tp*pp*cp = {self.tp_size}*{self.pp_size}"
                f"*{self.cp_size} = {model_parallel}; launch a multiple of {model_parallel} processes "
                f"or change tp_size/pp_size"
            )

    @property
    def dp_size(self) -> int:
        """Data-parallel degree, derived: world / (tp * pp * cp)."""
        return self.world_size // (self.tp_size * self.pp_size * self.cp_size)

    @property
    def virtual_chunks(self) -> int:
        """Model chunks held by each pipeline rank (1 without virtual pipelining)."""
        return self.vpp_size or 1

    def check_model(
        self, *, num_layers: int, num_attention_heads: int, num_query_groups: int, vocab_size: int
    ) -> None:
        """Raise `LayoutError` when the model cannot be split this way."""
        if num_attention_heads % self.tp_size:
            raise LayoutError(
                f"{num_attention_heads} attention heads are not divisible by tp_size={self.tp_size}; "
                f"choose a tp_size that divides {num_attention_heads}"
            )
        if num_query_groups % self.tp_size:
            raise LayoutError(
                f"{num_query_groups} KV heads are not divisible by tp_size={self.tp_size}; "
                f"choose a tp_size that divides {num_query_groups}"
            )
        stages = self.pp_size * self.virtual_chunks
        if num_layers % stages:
            raise LayoutError(
                f"{num_layers} layers are not divisible by pp_size*vpp_size = {stages}; "
                f"choose pp_size (and vpp_size) so that their product divides {num_layers}"
            )
        if vocab_size % self.tp_size:
            raise LayoutError(
                f"padded vocab size {vocab_size} is not divisible by tp_size={self.tp_size}; "
                f"set model.vocab_pad_multiple to a multiple of tp_size"
            )

    def describe(self) -> str:
        vpp = f" vpp{self.vpp_size}" if self.vpp_size else ""
        return f"tp{self.tp_size} pp{self.pp_size}{vpp} dp{self.dp_size} (world {self.world_size})"


def pad_vocab_size(vocab_size: int, tp_size: int, divisible_by: int = 128) -> int:
    """Round the vocabulary up to a multiple of divisible_by * tp_size.

    The padded rows are never real tokens; their logits are masked out. papo_mega pads with
    tp_size=1 (a layout-independent size) so that checkpoints reshard across TP degrees.
    """
    multiple = divisible_by * tp_size
    return ((vocab_size + multiple - 1) // multiple) * multiple
