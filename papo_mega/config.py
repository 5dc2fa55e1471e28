"""Typed configuration: one dataclass per component, YAML recipes, dotted command-line overrides.

    cfg = load_config("examples/tiny_lm.yaml", ["parallel.tp_size=2", "train.steps=5"])

Every field has a default and a one-line doc (`field_doc`). Unknown keys, wrong types and
impossible combinations raise `ConfigError` naming the key and the fix. `save_config` writes the
resolved config into the run directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from papo_mega.errors import ConfigError


def _f(default: Any, doc: str) -> Any:
    """A dataclass field with a default and its one-line documentation."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class ModelConfig:
    """The language model's architecture (the vision tower joins in a later component)."""

    num_layers: int = _f(4, "Transformer layers in the language model.")
    hidden_size: int = _f(64, "Width of the residual stream.")
    ffn_hidden_size: int = _f(128, "Inner width of the SwiGLU MLP.")
    num_attention_heads: int = _f(4, "Query heads per layer.")
    num_query_groups: int = _f(2, "Key/value heads (grouped-query attention); equal to heads for MHA.")
    vocab_size: int = _f(128, "Vocabulary size (real tokens).")
    vocab_pad_multiple: int = _f(128, "Pad the embedding/output rows to a multiple of this (same at every layout).")
    max_seq_len: int = _f(256, "Longest sequence the rotary tables are built for.")
    tie_embeddings: bool = _f(False, "Share the input embedding and the output layer.")
    rotary_base: float = _f(10000.0, "Base of the rotary position frequencies.")
    norm_eps: float = _f(1e-6, "RMSNorm epsilon.")
    precision: str = _f("fp32", "Compute precision: fp32 | bf16 | fp8 (fp8 needs Transformer Engine on CUDA).")
    fp8_recipe: str = _f("delayed", "Transformer Engine FP8 recipe: delayed | tensorwise | mxfp8 | blockwise.")
    fp8_format: str = _f("hybrid", "FP8 format: hybrid (e4m3 forward, e5m2 backward) | e4m3.")
    fp8_bf16_layers_start: int = _f(0, "With precision=fp8: first transformer layers kept in bf16 (not with delayed).")
    fp8_bf16_layers_end: int = _f(0, "With precision=fp8: last transformer layers kept in bf16 (not with delayed).")
    recompute: str = _f("none", "Activation recomputation in the language model: none | selective (core attention) | full (every layer's input only).")
    init_std: float = _f(0.02, "Standard deviation of the normal weight initialisation.")
    mrope_section: list = _f([], "Multimodal rotary sections (t, h, w) in rotary pairs, e.g. [16, 24, 24]; [] for 1D rope.")
    image_token_id: int = _f(151655, "Placeholder token id replaced by vision embeddings.")
    video_token_id: int = _f(151656, "Video placeholder token id (reserved).")
    vision_start_token_id: int = _f(151652, "Token id that opens an image span.")
    vision_end_token_id: int = _f(151653, "Token id that closes an image span.")

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and output layer; rows past vocab_size are never real tokens."""
        from papo_mega.distributed.layout import pad_vocab_size

        return pad_vocab_size(self.vocab_size, 1, self.vocab_pad_multiple)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_attention_heads="
                f"{self.num_attention_heads}; change one of them"
            )
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"model.num_query_groups={self.num_query_groups}; pick a divisor of the head count"
            )
        if self.precision not in ("fp32", "bf16", "fp8"):
            raise ConfigError(f"model.precision={self.precision!r} is not one of fp32, bf16, fp8")
        if self.fp8_recipe not in ("delayed", "tensorwise", "mxfp8", "blockwise"):
            raise ConfigError(f"model.fp8_recipe={self.fp8_recipe!r} is not one of delayed, tensorwise, mxfp8, blockwise")
        if self.fp8_format not in ("hybrid", "e4m3"):
            raise ConfigError(f"model.fp8_format={self.fp8_format!r} is not one of hybrid, e4m3")
        if self.recompute not in ("none", "selective", "full"):
            raise ConfigError(f"model.recompute={self.recompute!r} is not one of none, selective, full")
        start, end = self.fp8_bf16_layers_start, self.fp8_bf16_layers_end
        if start < 0 or end < 0 or start + end > self.num_layers:
            raise ConfigError(
                f"model.fp8_bf16_layers_start={start} / fp8_bf16_layers_end={end} must be >= 0 and add up to at "
                f"most num_layers={self.num_layers}"
            )
        if self.precision == "fp8" and (start or end) and self.fp8_recipe == "delayed":
            raise ConfigError(
                "model.fp8_recipe=delayed cannot keep layers in bf16 (megatron-core); use fp8_recipe=tensorwise "
                "(or mxfp8 / blockwise) or set model.fp8_bf16_layers_start=0 and fp8_bf16_layers_end=0"
            )
        head_pairs = self.hidden_size // self.num_attention_heads // 2
        if self.mrope_section and sum(self.mrope_section) != head_pairs:
            raise ConfigError(
                f"model.mrope_section={self.mrope_section} sums to {sum(self.mrope_section)}, but a head has "
                f"{head_pairs} rotary pairs (head_dim/2); make the sections add up to {head_pairs}"
            )


@dataclass
class VisionConfig:
    """The Qwen2.5-VL vision tower (ViT with 2D rotary, window attention, 2x2 patch merger)."""

    enabled: bool = _f(False, "Build the vision tower (false: a text-only language model).")
    depth: int = _f(2, "Vision transformer blocks.")
    hidden_size: int = _f(32, "Vision embedding width.")
    intermediate_size: int = _f(64, "Inner width of the vision SwiGLU MLP.")
    num_heads: int = _f(2, "Vision attention heads.")
    in_channels: int = _f(3, "Image channels.")
    patch_size: int = _f(14, "Spatial patch size in pixels.")
    temporal_patch_size: int = _f(2, "Frames per patch (images are repeated to fill it).")
    spatial_merge_size: int = _f(2, "Patches merged per side by the projector (2 -> 2x2).")
    window_size: int = _f(112, "Window-attention window side in pixels.")
    fullatt_block_indexes: list = _f([1], "Blocks that attend over the whole image instead of windows.")
    norm_eps: float = _f(1e-6, "RMSNorm epsilon in the vision tower.")

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"vision.hidden_size={self.hidden_size} is not divisible by vision.num_heads={self.num_heads}"
            )
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ConfigError(f"vision.fullatt_block_indexes {bad} are outside 0..{self.depth - 1}; fix the list")
        unit = self.patch_size * self.spatial_merge_size
        if self.window_size % unit:
            raise ConfigError(f"vision.window_size={self.window_size} is not a multiple of patch*merge = {unit}")


@dataclass
class DataConfig:
    """Where samples come from and how images and prompts are prepared."""

    train_shards: str = _f("", "Directory of webdataset shards (with manifest.json) for training.")
    eval_shards: str = _f("", "Directory of webdataset shards for evaluation.")
    shuffle_buffer: int = _f(256, "Samples held by the seeded shuffle buffer (0: no shuffling).")
    num_workers: int = _f(0, "Loader worker processes per data-parallel rank.")
    min_pixels: int = _f(56 * 56, "Smallest image area after smart resize (Qwen2.5-VL: 3136).")
    max_pixels: int = _f(28 * 28 * 1280, "Largest image area after smart resize (Qwen2.5-VL: 1003520).")
    mask_ratio: float = _f(0.6, "PAPO: probability that a 14x14-pixel cell is blackened.")
    mask_cell: int = _f(14, "PAPO: side of a masking cell in pixels.")
    mask_mode: str = _f("pixel", "PAPO mask: pixel (cells on the raw image) | patch (whole vision patches).")
    tokenizer: str = _f("", "tokenizer.json (HF tokenizers) or *.model (sentencepiece); '': the one stored in algo.init_from / --ckpt, else the tiny one (tiny-vocabulary models only).")
    max_prompt_len: int = _f(4096, "Longest prompt in tokens; longer prompts are skipped and counted.")
    max_skip_fraction: float = _f(0.01, "Stop with an error when more than this share of samples is skipped.")

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_ratio <= 1.0:
            raise ConfigError(f"data.mask_ratio={self.mask_ratio} must be within [0, 1]")
        if self.mask_mode not in ("pixel", "patch"):
            raise ConfigError(f"data.mask_mode={self.mask_mode!r} is not one of pixel, patch")
        if self.min_pixels > self.max_pixels:
            raise ConfigError(f"data.min_pixels={self.min_pixels} exceeds data.max_pixels={self.max_pixels}")


@dataclass
class ParallelConfig:
    """How the model and batch are split across ranks; dp is derived from the world size."""

    tp_size: int = _f(1, "Tensor-parallel degree (splits each layer's matrices).")
    pp_size: int = _f(1, "Pipeline-parallel degree (splits the layers into stages).")
    vpp_size: int | None = _f(None, "Virtual pipeline chunks per pipeline rank (interleaved 1F1B); null for off.")
    cp_size: int = _f(1, "Context-parallel degree (reserved; must be 1).")
    use_distributed_optimizer: bool = _f(True, "Shard optimizer states across data-parallel ranks.")
    timeout_s: float = _f(600.0, "Seconds a collective may wait before the job fails instead of hanging.")

    def layout_sizes(self) -> dict:
        return {"tp_size": self.tp_size, "pp_size": self.pp_size, "vpp_size": self.vpp_size, "cp_size": self.cp_size}


@dataclass
class TrainConfig:
    """Optimisation and batching."""

    steps: int = _f(10, "Optimizer steps to run.")
    seq_len: int = _f(32, "Tokens per training sequence.")
    micro_batch_size: int = _f(2, "Sequences per micro-batch on one data-parallel rank.")
    global_batch_size: int = _f(8, "Sequences per optimizer step, across all data-parallel ranks.")
    lr: float = _f(3e-3, "Peak learning rate (AdamW).")
    weight_decay: float = _f(0.01, "AdamW weight decay.")
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this value (0 for off).")
    seed: int = _f(1234, "Seed for initialisation and data.")
    log_every: int = _f(1, "Print metrics every this many steps.")
    lr_schedule: str = _f("constant", "Learning rate after warmup: constant | cosine (to min_lr at the last step).")
    warmup_steps: int = _f(0, "Linear warmup from 0 to lr over this many optimizer updates.")
    min_lr: float = _f(0.0, "Final learning rate of the cosine schedule.")
    ppo_epochs: int = _f(1, "Passes over each rollout batch (each pass = rollout responses / global_batch_size updates).")
    nonfinite_patience: int = _f(3, "Stop cleanly after this many consecutive steps with a NaN/inf loss or grad norm.")
    sanity_every: int = _f(50, "Check that data-parallel replicas hold identical weights every this many steps (0: off).")

    def __post_init__(self) -> None:
        for name in ("steps", "seq_len", "micro_batch_size", "global_batch_size", "ppo_epochs", "nonfinite_patience"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 1")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"train.lr_schedule={self.lr_schedule!r} is not one of constant | cosine")
        if self.warmup_steps < 0 or self.sanity_every < 0:
            raise ConfigError("train.warmup_steps and train.sanity_every must be >= 0")
        # Checked here, where the config is read, so the dry run refuses what the run would fail on
        # inside torch (a negative lr in AdamW, a negative seed in torch.manual_seed).
        if not self.lr > 0:
            raise ConfigError(f"train.lr={self.lr} must be > 0 (e.g. 1e-6 for a 7B model)")
        for name in ("weight_decay", "grad_clip", "min_lr", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 0")
        if self.log_every < 1:
            raise ConfigError(f"train.log_every={self.log_every} must be >= 1")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}; make it one"
            )


@dataclass
class LossConfig:
    """The PAPO / GRPO / DAPO objective (docs/algorithm.md; defaults: PAPO-G as published for 3B)."""

    clip_low: float = _f(0.2, "PPO lower clip: the ratio is clipped at 1 - clip_low.")
    clip_high: float = _f(0.3, "PPO upper clip: the ratio is clipped at 1 + clip_high (0.28 for DAPO/PAPO-D).")
    clip_dual: float | None = _f(3.0, "Dual clip: for negative advantages the loss is bounded by -clip_dual*A; null for off.")
    kl_coef: float = _f(0.01, "beta: weight of the KL to the reference model (0 drops the reference, as DAPO/PAPO-D do).")
    kl_estimator: str = _f("k3", "Reference KL estimator on sampled tokens: k1 | k2 | k3.")
    prcp_coef: float = _f(0.02, "gamma: weight of the implicit perception loss KL_prcp (maximised); 0 for GRPO.")
    prcp_clip: float | None = _f(None, "Clamp KL_prcp to [0, prcp_clip] before weighting (reference code option; null for off).")
    entropy_coef: float = _f(0.0, "eta1: weight of the entropy penalty on the original view.")
    masked_entropy_coef: float = _f(0.0, "eta2: weight of the entropy penalty on the masked view.")
    entropy_estimator: str = _f("sampled", "Entropy for the penalties: sampled (-log p of the sampled token, reference code) | full (whole vocabulary).")
    masked_grad: bool = _f(False, "false: masked log-probs from the no-grad old-policy forward (reference code); true: both views get gradient (paper).")
    temperature: float = _f(1.0, "Log-probs are of logits / temperature (the rollout temperature).")
    aggregation: str = _f("global_token_mean", "global_token_mean: every response token of an update weighs the same "
                                               "| microbatch_token_mean: the mean of each micro-batch's token mean (reference code).")
    prcp_schedule: str = _f("constant", "constant | linear: prcp_coef -> prcp_end_coef over the first prcp_anneal_fraction "
                                        "of train.steps, both entropy coefficients scaled alike (reference code's annealing).")
    prcp_end_coef: float = _f(0.0, "linear schedule: the KL_prcp weight reached after the anneal, then held.")
    prcp_anneal_fraction: float = _f(0.5, "linear schedule: the fraction of train.steps the anneal takes, in (0, 1].")

    def __post_init__(self) -> None:
        if not 0.0 <= self.clip_low < 1.0 or self.clip_high < 0.0:
            raise ConfigError(f"loss.clip_low={self.clip_low} must be in [0, 1) and loss.clip_high={self.clip_high} >= 0")
        if self.clip_dual is not None and self.clip_dual <= 1.0:
            raise ConfigError(f"loss.clip_dual={self.clip_dual} must be > 1 (3.0 is usual) or null for off")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ConfigError(f"loss.kl_estimator={self.kl_estimator!r} is not one of k1 | k2 | k3")
        if self.entropy_estimator not in ("sampled", "full"):
            raise ConfigError(f"loss.entropy_estimator={self.entropy_estimator!r} is not one of sampled | full")
        for name in ("kl_coef", "prcp_coef", "entropy_coef", "masked_entropy_coef"):
            if getattr(self, name) < 0:
                raise ConfigError(f"loss.{name}={getattr(self, name)} must be >= 0 (the sign of each term is fixed by PAPO)")
        if self.prcp_clip is not None and self.prcp_clip <= 0:
            raise ConfigError(f"loss.prcp_clip={self.prcp_clip} must be > 0 or null for off")
        if self.temperature <= 0:
            raise ConfigError(f"loss.temperature={self.temperature} must be > 0")
        self._check_aggregation_and_schedule()

    def _check_aggregation_and_schedule(self) -> None:
        if self.aggregation not in ("global_token_mean", "microbatch_token_mean"):
            raise ConfigError(f"loss.aggregation={self.aggregation!r} is not one of global_token_mean | microbatch_token_mean")
        if self.prcp_schedule not in ("constant", "linear"):
            raise ConfigError(f"loss.prcp_schedule={self.prcp_schedule!r} is not one of constant | linear")
        if self.prcp_end_coef < 0:
            raise ConfigError(f"loss.prcp_end_coef={self.prcp_end_coef} must be >= 0 (the sign of each term is fixed by PAPO)")
        if not 0.0 < self.prcp_anneal_fraction <= 1.0:
            raise ConfigError(f"loss.prcp_anneal_fraction={self.prcp_anneal_fraction} must be in (0, 1]")
        if self.prcp_schedule == "linear" and self.prcp_coef <= 0:
            # The entropy weights scale by coef / prcp_coef, as the reference's do: undefined at 0.
            raise ConfigError(f"loss.prcp_schedule=linear anneals from loss.prcp_coef={self.prcp_coef}; set prcp_coef > 0 "
                              f"or use loss.prcp_schedule=constant")

    @property
    def needs_masked_view(self) -> bool:
        """Whether the masked image view must be computed (its terms have weight, or masked_grad)."""
        return self.prcp_coef > 0 or self.masked_entropy_coef > 0 or self.masked_grad


@dataclass
class RolloutConfig:
    """Sampling G responses per prompt on the training model (docs/rollout.md)."""

    n: int = _f(5, "G: responses sampled per prompt (the GRPO group).")
    temperature: float = _f(1.0, "Sampling temperature; 0 for greedy decoding.")
    top_p: float = _f(0.99, "Nucleus sampling: keep the smallest set of tokens with this much probability (1.0 for off).")
    top_k: int = _f(0, "Keep only the k most likely tokens (0 for off).")
    max_new_tokens: int = _f(64, "Longest response; longer ones stop with finish reason 'length'.")
    stop: list = _f([], "Stop strings: a response ends after the first token that completes one.")
    max_batch_rows: int = _f(0, "Most rows (prompts x n) one rank decodes together: bounds the KV cache and the "
                                "prefill; prompts go in length-sorted chunks of max_batch_rows // n (0: all at once).")

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_new_tokens < 1:
            raise ConfigError(f"rollout.n={self.n} and rollout.max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.max_batch_rows and self.max_batch_rows < self.n:
            raise ConfigError(f"rollout.max_batch_rows={self.max_batch_rows} is below rollout.n={self.n}: a prompt's "
                              f"group decodes together; use at least {self.n} (or 0 for no limit)")
        if self.temperature < 0:
            raise ConfigError(f"rollout.temperature={self.temperature} must be >= 0 (0 is greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"rollout.top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ConfigError(f"rollout.top_k={self.top_k} must be >= 0 (0 for off)")


@dataclass
class RewardConfig:
    """How responses are scored (docs/rollout.md): reward = accuracy_weight * acc + format_weight * format."""

    accuracy_weight: float = _f(0.9, "Weight of answer accuracy (the last \\boxed{...} equals the ground truth).")
    format_weight: float = _f(0.1, "Weight of the format reward (<think>...</think> then \\boxed{...}).")
    verify_timeout_s: float = _f(2.0, "Time limit per answer for the math-verify equivalence check (then: exact match only).")

    def __post_init__(self) -> None:
        if self.accuracy_weight < 0 or self.format_weight < 0:
            raise ConfigError("reward.accuracy_weight and reward.format_weight must be >= 0")
        if self.verify_timeout_s <= 0:
            raise ConfigError(f"reward.verify_timeout_s={self.verify_timeout_s} must be > 0")


ALGORITHMS = ("grpo", "papo_g", "dapo", "papo_d")
TRACKERS = ("", "wandb")
"""`run.tracker` choices (metrics.open_tracker builds them)."""


@dataclass
class AlgoConfig:
    """Which RL algorithm and how each step gathers its batch (docs/training.md)."""

    name: str = _f("papo_g", "grpo | papo_g (GRPO + PAPO) | dapo | papo_d (DAPO + PAPO: no reference, dynamic sampling).")
    prompts_per_step: int = _f(8, "Prompts rolled out per step across all data-parallel ranks (G responses each).")
    max_resample: int = _f(20, "DAPO: re-sampling rounds after the first (each draws prompts_per_step prompts over all DP ranks); still short of prompts_per_step informative groups: a PapoError.")
    normalise_std: bool = _f(True, "Divide group-centred rewards by the group's std (GRPO); false: Dr. GRPO.")
    init_from: str = _f("", "Model directory to start from (SFT output or a converted HF model); '' random init.")
    eval_every: int = _f(0, "With data.eval_shards: evaluate before the first step, every this many steps and after the last (0: first and last only).")
    eval_samples: int = _f(64, "Questions per evaluation.")
    eval_k: int = _f(4, "Answers per question in evaluation (avg@k).")

    def __post_init__(self) -> None:
        if self.name not in ALGORITHMS:
            raise ConfigError(f"algo.name={self.name!r} is not one of {' | '.join(ALGORITHMS)}")
        if self.prompts_per_step < 1 or self.max_resample < 0:
            raise ConfigError("algo.prompts_per_step must be >= 1 and algo.max_resample >= 0")

    @property
    def dynamic_sampling(self) -> bool:
        return self.name in ("dapo", "papo_d")


@dataclass
class CheckpointConfig:
    """Training checkpoints: model, optimizer, scheduler, step, data position, RNG, config."""

    save_every: int = _f(10, "Save every this many steps (and at the end); 0: only at the end.")
    keep_last: int = _f(3, "Complete checkpoints to keep; older ones are deleted after a new one is published.")
    resume: str = _f("auto", "auto (the latest complete checkpoint in the run directory, if any) | none | a checkpoint path.")
    load_optimizer: bool = _f(True, "Restore optimizer state on resume (false: weights, step and data position only).")

    def __post_init__(self) -> None:
        if self.save_every < 0 or self.keep_last < 1:
            raise ConfigError("checkpoint.save_every must be >= 0 and checkpoint.keep_last >= 1")


@dataclass
class SFTConfig:
    """`papo-mega sft`: a supervised warm start on the training shards (answers in the PAPO format)."""

    steps: int = _f(200, "Optimizer steps.")
    lr: float = _f(1e-3, "Peak learning rate (cosine to 10%, 5% warmup).")
    micro_batch_size: int = _f(8, "Sequences per micro-batch on one data-parallel rank.")
    global_batch_size: int = _f(32, "Sequences per optimizer step across data-parallel ranks.")
    out: str = _f("", "Model directory to write (default RUN_DIR/sft).")
    blank_fraction: float = _f(0.0, "Share of samples shown with a blank image and their true answer: the model "
                                    "learns to keep the answer format and answer at the prior (chance) without "
                                    "the image, so vision reliance stays measurable (docs/sft.md).")

    def __post_init__(self) -> None:
        if self.steps < 1 or self.micro_batch_size < 1 or self.global_batch_size % self.micro_batch_size:
            raise ConfigError("sft.steps >= 1 and sft.global_batch_size a multiple of sft.micro_batch_size")
        if not self.lr > 0:
            raise ConfigError(f"sft.lr={self.lr} must be > 0")
        if not 0.0 <= self.blank_fraction < 1.0:
            raise ConfigError(f"sft.blank_fraction={self.blank_fraction} must be in [0, 1): a share of the samples")


@dataclass
class RunConfig:
    """Where a run writes and what it is called."""

    run_dir: str = _f("runs/default", "Directory for the resolved config, checkpoints and logs.")
    name: str = _f("default", "Run name shown in logs.")
    tensorboard: bool = _f(True, "Write TensorBoard event files under RUN_DIR/tb (from one rank).")
    collapse_window: int = _f(5, "Warn of collapse when KL_prcp and both entropies rose for this many steps in a row.")
    samples_every: int = _f(10, "Log sample generations (prompt, response, reward) after step 1, every this many steps and after the last; 0: never.")
    tracker: str = _f("", "Also log to this experiment tracker beside TensorBoard: '' (none) | wandb (pip install papo_mega[tracking]).")

    def __post_init__(self) -> None:
        if self.samples_every < 0 or self.collapse_window < 1:
            raise ConfigError("run.samples_every must be >= 0 and run.collapse_window >= 1")
        if self.tracker not in TRACKERS:
            raise ConfigError(f"run.tracker={self.tracker!r} is not one of {' | '.join(map(repr, TRACKERS))}")


@dataclass
class Config:
    """The whole job: one section per component."""

    preset: str = _f("", "Architecture preset filling model/vision (tiny, qwen2.5-vl-3b/7b/32b/72b); '' for none.")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"doc": "Language model architecture."})
    vision: VisionConfig = field(default_factory=VisionConfig, metadata={"doc": "Vision tower architecture."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"doc": "Data, images, masking, prompts."})
    parallel: ParallelConfig = field(default_factory=ParallelConfig, metadata={"doc": "Parallel layout."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"doc": "Optimisation and batching."})
    loss: LossConfig = field(default_factory=LossConfig, metadata={"doc": "PAPO / GRPO / DAPO objective."})
    rollout: RolloutConfig = field(default_factory=RolloutConfig, metadata={"doc": "Response sampling."})
    reward: RewardConfig = field(default_factory=RewardConfig, metadata={"doc": "Response scoring."})
    algo: AlgoConfig = field(default_factory=AlgoConfig, metadata={"doc": "RL algorithm and step composition."})
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata={"doc": "Training checkpoints."})
    sft: SFTConfig = field(default_factory=SFTConfig, metadata={"doc": "Supervised warm start."})
    run: RunConfig = field(default_factory=RunConfig, metadata={"doc": "Run directory and name."})

    def check(self, world_size: int) -> None:
        """Cross-component checks that need the world size (raises ConfigError / LayoutError)."""
        from papo_mega.distributed.layout import ParallelLayout

        layout = ParallelLayout(world_size=world_size, **self.parallel.layout_sizes())
        m = self.model
        layout.check_model(
            num_layers=m.num_layers,
            num_attention_heads=m.num_attention_heads,
            num_query_groups=m.num_query_groups,
            vocab_size=m.padded_vocab_size,
        )
        from papo_mega.models.fp8_shapes import fp8_dim_problem

        problem = fp8_dim_problem(m, layout.tp_size)  # widths no padding can fix (TE's fp8 GEMM rule)
        if problem:
            raise ConfigError(problem)
        per_stage = m.num_layers // layout.pp_size
        if m.precision == "fp8" and max(m.fp8_bf16_layers_start, m.fp8_bf16_layers_end) > per_stage:
            raise ConfigError(
                f"model.fp8_bf16_layers_start/end ({m.fp8_bf16_layers_start}/{m.fp8_bf16_layers_end}) may not exceed "
                f"the {per_stage} layers of one pipeline stage (megatron-core); lower them"
            )
        per_step = self.train.micro_batch_size * layout.dp_size
        if self.train.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={self.train.global_batch_size} is not a multiple of "
                f"micro_batch_size*dp = {self.train.micro_batch_size}*{layout.dp_size}; adjust one of them"
            )
        micro_batches = self.train.global_batch_size // per_step
        if layout.vpp_size and layout.vpp_size > 1 and micro_batches % layout.pp_size:
            raise ConfigError(
                f"interleaved pipelining needs micro-batches ({micro_batches}) divisible by pp_size="
                f"{layout.pp_size}; change train.global_batch_size"
            )

    def check_algorithm(self, dp_size: int = 1) -> None:
        """The algorithm's structural switches agree with the loss weights and batch sizes."""
        name, loss = self.algo.name, self.loss
        if name in ("grpo", "dapo") and (loss.prcp_coef or loss.masked_entropy_coef):
            raise ConfigError(f"algo.name={name} has no perception terms; set loss.prcp_coef=0 and "
                              f"loss.masked_entropy_coef=0, or use papo_{name[0]}")
        if name in ("papo_g", "papo_d") and loss.prcp_coef <= 0:
            raise ConfigError(f"algo.name={name} needs loss.prcp_coef > 0 (published: 0.02 PAPO-G, 0.01 PAPO-D)")
        if name in ("dapo", "papo_d") and loss.kl_coef:
            raise ConfigError(f"algo.name={name} drops the reference model; set loss.kl_coef=0")
        responses = self.algo.prompts_per_step * self.rollout.n
        if self.algo.prompts_per_step % dp_size:
            raise ConfigError(f"algo.prompts_per_step={self.algo.prompts_per_step} must be a multiple of the "
                              f"data-parallel size {dp_size}")
        if responses % self.train.global_batch_size:
            raise ConfigError(f"algo.prompts_per_step * rollout.n = {responses} responses per step is not a multiple "
                              f"of train.global_batch_size={self.train.global_batch_size} (responses per update)")


def field_doc(section: type, name: str) -> str:
    """The one-line documentation of a config field."""
    return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(section)}[name]


def _check_value(key: str, value: Any, annotation: Any) -> Any:
    """Coerce a YAML value to the field's type or raise ConfigError naming the key."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        inner = [a for a in options if a is not type(None)]
        return _check_value(key, value, inner[0])
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        # YAML 1.1 reads '1e-4' (no dot) as a string; it is a float to every user.
        try:
            return float(value)
        except ValueError:
            pass
    if annotation in (int, str, bool) and type(value) is annotation:
        return value
    container = origin or annotation
    if container in (list, dict) and isinstance(value, container):
        return value
    expected = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"{key}={value!r} should be of type {expected}; fix the value in the YAML or override")


def _build(section_cls: type, values: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(section_cls)
    names = [f.name for f in dataclasses.fields(section_cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            fix = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'; {fix}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"'{prefix}{key}' is a section; give it as a mapping of its keys")
            kwargs[key] = _build(hint, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_value(f"{prefix}{key}", value, hint)
    return section_cls(**kwargs)


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply 'a.b=value' strings to a nested dict; values are parsed as YAML scalars."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            node[parts[-1]] = raw
    return tree


def _with_preset(tree: dict) -> dict:
    """Defaults < preset < recipe < overrides: the preset fills what the recipe leaves out."""
    name = tree.get("preset")
    if not name:
        return tree
    from papo_mega.models.presets import preset_tree

    merged = preset_tree(str(name))
    for section, values in tree.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section].update(values)
        else:
            merged[section] = values
    return merged


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error.

    PyYAML keeps the last of two equal keys, so a recipe with two `train:` sections silently lost
    the first one's settings."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"'{key}' appears twice in one mapping (lines {seen[key] + 1} and "
                                  f"{key_node.start_mark.line + 1} of {self.name}); merge the two into one")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> Any:
    """A YAML file's contents, refusing duplicate keys (ConfigError naming both lines)."""
    path = Path(path)
    loader = _UniqueKeyLoader(path.read_text())
    loader.name = str(path)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _dotted_keys(tree: dict, prefix: str = "") -> set[str]:
    """Every leaf key of a nested dict, dotted ('train.lr'); a section given as a whole counts too."""
    keys = set()
    for key, value in tree.items():
        name = f"{prefix}{key}"
        keys.add(name)
        if isinstance(value, dict):
            keys |= _dotted_keys(value, f"{name}.")
    return keys


def explicit_keys(cfg: Config) -> frozenset[str]:
    """The dotted keys the recipe or an override set (not defaults, not the preset's fill).

    Model directories store the settings they were trained with (data, rollout, tokenizer); a
    loader lets those fill what the user did not set, while an explicit key wins."""
    return getattr(cfg, "_explicit_keys", frozenset())


def set_explicit_keys(cfg: Config, keys) -> Config:
    """Attach the explicit keys to cfg (dataclasses.replace drops them: call this on the copy)."""
    object.__setattr__(cfg, "_explicit_keys", frozenset(keys))
    return cfg


RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
"""The shipped recipes, package data (the checkout's examples/ links here): a wheel install has them."""


def shipped_recipes() -> list[str]:
    return sorted(p.name for p in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe(path: str | Path) -> Path:
    """A recipe file: the path as given if it exists, else a shipped recipe of that name.

    `examples/papo_g_7b.yaml`, `papo_g_7b.yaml` and `papo_g_7b` all name the shipped recipe from
    any directory, so the README's commands work outside the checkout (a wheel install)."""
    given = Path(path)
    if given.is_file():
        return given
    if given.parent in (Path("."), Path("examples")):
        shipped = RECIPES_DIR / (given.name if given.suffix else f"{given.name}.yaml")
        if shipped.is_file():
            return shipped
    raise ConfigError(f"config file {path} does not exist; pass a YAML recipe path or a shipped recipe name "
                      f"({', '.join(shipped_recipes())})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe (or the defaults), apply overrides and validate every section."""
    tree: dict = {}
    if path is not None:
        path = resolve_recipe(path)
        try:
            tree = read_yaml(path) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML ({str(err).splitlines()[0]}); fix the file") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (model:, parallel:, ...)")
    apply_overrides(tree, overrides or [])
    explicit = _dotted_keys(tree)
    tree = _with_preset(tree)
    try:
        cfg = _build(Config, tree, "")
    except TypeError as err:  # a dataclass rejected its arguments in a way _build did not foresee
        raise ConfigError(f"invalid config: {err}") from None
    return set_explicit_keys(cfg, explicit)


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, run_dir: str | Path) -> Path:
    """Write the resolved config as YAML into the run directory (atomically)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / "config.yaml"
    tmp = target.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    tmp.replace(target)
    return target
