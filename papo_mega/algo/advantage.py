"""Group-relative advantages (GRPO) and DAPO's dynamic-sampling filter: pure functions of rewards.

Rollouts arrive grouped: rows [g*G, (g+1)*G) are the G responses to prompt g.
"""

from __future__ import annotations

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
