"""Stream samples from a shard directory: split across data-parallel ranks and loader workers,
seeded shuffle, every sample exactly once per epoch, and exact resume.

    stream = ShardStream("data/virl39k", dp_rank=rank, dp_size=dp, seed=1, shuffle_buffer=256, num_workers=2)
    stream.load_state_dict(saved)            # optional, before iterating
    for sample in stream:                    # {key, image_bytes, image_ext, meta, shard, index, epoch}
        ...
        saved = stream.state_dict()          # the position after the last sample handed out

The order of an epoch is a pure function of (manifest, seed, epoch, shuffle_buffer): the shards are
permuted, their samples laid end to end, and a windowed shuffle moves every sample by fewer than
`shuffle_buffer` places. Global position g of that order belongs to DP rank `g % dp_size`; a rank's
positions are dealt round-robin to its loader workers, and torch's DataLoader hands the workers'
outputs back round-robin, so each rank sees its positions in order whatever the worker count. The
state is (epoch, positions consumed by this rank): a restored stream starts at that position and
sees exactly the samples, in the same order, that the uninterrupted stream would have.

Bad samples (unreadable or truncated tar, missing members or JSON fields, undecodable image) are
skipped but still take their position, so the order and the state stay exact; they are counted and
logged with shard and key, together with the consumer's (`reject`), and the stream raises a
PapoError once they pass `max_skip_fraction` (data/skips.py: per epoch, or the share so far). See
docs/data.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from papo_mega.data.shard_writer import MANIFEST, read_manifest
from papo_mega.data.skips import SkipCounter
from papo_mega.errors import PapoError

logger = logging.getLogger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg")
STATE_VERSION = 1
SKIP_LOG_LIMIT = 20
"""Skips logged one by one per stream; later ones are only counted (see `ShardStream.skip_report`)."""
# Loader workers only read files and decode images (no CUDA, no collectives), so fork is safe and
# starts them in milliseconds; under a spawned rank the inherited default would be spawn, which
# re-imports torch and megatron in every worker at every epoch start (seconds each).
DEFAULT_CONTEXT = "fork" if "fork" in multiprocessing.get_all_start_methods() else None


class BadSample(Exception):
    """Raised by a transform for a sample that must be skipped and counted (not a bug)."""


@dataclass(frozen=True)
class ShardIndex:
    """The manifest as arrays: shard names, sample counts and each shard's first global sample id."""

    directory: Path
    names: tuple[str, ...]
    counts: np.ndarray
    offsets: np.ndarray
    """len(names) + 1 entries; shard s holds global ids offsets[s] .. offsets[s+1]-1."""
    fingerprint: str

    @property
    def num_samples(self) -> int:
        return int(self.offsets[-1])


def load_index(directory: str | Path) -> ShardIndex:
    """Read manifest.json; a missing, empty or unfinished manifest is a user error."""
    path = Path(directory)
    if not (path / MANIFEST).is_file():
        raise PapoError(f"{path} has no {MANIFEST}; write shards with tools/make_shards.py or make_synthetic.py")
    manifest = read_manifest(path)
    if manifest.get("complete") is False:
        raise PapoError(f"{path} is an unfinished conversion; rerun make_shards with --resume to complete it")
    shards = manifest.get("shards") or []
    if not shards or sum(s["count"] for s in shards) == 0:
        raise PapoError(f"{path}/{MANIFEST} lists no samples; convert some data first")
    counts = np.array([s["count"] for s in shards], dtype=np.int64)
    listing = json.dumps([[s["name"], s["count"]] for s in shards])
    return ShardIndex(path, tuple(s["name"] for s in shards), counts,
                      np.concatenate([[0], np.cumsum(counts)]),
                      hashlib.sha256(listing.encode()).hexdigest()[:16])


def epoch_order(index: ShardIndex, seed: int, epoch: int, shuffle_buffer: int) -> tuple[np.ndarray, np.ndarray]:
    """This epoch's order: (global ids, read positions), one entry per sample. Shards are permuted
    unless shuffle_buffer is 0, and samples shuffled within a window when it exceeds 1.

    Read position = place in the permuted-shard sequence the files are read in; a sample's
    position in the order differs from its read position by less than shuffle_buffer, so a reader
    holds at most about shuffle_buffer samples.
    """
    rng = np.random.default_rng([seed, epoch])
    # shuffle_buffer 0 means no shuffling at all (e.g. evaluation in file order).
    perm = rng.permutation(len(index.names)) if shuffle_buffer > 0 else np.arange(len(index.names))
    sequence = np.concatenate([np.arange(index.offsets[s], index.offsets[s + 1]) for s in perm])
    read_pos = np.arange(len(sequence))
    if shuffle_buffer > 1:
        # A jittered sort (key = position + U[0, B)) is a seeded shuffle within a window of B,
        # vectorised: an epoch of 10M samples is ordered in about a second.
        read_pos = np.argsort(read_pos + rng.random(len(sequence)) * shuffle_buffer, kind="stable")
    return sequence[read_pos], read_pos


def rank_length(num_samples: int, dp_rank: int, dp_size: int) -> int:
    """Samples of one epoch that fall to dp_rank (global positions dp_rank, dp_rank + dp_size, ...)."""
    return len(range(dp_rank, num_samples, dp_size))


class RankEpoch(IterableDataset):
    """One DP rank's samples of one epoch from rank position `start` on, split across DataLoader
    workers. Use with batch_size=None: each worker must yield single samples for the round-robin
    order to hold. Skipped samples come out as {'skipped': reason, ...} markers."""

    def __init__(self, index: ShardIndex, dp_rank: int, dp_size: int, seed: int, shuffle_buffer: int,
                 epoch: int, start: int = 0, transform: Callable[[dict], dict] | None = None,
                 verify_images: bool = True):
        super().__init__()
        self.index, self.dp_rank, self.dp_size, self.seed = index, dp_rank, dp_size, seed
        self.shuffle_buffer, self.epoch, self.start = shuffle_buffer, epoch, start
        self.transform, self.verify_images = transform, verify_images

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        ids, read_pos = epoch_order(self.index, self.seed, self.epoch, self.shuffle_buffer)
        # Worker w takes rank positions start+w, start+w+W, ...: counted from `start`, so that a
        # restored loader's first worker holds the next position and the round-robin stays in order.
        positions = np.arange(self.dp_rank, len(ids), self.dp_size)[self.start + worker::workers]
        for item in _in_order(self.index, ids[positions], read_pos[positions], self.verify_images):
            if "skipped" not in item:
                item["epoch"] = self.epoch
                item = self._transform(item)
            yield item

    def _transform(self, item: dict) -> dict:
        if self.transform is None:
            return item
        try:
            return self.transform(item)
        except BadSample as err:
            return _skip(str(err), item["shard"], item["key"], item["index"])


def _identity(item):
    return item


class ShardStream:
    """A DP rank's endless (or `epochs`-long) sample stream with a savable position."""

    def __init__(self, directory: str | Path, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 shuffle_buffer: int = 256, num_workers: int = 0, max_skip_fraction: float = 0.01,
                 epochs: int | None = None, transform: Callable[[dict], dict] | None = None,
                 verify_images: bool = True, multiprocessing_context: str | None = DEFAULT_CONTEXT,
                 skip_totals: dict | None = None):
        if not 0 <= dp_rank < dp_size:
            raise PapoError(f"dp_rank {dp_rank} is outside data-parallel size {dp_size}")
        self.index = load_index(directory)
        self.dp_rank, self.dp_size, self.seed, self.shuffle_buffer = dp_rank, dp_size, seed, shuffle_buffer
        self.num_workers, self.max_skip_fraction, self.epochs = num_workers, max_skip_fraction, epochs
        self.transform, self.verify_images = transform, verify_images
        self.multiprocessing_context = multiprocessing_context
        self.epoch, self.consumed, self.skipped = 0, 0, 0
        self.skip_counts: Counter[str] = Counter()
        # Stream skips and the consumer's (`reject`) share one limit; skip_totals: a checkpointed dict.
        self.skips = SkipCounter(max_skip_fraction, f"rank {dp_rank} of {self.index.directory}", skip_totals)

    @property
    def epoch_length(self) -> int:
        """Positions (samples, skipped ones included) this rank has in every epoch."""
        return rank_length(self.index.num_samples, self.dp_rank, self.dp_size)

    def __iter__(self) -> Iterator[dict]:
        while self.epochs is None or self.epoch < self.epochs:
            for item in self._positions(self.epoch, self.consumed):
                # Count before handing out: state_dict() after receiving sample k says k consumed.
                self.consumed += 1
                self.skips.count_read()
                if isinstance(item, dict) and "skipped" in item:  # a transform may return any object
                    self._record_skip(item)
                    continue
                yield item
            self.epoch, self.consumed, self.skipped = self.epoch + 1, 0, 0

    def _positions(self, epoch: int, start: int) -> Iterator[dict]:
        dataset = RankEpoch(self.index, self.dp_rank, self.dp_size, self.seed, self.shuffle_buffer, epoch,
                            start, self.transform, self.verify_images)
        if self.num_workers == 0 or start >= self.epoch_length:
            yield from dataset
            return
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                            multiprocessing_context=self.multiprocessing_context)
        iterator = iter(loader)
        try:
            yield from iterator
        finally:
            del iterator  # stops the worker processes when the consumer stops early

    def reject(self, item: dict, reason: str) -> None:
        """Count a sample the consumer could not use (e.g. a prompt over data.max_prompt_len) against
        max_skip_fraction, like the stream's own skips; PapoError past the limit."""
        self._record_skip(_skip(reason, item["shard"], item["key"], item["index"]),
                          hint="fix the cause or raise data.max_skip_fraction")

    def _record_skip(self, item: dict, hint: str = "repair or reconvert the shards") -> None:
        self.skipped += 1
        self.skip_counts[item["skipped"]] += 1
        if sum(self.skip_counts.values()) <= SKIP_LOG_LIMIT:
            logger.warning("skipped sample %s in %s (rank %d, epoch %d): %s", item["key"], item["shard"],
                           self.dp_rank, self.epoch, item["skipped"])
        self.skips.skip(f"{item['key']} in {item['shard']}: {item['skipped']}", self.epoch, self.skipped,
                        self.epoch_length, hint)

    def skip_report(self) -> dict[str, int]:
        """Skips by reason since this object was made (for logs; not part of the state)."""
        return dict(self.skip_counts)

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "consumed": self.consumed,
                "skipped": self.skipped, "seed": self.seed, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                "shuffle_buffer": self.shuffle_buffer, "dataset": self.index.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position (call before iterating). The worker count may differ."""
        expected = {"version": STATE_VERSION, "seed": self.seed, "dp_rank": self.dp_rank,
                    "dp_size": self.dp_size, "shuffle_buffer": self.shuffle_buffer,
                    "dataset": self.index.fingerprint}
        differ = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if differ:
            what = ", ".join(f"{k} saved {old!r} now {new!r}" for k, (old, new) in differ.items())
            raise PapoError(f"the saved data position does not fit this stream ({what}); resume with the "
                            f"saved data settings and shards, or start the data stream afresh")
        self.epoch, self.consumed, self.skipped = state["epoch"], state["consumed"], state["skipped"]


# -- reading ------------------------------------------------------------------------------------


def _skip(reason: str, shard: str, key: str, index: int) -> dict:
    return {"skipped": reason, "shard": shard, "key": key, "index": index}


def _in_order(index: ShardIndex, ids: np.ndarray, read_pos: np.ndarray, verify: bool) -> Iterator[dict]:
    """Samples `ids` in that order, read sequentially in read-position order; the few read ahead of
    their turn wait in a dict (bounded by the shuffle window)."""
    fetched = _fetch(index, ids[np.argsort(read_pos, kind="stable")], verify)
    waiting: dict[int, dict] = {}
    for gid in ids.tolist():
        while gid not in waiting:
            got, item = next(fetched)
            waiting[got] = item
        yield waiting.pop(gid)


def _fetch(index: ShardIndex, ids: np.ndarray, verify: bool) -> Iterator[tuple[int, dict]]:
    """(global id, sample or skip marker) for ids given in file order: shard by shard, ascending."""
    shard_of = np.searchsorted(index.offsets, ids, side="right") - 1
    breaks = np.flatnonzero(np.diff(shard_of)) + 1
    for run in np.split(np.arange(len(ids)), breaks):
        if len(run) == 0:
            continue
        shard = int(shard_of[run[0]])
        first = int(index.offsets[shard])
        for member, item in _read_shard(index.directory / index.names[shard], ids[run] - first, first, verify):
            yield first + member, item


def _read_shard(path: Path, wanted: np.ndarray, first_id: int, verify: bool) -> Iterator[tuple[int, dict]]:
    """Samples number `wanted` (ascending) of one tar. Others are skipped by seeking over them, so a
    rank reads little more than its own samples. What cannot be read becomes skip markers."""
    pending = iter(wanted.tolist())
    target = next(pending)
    reason = "missing from the shard (fewer samples than the manifest lists; truncated?)"
    try:
        # "r:" opens the file seekable: members nobody wants are stepped over, not read.
        with tarfile.open(path, "r:") as tar:
            for number, key, members in _samples_in_tar(tar):
                if number == target:
                    yield target, _decode(tar, key, members, path.name, first_id + target, verify)
                    target = next(pending, None)
                    if target is None:
                        return
    except (tarfile.TarError, OSError, EOFError) as err:
        reason = f"unreadable shard ({type(err).__name__}: {err})"
    # The rest of this shard's wanted samples (the tar's own keys are unknown past the damage).
    for number in [target, *pending]:
        yield number, _skip(reason, path.name, f"#{number}", first_id + number)


def _samples_in_tar(tar: tarfile.TarFile) -> Iterator[tuple[int, str, dict[str, tarfile.TarInfo]]]:
    """(sample number, key, {extension: member}) grouping consecutive members by webdataset key
    (the file name up to its first dot)."""
    number, key, members = -1, None, {}
    for info in tar:
        if not info.isfile():
            continue
        head, _, tail = info.name.rpartition("/")
        stem, _, ext = tail.partition(".")
        this_key = f"{head}/{stem}" if head else stem
        if this_key != key:
            if key is not None:
                yield number, key, members
            number, key, members = number + 1, this_key, {}
        members[ext] = info
    if key is not None:
        yield number, key, members


def _decode(tar: tarfile.TarFile, key: str, members: dict[str, tarfile.TarInfo], shard: str, gid: int,
            verify: bool) -> dict:
    """A sample dict, or a skip marker naming what is wrong with it."""
    data = {ext: tar.extractfile(info).read() for ext, info in members.items()}
    image_ext = next((ext for ext in IMAGE_EXTS if ext in data), None)
    if "json" not in data or image_ext is None:
        return _skip(f"missing {'json' if 'json' not in data else 'image'} member", shard, key, gid)
    try:
        meta = json.loads(data["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return _skip(f"bad json ({err})", shard, key, gid)
    missing = [f for f in ("question", "answer") if not isinstance(meta, dict) or f not in meta]
    if missing:
        return _skip(f"missing field {missing[0]!r}", shard, key, gid)
    if verify:
        try:
            with Image.open(io.BytesIO(data[image_ext])) as image:
                image.load()
        except Exception as err:  # noqa: BLE001 - PIL raises many types for bad bytes
            return _skip(f"undecodable image ({type(err).__name__})", shard, key, gid)
    return {"key": key, "image_bytes": data[image_ext], "image_ext": image_ext, "meta": meta,
            "shard": shard, "index": gid}
