"""DAPO's bounded re-sampling (advantage.first_informative / fill_informative), without processes.

Reference: one process reading the same samples in stream order - each round a flat keep vector
over the round's prompts, the first `target` True positions over the rounds in order. The per-rank
masks under test are that vector dealt round-robin the way ShardStream deals sample positions
(rank r reads positions r, r + dp, ...).
"""

import pytest
import torch

from papo_mega.algo.advantage import GroupPick, fill_informative, first_informative
from papo_mega.errors import PapoError


def dealt(flat: torch.Tensor, dp: int) -> torch.Tensor:
    """[dp, per_rank]: rank r's share of one round is flat[r::dp], as the stream deals it."""
    return torch.stack([flat[r::dp] for r in range(dp)])


def naive_first(flat_rounds: list[torch.Tensor], target: int) -> list[tuple[int, int]]:
    """(round, position in the round) of the first `target` informative groups one process meets."""
    found = []
    for round_, flat in enumerate(flat_rounds):
        for position, keep in enumerate(flat.tolist()):
            if keep and len(found) < target:
                found.append((round_, position))
    return found


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_picks_are_the_first_informative_groups_in_single_process_order(dp):
    rng = torch.Generator().manual_seed(dp)
    per_round = 8
    for trial in range(20):
        flat_rounds = [torch.rand(per_round, generator=rng) < 0.4 for _ in range(3)]
        target = 1 + trial % per_round
        picks = first_informative([dealt(f, dp) for f in flat_rounds], target)
        # Rank r's j-th group of a round is the round's position j * dp + r.
        assert [(p.round, p.index * dp + p.rank) for p in picks] == naive_first(flat_rounds, target)


def test_ranks_with_uneven_keeps_still_give_the_global_order():
    # Rank 0's share (positions 0, 2, 4, 6) is all informative, rank 1's only at position 7.
    flat = torch.tensor([1, 0, 1, 0, 1, 0, 1, 1], dtype=torch.bool)
    assert first_informative([dealt(flat, 2)], 5) == [GroupPick(0, 0, 0), GroupPick(0, 0, 1), GroupPick(0, 0, 2),
                                                      GroupPick(0, 0, 3), GroupPick(0, 1, 3)]


class Rounds:
    """draw_round for fill_informative: hands out the given masks and counts the calls."""

    def __init__(self, masks: list[torch.Tensor]):
        self.masks, self.calls = masks, []

    def __call__(self, attempt: int) -> torch.Tensor:
        self.calls.append(attempt)
        return self.masks[attempt]


def test_fills_exactly_the_target_and_draws_no_further():
    flats = [torch.tensor([1, 0, 0, 1]), torch.tensor([0, 1, 1, 1]), torch.tensor([1, 1, 1, 1])]
    draw = Rounds([dealt(f.bool(), 2) for f in flats])
    picks, rounds = fill_informative(draw, target=4, max_resample=5)
    assert draw.calls == [0, 1]  # round 1 brings the count to 2 + 3 >= 4: no third rollout
    assert len(picks) == 4 and len(rounds) == 2
    assert [(p.round, p.index * 2 + p.rank) for p in picks] == naive_first([f.bool() for f in flats], 4)


def test_no_resampling_when_the_first_round_is_informative():
    draw = Rounds([torch.ones(2, 3, dtype=torch.bool)])
    picks, _ = fill_informative(draw, target=6, max_resample=0)
    assert draw.calls == [0] and len(picks) == 6


@pytest.mark.parametrize("max_resample", [0, 3])
def test_stops_after_max_resample_rounds_with_a_one_line_error(max_resample):
    one_per_round = dealt(torch.tensor([0, 0, 1, 0], dtype=torch.bool), 2)
    draw = Rounds([one_per_round] * (max_resample + 5))
    with pytest.raises(PapoError) as err:
        fill_informative(draw, target=8, max_resample=max_resample)
    assert draw.calls == list(range(max_resample + 1))  # the first draw plus max_resample re-samples
    message = str(err.value)
    assert "\n" not in message
    assert f"found {max_resample + 1} informative prompt groups of the 8" in message
    for fix in ("algo.max_resample", "algo.prompts_per_step", "grpo", "papo_g"):
        assert fix in message
