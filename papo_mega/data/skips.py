"""One rule for every path that drops a sample (docs/data.md, "Skips").

A sample can be dropped by the stream (unreadable tar, bad JSON, undecodable image), by a stream
transform (sft's `make_example`), or by the consumer after the stream handed it out (train and
eval: `PromptTooLong`, `BadImage`). All of them count in one `SkipCounter` per stream, which stops
the run with a one-line PapoError when

- this epoch's skips already exceed `data.max_skip_fraction` of the epoch (certain: the epoch
  ends above the limit whatever comes next), or
- after MIN_SAMPLES samples, the share skipped so far exceeds it (so a run whose prompts are all
  too long stops after a few hundred samples, not after an epoch of millions), or
- a whole epoch was skipped (nothing usable: without this, max_skip_fraction >= 1 would loop
  forever looking for a usable sample).

A share above WARN_SHARE of the limit is reported once as a warning. The totals live in a dict the
caller checkpoints (train passes `trainer.counters`), so a resumed run judges the whole run.
"""

from __future__ import annotations

import logging

from papo_mega.errors import PapoError

logger = logging.getLogger(__name__)

MIN_SAMPLES = 200
"""Samples read before the running share is judged: one early skip must not stop a run."""
WARN_SHARE = 0.5
"""A running skip share above this part of data.max_skip_fraction is printed (once) as a warning."""
READ, SKIPPED = "samples_read", "samples_skipped"


class SkipCounter:
    """Samples read and skipped from one stream over the run; `skip()` raises past the limit."""

    def __init__(self, max_fraction: float, source: str, totals: dict | None = None):
        self.max_fraction, self.source = max_fraction, source
        self.totals = {} if totals is None else totals
        self.totals.setdefault(READ, 0)
        self.totals.setdefault(SKIPPED, 0)
        self.warned = False

    @property
    def read(self) -> int:
        return self.totals[READ]

    @property
    def skipped(self) -> int:
        return self.totals[SKIPPED]

    @property
    def fraction(self) -> float:
        return self.skipped / max(self.read, 1)

    def count_read(self) -> None:
        self.totals[READ] += 1

    def skip(self, why: str, epoch: int, epoch_skipped: int, epoch_length: int, hint: str) -> None:
        """Count one skip (`why`: which sample and the reason); PapoError past the limit, naming `hint`."""
        self.totals[SKIPPED] += 1
        if epoch_skipped >= epoch_length:
            raise PapoError(f"all {epoch_length} samples of {self.source} in epoch {epoch} were skipped, nothing "
                            f"is usable (last: {why}); {hint}")
        in_epoch = epoch_skipped / epoch_length
        so_far = self.fraction if self.read >= MIN_SAMPLES else 0.0
        limit = f"more than data.max_skip_fraction={self.max_fraction} (last: {why}); {hint}"
        if in_epoch > self.max_fraction:
            raise PapoError(f"{epoch_skipped} of the {epoch_length} samples of {self.source} in epoch {epoch} "
                            f"were skipped, {limit}")
        if so_far > self.max_fraction:
            raise PapoError(f"{self.skipped} of the {self.read} samples read from {self.source} so far "
                            f"were skipped, {limit}")
        if not self.warned and max(in_epoch, so_far) > WARN_SHARE * self.max_fraction:
            self.warned = True
            logger.warning("[papo-mega] WARNING: %d samples of %s skipped (%d of %d in epoch %d, %d of %d read so "
                           "far); the run stops above data.max_skip_fraction=%s; last: %s", self.skipped, self.source,
                           epoch_skipped, epoch_length, epoch, self.skipped, self.read, self.max_fraction, why)
