"""Worker functions for the shard-streaming tests (module-level so spawn can pickle them).

Each rank reads its rank and the data-parallel size from the launcher's variables (RANK,
WORLD_SIZE) and streams with `papo_mega.data.shards.ShardStream`; samples come back as
(global index, key, epoch) so the parent can compare order and coverage.
"""

from __future__ import annotations

import os
from itertools import islice

from papo_mega.data.shards import ShardStream


def take(stream: ShardStream, count: int) -> list[tuple[int, str, int]]:
    return [(s["index"], s["key"], s["epoch"]) for s in islice(stream, count)]


def resume(directory: str, settings: dict, worker_counts: list[int], states: list[dict], count: int) -> list:
    """Continue this rank from its saved state for `count` samples, once per worker count."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    runs = []
    for workers in worker_counts:
        stream = ShardStream(directory, dp_rank=rank, dp_size=world, num_workers=workers, **settings)
        stream.load_state_dict(states[rank])
        runs.append(take(stream, count))
    return runs
