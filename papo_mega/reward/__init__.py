"""Response rewards: answer extraction, answer verification (math-verify in worker processes with a
hard per-answer time limit) and the PAPO reward 0.9 * accuracy + 0.1 * format.

    from papo_mega.reward import score_batch, reward_summary
    results = score_batch(responses, ground_truths, cfg.reward)
"""

from papo_mega.reward._pool import configure_pool, shutdown_pool
from papo_mega.reward.extract import extract_boxed, extract_choice, has_think_format
from papo_mega.reward.score import RewardResult, reward_summary, score_batch, score_response
from papo_mega.reward.verify import answers_match, answers_match_many, normalize_answer

__all__ = [
    "RewardResult",
    "answers_match",
    "answers_match_many",
    "configure_pool",
    "extract_boxed",
    "extract_choice",
    "has_think_format",
    "normalize_answer",
    "reward_summary",
    "score_batch",
    "score_response",
    "shutdown_pool",
]
