"""Differences between the config a checkpoint was saved with and the config of the run resuming it.

A resume continues a run, so it must be the same run: a different algorithm, model, data or
objective would silently mix two experiments in one curve. The rule (docs/checkpoints.md,
"Config changes on resume"): every difference is *refused* unless its key is in the benign list
of the command - settings that only say how long to run, how often to save, log or evaluate,
where to write, or the parallel layout (the checkpoint reshards, or refuses with its own message).
`--allow-config-change` accepts refused differences; they are still printed.

Keys present on one side only (a newer or older papo_mega added or removed a field) are printed
but not refused: they come from a code change, not from the user.
"""

from __future__ import annotations

from typing import Any

import yaml

BENIGN_COMMON = ("train.steps", "train.log_every", "train.sanity_every", "train.nonfinite_patience",
                 "checkpoint.", "run.", "parallel.", "data.num_workers", "data.eval_shards",
                 "algo.eval_every", "algo.eval_k", "algo.eval_samples")
"""Keys (or section prefixes ending in '.') a resume may change for every command."""

BENIGN_TRAIN = BENIGN_COMMON + ("sft.",)
"""RL training: the sft section does not act on it."""

BENIGN_SFT = BENIGN_COMMON + ("sft.steps", "sft.out", "train.warmup_steps", "algo.", "loss.", "rollout.",
                              "reward.")
"""SFT: sft.steps sets its train.steps / train.warmup_steps; the RL sections (and algo.init_from,
which only chooses the starting weights, now in the checkpoint) do not act on it."""


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as {dotted key: leaf value}."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}."))
    return out


def normalise(tree: dict) -> dict:
    """The tree as save_config writes and read_yaml reads it back (tuples become lists, ...)."""
    return yaml.safe_load(yaml.safe_dump(tree, sort_keys=False)) or {}


def is_benign(key: str, benign: tuple[str, ...]) -> bool:
    return any(key == b or (b.endswith(".") and key.startswith(b)) for b in benign)


MISSING = "(absent)"


def config_diff(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """[(dotted key, saved value, current value)] of every leaf that differs, sorted by key."""
    old, new = flatten(normalise(saved)), flatten(normalise(current))
    keys = sorted(set(old) | set(new))
    return [(k, old.get(k, MISSING), new.get(k, MISSING)) for k in keys if old.get(k, MISSING) != new.get(k, MISSING)]


def refused(diff: list[tuple[str, Any, Any]], benign: tuple[str, ...]) -> list[tuple[str, Any, Any]]:
    """The differences a resume may not make without --allow-config-change."""
    return [d for d in diff if not is_benign(d[0], benign) and MISSING not in (d[1], d[2])]


def format_change(change: tuple[str, Any, Any]) -> str:
    key, old, new = change
    return f"{key} {old!r} -> {new!r}"


def describe(diff: list[tuple[str, Any, Any]]) -> str:
    return "; ".join(format_change(d) for d in diff)
