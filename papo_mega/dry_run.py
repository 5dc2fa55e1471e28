"""`papo-mega train RECIPE --dry-run`: check a recipe at its real layout without GPUs or memory.

    papo-mega train examples/papo_g_72b.yaml --dry-run --world-size 32

One process plays one rank of the target job: torch.distributed's fake backend lets megatron-core
create tensor/pipeline groups of the real sizes without the other processes, and the model
chunks of that rank are built on the meta device (shapes only, no storage), so the 72B model at
TP8 PP4 is built in seconds on a laptop. The rank's parameter shapes are compared with the ones
derived analytically from the config (`expected_rank_shapes`); the recipe's cross-checks
(`Config.check`, `Config.check_algorithm`) and its paths are validated. The first stage (vision
tower, embedding) and the last stage (output layer) differ, so both are built as well.

A problem raises `PapoError` (the CLI prints one line, exits 2); success returns a `DryRunReport`,
which lists the inputs (shards, model directory, tokenizer) that do not exist yet, all of them,
with how to create each: checking a recipe does not need its data or model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from papo_mega.config import Config, ModelConfig
from papo_mega.distributed.layout import ParallelLayout
from papo_mega.errors import ConfigError, LayoutError, PapoError
from papo_mega.metrics import peak_rss_bytes
from papo_mega.models.param_shapes import numel, rank_shapes

# --- Expected parameter shapes, from the config alone (models/param_shapes.py) ---------------------


def expected_rank_shapes(cfg: Config, layout: ParallelLayout, pp_rank: int) -> list[tuple[int, ...]]:
    """Every local parameter shape held by a rank at pipeline position pp_rank (any TP/DP rank)."""
    return rank_shapes(cfg.model, cfg.vision, layout.tp_size, layout.pp_size, pp_rank, layout.virtual_chunks)


def expected_rank_params(cfg: Config, layout: ParallelLayout, pp_rank: int) -> int:
    """Parameters held by one rank at pipeline position pp_rank (counted once per rank)."""
    return numel(expected_rank_shapes(cfg, layout, pp_rank))


def total_params(cfg: Config) -> int:
    """Parameters of the whole model (single-process count; a tied output layer counted once)."""
    return expected_rank_params(cfg, ParallelLayout(world_size=1), 0)


# --- Building one rank on the meta device -------------------------------------------------------------


@contextlib.contextmanager
def _fake_world(rank: int, world_size: int, layout: ParallelLayout, seed: int):
    """torch.distributed with the fake backend and megatron's groups for one rank of the layout."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from papo_mega.distributed.cpu_mode import enable_cpu_mode
    from papo_mega.distributed.launcher import LaunchInfo
    from papo_mega.distributed.runtime import init_megatron_groups, quiet_known_warnings

    if dist.is_initialized():
        raise PapoError("--dry-run runs in a single process; start it without torchrun / srun / mpirun")
    quiet_known_warnings()
    if not torch.cuda.is_available():
        enable_cpu_mode()  # megatron's RNG tracker and device arguments, as in a CPU run
    dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
    try:
        launch = LaunchInfo("dry-run", rank, world_size, 0, 1, "127.0.0.1", 0)
        yield init_megatron_groups(layout, launch, "fake", torch.device("meta"), seed)
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


@contextlib.contextmanager
def _meta_build():
    """Build on the meta device with megatron-core's local layer spec and no weight initialisation.

    The layer spec only changes parameter names (TE fuses the norms into the linears), not shapes;
    the vision tower's name-seeded init would draw full tensors, so it is skipped.
    """
    from papo_mega.models import gpt, vision

    saved = gpt.transformer_engine_usable, vision.init_vision_tower
    gpt.transformer_engine_usable = lambda: False
    vision.init_vision_tower = lambda *args, **kwargs: None
    try:
        with torch.device("meta"):
            yield
    finally:
        gpt.transformer_engine_usable, vision.init_vision_tower = saved


def build_rank_shapes(cfg: Config, rank: int, world_size: int) -> tuple[int, list[tuple[int, ...]]]:
    """(pipeline rank, local parameter shapes) of the model chunks built for `rank` on the meta device."""
    from megatron.core import parallel_state

    from papo_mega.models.qwen_vl import build_model_chunks

    layout = ParallelLayout(world_size=world_size, **cfg.parallel.layout_sizes())
    # fp8 keeps bf16 parameters (models/gpt.py PARAM_DTYPES): the shapes are those of a bf16 build.
    model = dataclasses.replace(cfg.model, precision="bf16") if cfg.model.precision == "fp8" else cfg.model
    with _fake_world(rank, world_size, layout, cfg.train.seed) as groups, _meta_build():
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        if cfg.model.precision == "fp8":
            # megatron-core's own fp8 checks (bf16 layers per stage, recipe) on the real settings.
            from papo_mega.models.gpt import build_transformer_config

            try:
                build_transformer_config(cfg.model, groups)
            except ValueError as err:
                raise ConfigError(f"megatron-core rejects the fp8 settings: {err}") from None
        chunks = build_model_chunks(model, cfg.vision, groups, cfg.train.seed, initialise=False)
        params = [p for chunk in chunks for p in chunk.parameters()]
        if any(p.device.type != "meta" for p in params):
            raise RuntimeError("dry run: a parameter was allocated outside the meta device")
        return pp_rank, [tuple(p.shape) for p in params]


# --- Paths and the report -------------------------------------------------------------------------------


@dataclass
class PathReport:
    """The dry run's view of a recipe's paths: what was checked, and inputs that do not exist yet.

    A missing input is not an error: a recipe is usually checked before its data and model are
    prepared (the README's 72B dry run on a fresh clone), so every missing one is listed at once
    with the command that creates it. A path that exists but is wrong is an error."""

    checked: list = field(default_factory=list)
    to_create: list = field(default_factory=list)


def _check_shards(key: str, directory: str, paths: PathReport) -> None:
    """A shard directory: missing -> to create; present -> its manifest must be valid."""
    from papo_mega.data.shards import load_index

    if not Path(directory).exists():
        paths.to_create.append(f"{key}={directory}: write shards there (python tools/make_shards.py INPUT --out "
                               f"{directory}, or tools/make_synthetic.py --split ... --num N --out {directory})")
        return
    try:
        load_index(directory)
    except PapoError as err:
        raise ConfigError(f"{key}={directory}: {err}") from None
    paths.checked.append(f"{key} {directory}")


def _check_model_dir(init: Path, paths: PathReport) -> None:
    if not init.exists():
        paths.to_create.append(f"algo.init_from={init}: convert the HF model there (python "
                               f"tools/convert_hf_to_mcore.py --hf HF_DIR --out {init}; it loads at any layout)")
    elif not (init / "papo_model.json").is_file():
        raise ConfigError(f"algo.init_from={init} has no papo_model.json, so it is not a model directory; "
                          f"point it at tools/convert_hf_to_mcore.py or papo-mega sft output")
    else:
        paths.checked.append(f"algo.init_from {init}")


def _check_run_dir(run_dir: Path, paths: PathReport) -> None:
    probe = run_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"run.run_dir={run_dir} is not writable ({probe} is not a writable directory); "
                          f"choose another run.run_dir")
    paths.checked.append(f"run.run_dir {run_dir} (writable)")


def check_paths(cfg: Config) -> PathReport:
    """Validate the paths a run reads and writes; raise PapoError for the first wrong one and list
    the inputs still to be created."""
    paths = PathReport()
    if not cfg.data.train_shards:
        raise ConfigError("data.train_shards is empty; set it to a shard directory (tools/make_shards.py output)")
    _check_shards("data.train_shards", cfg.data.train_shards, paths)
    if cfg.data.eval_shards:
        _check_shards("data.eval_shards", cfg.data.eval_shards, paths)
    if cfg.algo.init_from:
        _check_model_dir(Path(cfg.algo.init_from), paths)
    if cfg.data.tokenizer:
        if Path(cfg.data.tokenizer).is_file():
            paths.checked.append(f"data.tokenizer {cfg.data.tokenizer}")
        else:
            paths.to_create.append(f"data.tokenizer={cfg.data.tokenizer}: put the HF model's tokenizer.json there, "
                                   f"or set data.tokenizer='' to use the one stored in algo.init_from")
    _check_run_dir(Path(cfg.run.run_dir), paths)
    return paths


def _fp8_note(model: ModelConfig) -> str | None:
    if model.precision != "fp8":
        return None
    from papo_mega.models.gpt import transformer_engine_usable

    bf16 = ""
    if model.fp8_bf16_layers_start or model.fp8_bf16_layers_end:
        bf16 = f", first {model.fp8_bf16_layers_start} / last {model.fp8_bf16_layers_end} layers in bf16"
    where = ("Transformer Engine usable here" if transformer_engine_usable()
             else "Transformer Engine not usable on this machine: the GPU nodes need it")
    return f"fp8 {model.fp8_recipe} ({model.fp8_format}{bf16}); {where}"


@dataclass
class DryRunReport:
    layout: ParallelLayout
    ranks: dict = field(default_factory=dict)
    """rank -> (pp_rank, parameters built on the meta device)."""
    total: int = 0
    checked: list = field(default_factory=list)
    to_create: list = field(default_factory=list)
    """Inputs the recipe names that do not exist yet, each with how to create it."""
    notes: list = field(default_factory=list)
    seconds: float = 0.0
    max_rss_mb: float = 0.0

    def lines(self) -> list[str]:
        out = [f"layout: {self.layout.describe()}"]
        for rank, (pp_rank, count) in sorted(self.ranks.items()):
            out.append(f"rank {rank} (pp stage {pp_rank}): {count:,} parameters ({_short(count)}) = expected")
        out.append(f"model: {self.total:,} parameters ({_short(self.total)})")
        out += [f"checked: {item}" for item in self.checked]
        out += [f"to create before the real run: {item}" for item in self.to_create]
        out += [f"note: {note}" for note in self.notes]
        pending = f"; {len(self.to_create)} input(s) to create before the real run (above)" if self.to_create else ""
        out.append(f"dry run ok in {self.seconds:.1f} s (peak RSS {self.max_rss_mb:.0f} MB){pending}")
        return out


def _short(count: int) -> str:
    return f"{count / 1e9:.2f} B" if count >= 1e8 else f"{count / 1e6:.2f} M"


def run_dry_run(cfg: Config, world_size: int | None = None, rank: int = 0) -> DryRunReport:
    """Validate cfg for one rank of its layout (and the first and last pipeline stage); raise PapoError."""
    from papo_mega.distributed.runtime import quiet_known_warnings

    quiet_known_warnings()
    start = time.perf_counter()
    p = cfg.parallel
    assumed = world_size is None
    world_size = world_size or p.tp_size * p.pp_size * p.cp_size
    layout = ParallelLayout(world_size=world_size, **p.layout_sizes())
    if not 0 <= rank < world_size:
        raise LayoutError(f"--rank {rank} is outside 0..{world_size - 1}; pass a rank of the job")
    cfg.check(world_size)
    cfg.check_algorithm(layout.dp_size)
    if cfg.vision.enabled:
        from papo_mega.models.vision import check_vision_layout

        check_vision_layout(cfg.vision, layout)
    report = DryRunReport(layout=layout, total=total_params(cfg))
    report.checked.append(f"recipe at world size {world_size} (layout, batch sizes, algorithm)")
    paths = check_paths(cfg)
    report.checked += paths.checked
    report.to_create = paths.to_create
    # Rank order is tp fastest, then dp, then pp: the same tp/dp coordinates on the first stage
    # (vision tower, embedding) and the last stage (output layer) are built too.
    per_stage = layout.tp_size * layout.dp_size
    first, last = rank % per_stage, rank % per_stage + per_stage * (layout.pp_size - 1)
    ranks = sorted({rank, first, last})
    for r in ranks:
        pp_rank, shapes = build_rank_shapes(cfg, r, world_size)
        expected = expected_rank_shapes(cfg, layout, pp_rank)
        if Counter(shapes) != Counter(expected):
            extra = sorted((Counter(shapes) - Counter(expected)).elements())[:3]
            missing = sorted((Counter(expected) - Counter(shapes)).elements())[:3]
            raise PapoError(f"rank {r}: built parameters differ from the config's: unexpected shapes {extra}, "
                            f"missing {missing}; report this with the recipe")
        report.ranks[r] = (pp_rank, numel(shapes))
    report.checked.append("parameter shapes and counts of the built ranks (meta device)")
    note = _fp8_note(cfg.model)
    if note:
        report.notes.append(note)
    if assumed:
        report.notes.append("data-parallel size 1 assumed; pass --world-size N for the job's GPU count")
    report.seconds = time.perf_counter() - start
    report.max_rss_mb = peak_rss_bytes() / 2**20
    return report
