"""Shard streaming: every sample exactly once per epoch across DP ranks and loader workers, exact
resume in fresh processes (same samples, same order per rank, any worker count), bad samples and
truncated tars skipped, counted and logged."""

import logging
import tarfile
from itertools import islice

import pytest
from PIL import Image

from papo_mega.data.shard_writer import Sample, encode_png, write_shards
from papo_mega.data.shards import BadSample, ShardStream, epoch_order, load_index
from papo_mega.errors import PapoError
from tests.distributed.harness import run_distributed
from tests.distributed.shard_workers import resume, take

NUM_SAMPLES = 47  # odd: DP ranks get 24 and 23 samples per epoch
PER_SHARD = 5  # 10 shards, the last one short


def tiny_png(i: int) -> bytes:
    return encode_png(Image.new("RGB", (4, 4), (i % 256, 3 * i % 256, 0)))


def make_set(directory, num=NUM_SAMPLES, broken: dict | None = None) -> None:
    """Samples k0000...; `broken` maps index -> replacement (image bytes or meta) to plant bad ones."""
    broken = broken or {}

    def samples():
        for i in range(num):
            image = broken.get(i, {}).get("image", tiny_png(i))
            meta = broken.get(i, {}).get("meta", {"question": f"q{i}", "answer": str(i)})
            yield Sample(f"k{i:04d}", image, "png", meta)

    write_shards(samples(), directory, PER_SHARD)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shards")
    make_set(directory)
    return str(directory)


def epoch_indices(stream: ShardStream, epochs: int = 1) -> list[int]:
    return [s["index"] for s in islice(stream, stream.epoch_length * epochs)]


@pytest.mark.parametrize("dp_size,shuffle_buffer", [(1, 0), (2, 16), (3, 1), (4, 100)])
def test_every_sample_once_per_epoch(shard_dir, dp_size, shuffle_buffer):
    """Single-process simulation of the ranks: per epoch the ranks' samples partition the set."""
    orders = []
    for epoch in range(2):
        seen = []
        for rank in range(dp_size):
            stream = ShardStream(shard_dir, dp_rank=rank, dp_size=dp_size, seed=5, shuffle_buffer=shuffle_buffer)
            stream.load_state_dict({**stream.state_dict(), "epoch": epoch})
            seen += epoch_indices(stream)
        assert sorted(seen) == list(range(NUM_SAMPLES))
        orders.append(seen)
    assert (orders[0] != orders[1]) == (shuffle_buffer > 0), "epochs should differ exactly when shuffling"


def test_shuffle_window_is_bounded(shard_dir):
    index = load_index(shard_dir)
    ids, read_pos = epoch_order(index, seed=1, epoch=3, shuffle_buffer=8)
    assert sorted(ids.tolist()) == list(range(NUM_SAMPLES))
    assert max(abs(p - q) for p, q in enumerate(read_pos.tolist())) < 8
    assert (ids == epoch_order(index, seed=1, epoch=3, shuffle_buffer=8)[0]).all()  # a pure function
    assert (ids != epoch_order(index, seed=2, epoch=3, shuffle_buffer=8)[0]).any()


def test_exact_resume_dp2_two_workers(shard_dir):
    """Stop after k samples at DP2 x 2 workers, restore in fresh processes: the union of the two runs
    is the uninterrupted run, in order per rank, also when resumed with a different worker count.
    The uninterrupted and the stopped runs simulate the two ranks here (processes add nothing)."""
    settings = {"seed": 11, "shuffle_buffer": 12}
    total, stop_at = 40, 17  # past the end of the first epoch (24 / 23 per rank)
    full, heads, states, epoch0 = [], [], [], []
    for rank in range(2):
        stream = ShardStream(shard_dir, dp_rank=rank, dp_size=2, num_workers=2, **settings)
        full.append(take(stream, total))
        epoch0 += full[rank][:stream.epoch_length]
        stopped = ShardStream(shard_dir, dp_rank=rank, dp_size=2, num_workers=2, **settings)
        heads.append(take(stopped, stop_at))
        states.append(stopped.state_dict())
    assert [s["consumed"] for s in states] == [stop_at, stop_at]
    rest = run_distributed(resume, 2, args=(shard_dir, settings, [2, 1], states, total - stop_at), timeout_s=120)
    for rank in range(2):
        assert heads[rank] == full[rank][:stop_at]
        for continued in rest[rank]:
            assert heads[rank] + continued == full[rank], f"rank {rank}: resumed stream differs"
    assert all(epoch == 0 for _, _, epoch in epoch0)
    assert sorted(index for index, _, _ in epoch0) == list(range(NUM_SAMPLES))
    assert {key for _, key, _ in epoch0} == {f"k{i:04d}" for i in range(NUM_SAMPLES)}


def test_state_must_fit_the_stream(shard_dir):
    state = ShardStream(shard_dir, dp_rank=0, dp_size=2, seed=1).state_dict()
    with pytest.raises(PapoError, match="dp_size saved 2 now 4"):
        ShardStream(shard_dir, dp_rank=0, dp_size=4, seed=1).load_state_dict(state)
    with pytest.raises(PapoError, match="seed saved 1 now 2"):
        ShardStream(shard_dir, dp_rank=0, dp_size=2, seed=2).load_state_dict(state)


def _truncate(path, member: str, keep: int) -> None:
    """Cut the tar `keep` bytes into `member`'s data, as an interrupted copy would."""
    with tarfile.open(path) as tar:
        offset = tar.getmember(member).offset_data
    with open(path, "r+b") as stream:
        stream.truncate(offset + keep)


def test_bad_samples_and_truncated_tar(tmp_path, caplog):
    make_set(tmp_path, broken={3: {"image": b"not an image"}, 21: {"meta": {"question": "q"}}})
    _truncate(tmp_path / "shard-000006.tar", "k0032.png", 10)  # k0032..k0034 lost
    lost = {3, 21, 32, 33, 34}
    seen, skipped = [], {}
    with caplog.at_level(logging.WARNING, logger="papo_mega.data.shards"):
        for rank in range(2):
            stream = ShardStream(tmp_path, dp_rank=rank, dp_size=2, seed=2, shuffle_buffer=9, num_workers=2,
                                 max_skip_fraction=0.25, epochs=1)
            seen += [s["index"] for s in stream]
            for reason, count in stream.skip_report().items():
                skipped[reason.split(" (")[0]] = skipped.get(reason.split(" (")[0], 0) + count
    assert sorted(seen) == sorted(set(range(NUM_SAMPLES)) - lost)
    assert skipped["undecodable image"] == 1 and skipped["missing field 'answer'"] == 1
    assert sum(skipped.values()) == len(lost)
    logged = caplog.text
    assert "skipped sample k0003 in shard-000000.tar" in logged and "undecodable image" in logged
    assert "skipped sample k0021 in shard-000004.tar" in logged
    assert "in shard-000006.tar" in logged

    with pytest.raises(PapoError, match=r"were skipped, more than data.max_skip_fraction=0.05"):
        for _ in ShardStream(tmp_path, dp_rank=0, dp_size=2, max_skip_fraction=0.05, epochs=1):
            pass


def _drop_odd(sample: dict) -> dict:
    if sample["index"] % 2:
        raise BadSample("odd index")
    return sample


def test_transform_can_skip(shard_dir):
    stream = ShardStream(shard_dir, seed=1, num_workers=2, transform=_drop_odd, max_skip_fraction=0.6, epochs=1)
    assert sorted(s["index"] for s in stream) == list(range(0, NUM_SAMPLES, 2))
    assert stream.skip_report() == {"odd index": NUM_SAMPLES // 2}
