"""Group-relative advantages (GRPO) and DAPO's dynamic sampling (filter and bounded re-sampling): pure functions.

Rollouts arrive grouped: rows [g*G, (g+1)*G) are the G responses to prompt g.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from papo_mega.errors import PapoError

STD_EPS = 1e-6


def _grouped(values: torch.Tensor, group_size: int, name: str) -> torch.Tensor:
    if values.dim() != 1:
        raise PapoError(f"{name} has shape {tuple(values.shape)}; expected one value per response [N]")
    if group_size < 1 or values.numel() % group_size:
        raise PapoError(f"{values.numel()} {name} do not split into groups of {group_size}; "
                        "pass all G responses of every prompt, grouped by prompt")
    if not bool(torch.isfinite(values).all()):
        raise PapoError(f"{name} contain NaN or inf; the reward function must return finite numbers")
    return values.view(-1, group_size).to(torch.float64)


def grpo_advantages(rewards: torch.Tensor, group_size: int, normalise_std: bool = True) -> torch.Tensor:
    """A_i = (R_i - mean_group) / (std_group + 1e-6), unbiased std; [N] -> [N] float32.

    normalise_std=False gives R_i - mean_group (Dr. GRPO). A group of one response has no spread:
    its advantage is 0 (no signal), as in verl.
    """
    grouped = _grouped(rewards, group_size, "rewards")
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if normalise_std and group_size > 1:
        centred = centred / (grouped.std(dim=1, unbiased=True, keepdim=True) + STD_EPS)
    return centred.reshape(-1).float()


def dynamic_sampling_keep(accuracy: torch.Tensor, group_size: int, low: float = 0.01, high: float = 0.99) -> torch.Tensor:
    """DAPO: which prompt groups carry signal. [N] per-response accuracy -> [N / G] bool.

    A group whose responses are all right or all wrong has zero advantages everywhere; DAPO keeps
    only groups with low < mean accuracy < high and re-samples to fill the batch.
    """
    mean = _grouped(accuracy, group_size, "accuracies").mean(dim=1)
    return (mean > low) & (mean < high)


class GroupPick(NamedTuple):
    """One kept prompt group: the re-sampling round that drew it, the DP rank that holds it, and its
    index among that rank's prompts of the round."""

    round: int
    rank: int
    index: int


def first_informative(keep_rounds: Sequence[torch.Tensor], target: int) -> list[GroupPick]:
    """The first `target` informative groups (fewer if there are not as many) in the order one
    process reads the same samples. keep_rounds[k]: [dp, per_rank] bool, round k's
    `dynamic_sampling_keep` of every DP rank. ShardStream deals sample positions round-robin (rank
    r reads r, r + dp, ...), so within a round rank r's j-th group is position j * dp + r, and
    round k+1 reads on where round k stopped."""
    picks = []
    for round_, keep in enumerate(keep_rounds):
        ranks, per_rank = keep.shape
        for position in range(ranks * per_rank):
            rank, index = position % ranks, position // ranks
            if keep[rank, index]:
                picks.append(GroupPick(round_, rank, index))
                if len(picks) == target:
                    return picks
    return picks


def fill_informative(draw_round: Callable[[int], torch.Tensor], target: int,
                     max_resample: int) -> tuple[list[GroupPick], list[torch.Tensor]]:
    """DAPO's bounded re-sampling: call draw_round(k) (roll out round k's prompts on every rank and
    return their [dp, per_rank] keep mask) for k = 0, 1, ... until `target` groups are informative,
    at most 1 + max_resample times; (the first `target` picks, every round's mask). Every rank sees
    the same masks, so all run the same rounds. PapoError if the rounds run out: the batch is never
    trained short (the reference code raises too)."""
    rounds: list[torch.Tensor] = []
    while True:
        rounds.append(draw_round(len(rounds)).bool())
        picks = first_informative(rounds, target)
        if len(picks) == target:
            return picks, rounds
        if len(rounds) > max_resample:
            drawn = sum(int(mask.numel()) for mask in rounds)
            raise PapoError(f"dynamic sampling found {len(picks)} informative prompt groups of the {target} a step "
                            f"needs (algo.prompts_per_step) in {drawn} prompts ({len(rounds)} rounds, "
                            f"algo.max_resample={max_resample}); the others were all right or all wrong - raise "
                            f"algo.max_resample, lower algo.prompts_per_step, or use algo.name=grpo or papo_g "
                            f"(no filtering)")
