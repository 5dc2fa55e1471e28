"""Is a predicted answer the ground truth? Cheap string rules first, then math-verify in a worker.

    answers_match("\\dfrac{1}{2}", "0.5", timeout_s=2.0)  -> (True, "math_verify")
    answers_match("Red.", "red", timeout_s=2.0)           -> (True, "exact")

Order (`quick_match`, then the pool):
1. normalised exact match (`normalize_answer`): `$`, `\\text{}`-style wrappers, `\\left`/`\\right`,
   LaTeX thin spaces and all whitespace removed, `\\dfrac`/`\\tfrac` -> `\\frac`, `\\%` -> `%`,
   trailing periods dropped, thousands separators dropped from plain numbers ("1,000"), words
   lower-cased. A ground truth that is itself boxed (ViRL39K stores `\\boxed{A}`) is unboxed first.
2. multiple choice: when the truth is a bare capital letter ("B", "(B)", "B."), the prediction's
   letter (`extract_choice`) must be that letter; nothing else is tried.
3. word answers (the truth is letters only, 2+ of them: colours, yes/no, left/right): exact match
   only. math-verify would read "red" as the product E*d*r and call "der" equal to it.
4. plain integers on both sides: compared as integers (exact, no pool round trip).
5. everything else: math-verify (`parse` + `verify`, LaTeX extraction only) in a worker process,
   with a hard limit of timeout_s per answer -> (False, "timeout") when it is exceeded.

Reasons: correct -> exact / choice / math_verify; incorrect -> wrong / no_answer / timeout /
bad_truth (empty or unparsable ground truth) / error (a worker crashed).
Model output is never evaluated as Python: the worker uses math-verify's LaTeX grammar only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

from papo_mega.reward import _pool
from papo_mega.reward.extract import extract_boxed, extract_choice, strip_text_wrappers

CORRECT_REASONS = ("exact", "choice", "math_verify")

_WORD_RE = re.compile(r"[A-Za-z][A-Za-z'\-]*")
_INTEGER_RE = re.compile(r"[+-]?\d+")
_DECIMAL_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_TRUTH_CHOICE_RE = re.compile(r"\(?([A-H])\)?[.:]?")
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_FRAC_RE = re.compile(r"\\[dt]frac(?![A-Za-z])")
_THIN_SPACE_RE = re.compile(r"\\[,;:! ]")
_TRAILING_PERIOD_RE = re.compile(r"(?<!\.)\.\s*$")


def unbox(answer: str) -> str:
    """The content of the last box when `answer` holds one (e.g. a ViRL39K truth `\\boxed{A}`), else answer."""
    boxed = extract_boxed(answer) if "\\boxed" in answer or "\\fbox" in answer else None
    return answer if boxed is None else boxed


def _strip_dollars(text: str) -> str:
    return text.replace("\\$", "").replace("$", "")


def normalize_answer(answer: str) -> str:
    """The canonical string used for the exact-match step (see the module docstring)."""
    text = strip_text_wrappers(_strip_dollars(unbox(answer or "")))
    text = _LEFT_RIGHT_RE.sub("", text)
    text = _FRAC_RE.sub(r"\\frac", text)
    text = _THIN_SPACE_RE.sub("", text.replace("\\%", "%"))
    text = re.sub(r"\s+", "", text).rstrip(".")
    if _THOUSANDS_RE.fullmatch(text):
        text = text.replace(",", "")
    if _WORD_RE.fullmatch(text):
        text = text.lower()
    return text


def truth_choice(truth: str) -> str | None:
    """The letter when the ground truth is a bare multiple-choice letter ("B", "(B)", "\\boxed{B}"), else None."""
    match = _TRUTH_CHOICE_RE.fullmatch(strip_text_wrappers(_strip_dollars(unbox(truth or ""))).strip())
    return match.group(1) if match else None


def quick_match(predicted: str, truth: str) -> tuple[bool, str] | None:
    """The verdict of steps 1-4, or None when math-verify has to decide."""
    norm_truth, norm_pred = normalize_answer(truth), normalize_answer(predicted)
    if not norm_truth:
        return False, "bad_truth"
    if not norm_pred:
        return False, "no_answer"
    if norm_pred == norm_truth:
        return True, "exact"
    letter = truth_choice(truth)
    if letter is not None:
        return (True, "choice") if extract_choice(predicted) == letter else (False, "wrong")
    if len(norm_truth) >= 2 and _WORD_RE.fullmatch(norm_truth):
        return False, "wrong"
    if _INTEGER_RE.fullmatch(norm_truth) and _INTEGER_RE.fullmatch(norm_pred):
        return (True, "exact") if int(norm_pred) == int(norm_truth) else (False, "wrong")
    if _DECIMAL_RE.fullmatch(norm_truth) and _DECIMAL_RE.fullmatch(norm_pred):
        try:
            if Decimal(norm_pred) == Decimal(norm_truth):
                return True, "exact"
        except InvalidOperation:
            pass
        # Unequal decimals go to math-verify, which allows for rounding (0.333333 vs 1/3-like truths).
    if _DECIMAL_RE.fullmatch(norm_truth) and len(norm_pred) >= 2 and _WORD_RE.fullmatch(norm_pred):
        return False, "wrong"  # a word for a number ("three" is not accepted)
    return None


def math_verify_input(answer: str) -> str:
    """What the worker gets: unboxed, without `$` and a final period; math-verify normalises the rest."""
    return _TRAILING_PERIOD_RE.sub("", _strip_dollars(unbox(answer)).strip())


def _from_pool(verdict: tuple[bool, str]) -> tuple[bool, str]:
    ok, reason = verdict
    return ok, "bad_truth" if reason == "unparsable_truth" else reason


def answers_match(predicted: str, truth: str, timeout_s: float) -> tuple[bool, str]:
    """(correct, reason) for a predicted answer (already extracted from its box) against the ground
    truth. Safe to call from any thread; math-verify gets at most timeout_s seconds."""
    quick = quick_match(predicted, truth)
    if quick is not None:
        return quick
    return _from_pool(_pool.get_pool().check(math_verify_input(truth), math_verify_input(predicted), timeout_s))


def answers_match_many(pairs: Sequence[tuple[str, str]], timeout_s: float) -> list[tuple[bool, str]]:
    """`answers_match` for many (predicted, truth) pairs: quick verdicts inline, the rest in parallel
    on the worker pool (each with its own timeout_s). Results in input order."""
    results: list[tuple[bool, str] | None] = [quick_match(pred, truth) for pred, truth in pairs]
    pending = [i for i, result in enumerate(results) if result is None]
    if pending:
        pool_pairs = [(math_verify_input(pairs[i][1]), math_verify_input(pairs[i][0])) for i in pending]
        for i, verdict in zip(pending, _pool.get_pool().check_many(pool_pairs, timeout_s)):
            results[i] = _from_pool(verdict)
    return results  # type: ignore[return-value]
