"""Process groups from the launcher's environment, the parallel layout, and megatron-core on CPU."""

from papo_mega.distributed.launcher import LaunchInfo, detect_launch
from papo_mega.distributed.layout import ParallelLayout, pad_vocab_size
from papo_mega.distributed.runtime import ParallelGroups, init_distributed, init_job, shutdown_distributed

__all__ = [
    "LaunchInfo",
    "ParallelGroups",
    "ParallelLayout",
    "detect_launch",
    "init_distributed",
    "init_job",
    "pad_vocab_size",
    "shutdown_distributed",
]
