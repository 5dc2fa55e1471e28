"""Rewards for responses: accuracy_weight * accuracy + format_weight * format (PAPO: 0.9 / 0.1).

    result = score_response(text, "3", cfg.reward)      # RewardResult(reward=1.0, accuracy=1.0, ...)
    results = score_batch(texts, truths, cfg.reward)    # many at once, math-verify in parallel
    reward_summary(results)                             # {"correct": 5, "wrong": 2, "no_answer": 1, ...}

accuracy is 1 when the last `\\boxed{...}` of the response matches the ground truth
(`verify.answers_match`), else 0: no box -> reason "no_answer", a math-verify check over
cfg.verify_timeout_s -> "timeout" (the exact-match steps run first, so a timeout never overrides
them). format is 1 when `extract.has_think_format` holds, else 0; it does not depend on accuracy.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from papo_mega.config import RewardConfig
from papo_mega.errors import PapoError
from papo_mega.reward.extract import extract_boxed, has_think_format
from papo_mega.reward.verify import CORRECT_REASONS, answers_match, answers_match_many


@dataclass(frozen=True)
class RewardResult:
    reward: float
    accuracy: float
    """1.0 or 0.0."""
    format: float
    """1.0 or 0.0."""
    reason: str
    """exact / choice / math_verify (correct), wrong / no_answer / timeout / bad_truth / error."""
    predicted: str | None
    """The extracted answer (content of the last box), None when there is none."""


SUMMARY_KEYS = ("correct", "wrong", "no_answer", "timeout", "bad_truth", "error")


def _result(cfg: RewardConfig, predicted: str | None, fmt: float, verdict: tuple[bool, str]) -> RewardResult:
    correct, reason = verdict
    accuracy = 1.0 if correct else 0.0
    return RewardResult(reward=cfg.accuracy_weight * accuracy + cfg.format_weight * fmt, accuracy=accuracy,
                        format=fmt, reason=reason, predicted=predicted)


def score_response(response_text: str, ground_truth: str, cfg: RewardConfig) -> RewardResult:
    """The reward of one response against its ground truth (any thread)."""
    predicted = extract_boxed(response_text or "")
    fmt = 1.0 if has_think_format(response_text or "") else 0.0
    verdict = (False, "no_answer") if not predicted else answers_match(predicted, ground_truth, cfg.verify_timeout_s)
    return _result(cfg, predicted, fmt, verdict)


def score_batch(texts: Sequence[str], truths: Sequence[str], cfg: RewardConfig) -> list[RewardResult]:
    """score_response for each (text, truth) pair: string-level verdicts without the worker pool,
    the rest checked in parallel on it. Results in input order."""
    if len(texts) != len(truths):
        raise PapoError(f"score_batch got {len(texts)} responses but {len(truths)} ground truths")
    predicted = [extract_boxed(text or "") for text in texts]
    formats = [1.0 if has_think_format(text or "") else 0.0 for text in texts]
    to_check = [i for i, pred in enumerate(predicted) if pred]
    verdicts: list[tuple[bool, str]] = [(False, "no_answer")] * len(texts)
    checked = answers_match_many([(predicted[i], truths[i]) for i in to_check], cfg.verify_timeout_s)
    for i, verdict in zip(to_check, checked):
        verdicts[i] = verdict
    return [_result(cfg, p, f, v) for p, f, v in zip(predicted, formats, verdicts)]


def reward_summary(results: Iterable[RewardResult]) -> dict[str, int]:
    """Counts per outcome for logging: correct (any correct reason), wrong, no_answer, timeout,
    bad_truth, error; plus `format_ok` (responses with the think/box format) and `total`."""
    counts: Counter[str] = Counter({key: 0 for key in SUMMARY_KEYS})
    total = format_ok = 0
    for result in results:
        total += 1
        format_ok += result.format > 0
        counts["correct" if result.reason in CORRECT_REASONS else result.reason] += 1
    return {**counts, "format_ok": format_ok, "total": total}
