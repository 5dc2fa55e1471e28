"""One skip rule for every path that drops a sample (papo_mega/data/skips.py; issue 16, findings 5, 6)."""

import itertools
import logging
import signal
from collections import defaultdict
from types import SimpleNamespace

import pytest

from papo_mega.data.skips import MIN_SAMPLES, SkipCounter
from papo_mega.errors import PapoError


def _feed(counter: SkipCounter, reads: int, skips: int, epoch_length: int = 10**6) -> None:
    """`reads` samples read, the last `skips` of them skipped."""
    for i in range(reads):
        counter.count_read()
        if i >= reads - skips:
            counter.skip("k in s.tar: bad", 0, i - (reads - skips) + 1, epoch_length, "fix it")


def test_one_early_skip_does_not_stop_a_run():
    _feed(SkipCounter(0.01, "rank 0 of d"), reads=5, skips=1)


def test_the_running_share_is_judged_after_min_samples():
    counter = SkipCounter(0.01, "rank 0 of d")
    _feed(counter, reads=MIN_SAMPLES - 1, skips=0)
    with pytest.raises(PapoError, match=rf"3 of the {MIN_SAMPLES + 2} samples read from rank 0 of d so far were "
                                        r"skipped, more than data.max_skip_fraction=0.01 \(last: k in s.tar: bad\); fix it"):
        _feed(counter, reads=3, skips=3)


def test_a_whole_epoch_skipped_stops_even_without_a_limit():
    with pytest.raises(PapoError, match="all 4 samples of rank 0 of d in epoch 0 were skipped, nothing is usable"):
        _feed(SkipCounter(1.0, "rank 0 of d"), reads=4, skips=4, epoch_length=4)


def test_totals_live_in_the_callers_checkpointed_dict():
    counters = {"skipped_updates": 0}
    _feed(SkipCounter(0.5, "r", counters), reads=6, skips=1)
    resumed = dict(counters)  # what a checkpoint restores
    counter = SkipCounter(0.5, "r", resumed)
    assert (counter.read, counter.skipped) == (6, 1) and counters["samples_skipped"] == 1


def test_a_share_above_half_the_limit_is_warned_once(caplog):
    counter = SkipCounter(0.1, "rank 0 of d")
    with caplog.at_level(logging.WARNING, logger="papo_mega.data.skips"):
        _feed(counter, reads=100, skips=8, epoch_length=100)  # 6 % and 8 %: above 5 %, below 10 %
    warnings = [r for r in caplog.records if "WARNING" in r.getMessage()]
    assert len(warnings) == 1 and "data.max_skip_fraction=0.1" in warnings[0].getMessage()


def _trainer_that_never_finds_a_prompt(monkeypatch, stop):
    """A PapoTrainer stand-in for _next_prompts whose every prompt is too long, with no skip limit."""
    from papo_mega import train
    from papo_mega.data.prompts import PromptTooLong

    def too_long(*_args, **_kwargs):
        raise PromptTooLong(100, 8)

    monkeypatch.setattr(train, "prepare_prompt", too_long)
    rejected = []
    item = {"key": "k", "shard": "s.tar", "index": 0}
    cfg = SimpleNamespace(loss=SimpleNamespace(needs_masked_view=False), data=None, vision=None,
                          train=SimpleNamespace(seed=1))
    return SimpleNamespace(cfg=cfg, samples=itertools.repeat(item), tokenizer=None, stop=stop,
                           stream=SimpleNamespace(reject=lambda item, reason: rejected.append(reason)),
                           stage_seconds=defaultdict(float)), rejected


@pytest.mark.timeout(60)
def test_a_stop_signal_ends_a_search_that_only_skips(monkeypatch):
    """A stop signal cannot wait for the end of a step that may never get its prompts (finding 6)."""
    from papo_mega.train import PapoTrainer, StopRequest

    stop = StopRequest()
    try:
        stop.signum = signal.SIGTERM  # as if the handler had run
        trainer, rejected = _trainer_that_never_finds_a_prompt(monkeypatch, stop)
        with pytest.raises(PapoError, match="stopped by SIGTERM while step 4 was skipping unusable samples"):
            PapoTrainer._next_prompts(trainer, 4, 3)
        assert rejected and "prompt has 100 tokens" in rejected[0]
        assert set(trainer.stage_seconds) == {"stream", "prepare"}
    finally:
        stop.restore()
