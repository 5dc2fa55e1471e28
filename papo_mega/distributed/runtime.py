"""Bring up torch.distributed and megatron-core's process groups for one `ParallelLayout`.

The groups are returned in a `ParallelGroups` value and passed explicitly to whoever reduces over
them (../docs/parallel_runtime.md); megatron-core keeps its own module-level copies, which its
schedules and layers read.
"""

from __future__ import annotations

import datetime
import logging
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from papo_mega.distributed.cpu_mode import enable_cpu_mode
from papo_mega.distributed.launcher import LaunchInfo, detect_launch
from papo_mega.distributed.layout import ParallelLayout
from papo_mega.distributed.lifetime import tie_children_to_this_process
from papo_mega.errors import LaunchError, LayoutError

if TYPE_CHECKING:
    from papo_mega.config import Config

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's process groups and coordinates, handed to the code that reduces over them."""

    layout: ParallelLayout
    launch: LaunchInfo
    backend: str
    device: torch.device
    tp: dist.ProcessGroup
    pp: dist.ProcessGroup
    dp: dist.ProcessGroup
    """Data-parallel group (with context parallelism, when added, this becomes dp x cp)."""
    mp: dist.ProcessGroup
    """Model-parallel group: tp x pp, the ranks that hold one copy of the model."""
    embd: dist.ProcessGroup | None
    """First and last pipeline stage, which share tied embedding weights."""

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def tp_rank(self) -> int:
        return dist.get_rank(self.tp)

    @property
    def pp_rank(self) -> int:
        return dist.get_rank(self.pp)

    @property
    def dp_rank(self) -> int:
        return dist.get_rank(self.dp)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp_size - 1

    def pg_collection(self):
        """megatron-core's `ProcessGroupCollection` view of the same groups."""
        from megatron.core.process_groups_config import ProcessGroupCollection

        return ProcessGroupCollection.use_mpu_process_groups()


def default_backend() -> str:
    """nccl with CUDA, gloo without."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def _init_process_group(launch: LaunchInfo, backend: str, timeout_s: float) -> None:
    os.environ.setdefault("MASTER_ADDR", launch.master_addr)
    os.environ.setdefault("MASTER_PORT", str(launch.master_port))
    try:
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    except (RuntimeError, dist.DistError) as err:
        text = str(err)
        if "EADDRINUSE" in text or "address already in use" in text.lower():
            raise LaunchError(
                f"port {launch.master_port} on {launch.master_addr} is in use; "
                f"set MASTER_PORT to a free port (or --master-port for torchrun)"
            ) from None
        if "timed out" in text.lower() or "timeout" in text.lower():
            raise LaunchError(
                f"rendezvous at {launch.master_addr}:{launch.master_port} timed out: not all "
                f"{launch.world_size} ranks arrived; check the launcher's process count and MASTER_ADDR"
            ) from None
        raise


def quiet_known_warnings() -> None:
    """Silence warnings that are expected here and say nothing a user can act on."""
    for pattern in (
        r".*(Apex|apex|Transformer Engine).*not installed.*",  # optional by design
        r"full scope is deprecated.*",  # megatron's own default for cuda_graph_scope
        r".*CUDA_DEVICE_MAX_CONNECTIONS.*",  # GPU tuning hint, printed on CPU too
        r".*(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated.*",  # megatron 0.16 vs torch 2.13 names
        r"The .grad attribute of a Tensor that is not a leaf.*",  # megatron's schedule probes it
    ):
        warnings.filterwarnings("ignore", message=pattern)


def init_job(cfg: Config) -> ParallelGroups:
    """The process groups of a job configured by `cfg`, under whichever launcher started us.

    The config is checked against the launcher's world size first, so an impossible layout is one
    line before any process group starts, not a traceback on every rank."""
    from papo_mega.run_dir import check_writable

    launch = detect_launch()
    cfg.check(launch.world_size)
    check_writable(cfg.run.run_dir)  # every rank, before any group starts: no rank waits on a failed one
    return init_distributed(cfg.parallel.layout_sizes(), launch=launch, timeout_s=cfg.parallel.timeout_s,
                            seed=cfg.train.seed)


def init_distributed(
    layout_sizes: dict | None = None,
    *,
    launch: LaunchInfo | None = None,
    backend: str | None = None,
    timeout_s: float = 600.0,
    seed: int = 1234,
) -> ParallelGroups:
    """Initialise torch.distributed from the launcher and megatron-core's groups from the layout.

    layout_sizes holds tp_size / pp_size / vpp_size (world size comes from the launcher).
    On a machine without CUDA this also switches on the CPU mode (gloo backend).
    """
    quiet_known_warnings()
    launch = launch or detect_launch()
    tie_children_to_this_process(launch.launcher)  # a SIGKILL of this rank leaves no process behind
    layout = ParallelLayout(world_size=launch.world_size, **(layout_sizes or {}))
    backend = backend or default_backend()
    if backend == "gloo" and not torch.cuda.is_available():
        enable_cpu_mode()
        device = torch.device("cpu")
    else:
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    if not dist.is_initialized():
        _init_process_group(launch, backend, timeout_s)
    elif dist.get_world_size() != launch.world_size:
        raise LayoutError(f"torch.distributed already runs with {dist.get_world_size()} ranks, not {launch.world_size}")

    groups = init_megatron_groups(layout, launch, backend, device, seed, timeout_s)
    _log.info("rank %d/%d via %s: %s, backend %s", launch.rank, launch.world_size, launch.launcher, layout.describe(), backend)
    return groups


def init_megatron_groups(layout: ParallelLayout, launch: LaunchInfo, backend: str, device: torch.device, seed: int,
                         timeout_s: float = 600.0) -> ParallelGroups:
    """megatron-core's TP/PP/DP groups of `layout` over the running torch.distributed world, and its
    seeded RNG tracker (also used by `train --dry-run` over a fake world of the target size)."""
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp_size,
        pipeline_model_parallel_size=layout.pp_size,
        virtual_pipeline_model_parallel_size=layout.vpp_size,
        context_parallel_size=layout.cp_size,
        distributed_timeout_minutes=max(1, int(timeout_s // 60)),
        # megatron's gloo copies of the DP groups serve only the DistributedOptimizer's dp-zero
        # state gathers (save_parameter_state, 'dp_zero_gather_scatter', mem-efficient
        # 'fully_reshardable'); optim.py builds it with use_gloo_process_groups=False and
        # checkpoints use 'dp_reshardable', which gathers over the main group. So none, at any backend.
        create_gloo_process_groups=False,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ParallelGroups(
        layout=layout,
        launch=launch,
        backend=backend,
        device=device,
        tp=parallel_state.get_tensor_model_parallel_group(),
        pp=parallel_state.get_pipeline_model_parallel_group(),
        dp=parallel_state.get_data_parallel_group(with_context_parallel=True),
        mp=parallel_state.get_model_parallel_group(),
        embd=parallel_state.get_embedding_group(check_initialized=False),
    )


def shutdown_distributed() -> None:
    """Tear down megatron-core's groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
