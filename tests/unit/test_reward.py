"""Rewards: boxed-answer extraction, the think/box format rule, answer equivalence (exact, multiple
choice, math-verify in worker processes), the 0.9/0.1 weighting, hard timeouts from any thread,
the synthetic suite's answers, and that model output is never run as Python."""

import threading
import time

import pytest

from papo_mega.config import RewardConfig
from papo_mega.data.synthetic import COLOURS, TASKS, generate
from papo_mega.errors import PapoError
from papo_mega.reward import (
    _pool,
    answers_match,
    answers_match_many,
    extract_boxed,
    extract_choice,
    has_think_format,
    normalize_answer,
    reward_summary,
    score_batch,
    score_response,
    shutdown_pool,
)
from papo_mega.reward._pool import VerifyPool, WorkerStartError

CFG = RewardConfig()
TOWER = "9^{9^{9^{9^{9}}}}"
OTHER_TOWER = "9^{9^{9^{9^{8}}}}"  # math-verify/sympy hang comparing these two


def respond(answer: str, think: str = "Let me look at the image.") -> str:
    return f"<think>{think}</think> The answer is \\boxed{{{answer}}}."


@pytest.fixture(scope="module", autouse=True)
def _shutdown_after_module():
    yield
    shutdown_pool()


# ---- extraction -------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{\\frac{1}{\\sqrt{2}}}.", "\\frac{1}{\\sqrt{2}}"),
    ("\\boxed{{a}}", "{a}"),
    ("first \\boxed{1}, then \\boxed{2}, finally \\boxed{ 3 }", "3"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are not grouping
    ("\\boxed {x^{2}}", "x^{2}"),
    ("\\boxed 5", "5"),
    ("answer: $\\boxed 42$", "42"),
    ("\\fbox{7}", "7"),
    ("\\boxed{}", ""),
    ("\\boxed{\\frac{1}{2}", None),  # unbalanced
    ("\\boxed{1} and then \\boxed{\\frac{2}{3}", None),  # the last box is cut off: no answer
    ("no box here", None),
    ("\\boxedX", None),
    ("", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("B", "B"), ("b", "B"), ("(B)", "B"), ("B.", "B"), ("B)", "B"), ("\\text{B}", "B"), ("$C$", "C"),
    ("\\boxed{(D)}", "D"), ("Option E", "E"), ("(A) 42", "A"), ("C. forty two", "C"), ("\\boxed{\\textbf{(B)}}", "B"),
    ("Both", None), ("A cat", None), ("42", None), ("", None), ("\\boxed{Z}", None),
])
def test_extract_choice(text, expected):
    assert extract_choice(text) == expected


@pytest.mark.parametrize("text, ok", [
    ("<think>reasoning</think> so \\boxed{3}", True),
    ("  \n<think>reasoning</think>\\boxed{3} done.", True),        # leading whitespace, text after the box
    ("<think></think>\\boxed{3}", True),                           # an empty think block is allowed
    ("<think>a \\boxed{2}</think> then \\boxed{3}", True),         # a box inside think too, last one outside
    ("reasoning \\boxed{3}", False),                               # no think block
    ("<think>reasoning</think> the answer is 3", False),           # no box
    ("<think>a</think><think>b</think>\\boxed{3}", False),         # two think blocks
    ("<think>a<think>b</think>\\boxed{3}", False),                 # nested / unclosed
    ("<think>the answer is \\boxed{3}</think> 3", False),          # box inside think only
    ("Sure! <think>a</think>\\boxed{3}", False),                   # text before <think>
    ("<think>a</think>\\boxed{\\frac{1}{2}", False),               # unbalanced box
    ("<think>a</think>\\boxed{}", False),                          # empty box
    ("<think>a</think>\\boxed 3", False),                          # not the asked-for \boxed{...}
    ("<THINK>a</THINK>\\boxed{3}", False),                         # tags are case-sensitive
])
def test_think_format(text, ok):
    assert has_think_format(text) is ok


def test_box_inside_think_still_counts_for_accuracy():
    """Documented rule: accuracy reads the last box anywhere (as the reference code); format is lost."""
    result = score_response("<think>it is \\boxed{3}</think> three", "3", CFG)
    assert (result.accuracy, result.format, result.predicted) == (1.0, 0.0, "3")


# ---- answer equivalence -----------------------------------------------------------------------

@pytest.mark.parametrize("predicted, truth", [
    ("0.5", "\\frac{1}{2}"),
    ("\\dfrac{1}{2}", "0.5"),
    ("\\tfrac{3}{4}", "\\frac{3}{4}"),
    ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}"),
    ("2\\sqrt{2}", "\\sqrt{8}"),
    ("1,000", "1000"),
    ("1000", "1,000"),
    ("12,345.5", "12345.5"),
    ("0.50", "0.5"),
    ("50\\%", "0.5"),
    ("\\left(1, 2\\right)", "(1,2)"),
    ("[1, 2)", "[1,2)"),
    ("\\{2, 1\\}", "\\{1, 2\\}"),
    ("$\\frac{1}{2}$", "0.5"),
    ("\\text{red}", "red"),
    ("Red.", "red"),
    ("YES", "yes"),
    ("\\textbf{Left}", "left"),
    ("x = 3", "3"),
    ("(x+1)^2", "x^2+2x+1"),
    ("B", "\\boxed{B}"),        # ViRL39K stores boxed truths
    ("(B)", "B"),
    ("B. 17", "B"),
    ("\\text{(C)}", "C"),
])
def test_equivalent_answers(predicted, truth):
    ok, reason = answers_match(predicted, truth, timeout_s=5.0)
    assert ok, (predicted, truth, reason)
    assert reason in ("exact", "choice", "math_verify")


@pytest.mark.parametrize("predicted, truth", [
    ("3", "4"),
    ("0.333", "\\frac{1}{3}"),
    ("\\frac{1}{3}", "\\frac{1}{2}"),
    ("(2, 1)", "(1, 2)"),
    ("blue", "red"),
    ("der", "red"),             # math-verify alone would read both as the product E*d*r
    ("three", "3"),
    ("no", "yes"),
    ("C", "B"),
    ("Both", "B"),
    ("42", "B"),
    ("\\text{4 apples}", "5"),
    ("x", "y"),
])
def test_wrong_answers(predicted, truth):
    assert answers_match(predicted, truth, timeout_s=5.0) == (False, "wrong")


def test_normalize_answer():
    assert normalize_answer("$\\text{ Red }$.") == "red"
    assert normalize_answer("\\left( 1,\\, 2 \\right)") == "(1,2)"
    assert normalize_answer("1,234,567") == "1234567"
    assert normalize_answer("\\boxed{\\dfrac{1}{2}}") == "\\frac{1}{2}"
    assert normalize_answer("50\\%") == "50%"


def test_empty_truth_is_bad_truth_and_empty_answer_is_no_answer():
    assert answers_match("3", "", 1.0) == (False, "bad_truth")
    assert answers_match("$ $", "3", 1.0) == (False, "no_answer")


def test_model_output_is_never_run_as_python(tmp_path):
    marker = tmp_path / "pwned"
    payloads = [f"__import__('os').system('touch {marker}')",
                f"open('{marker}', 'w').write('x')",
                f"exec(\"open('{marker}','w')\")"]
    for payload in payloads:
        assert answers_match(payload, "3", 5.0) == (False, "wrong")
        assert answers_match(payload, "\\frac{1}{2}", 5.0)[0] is False
        assert score_response(respond(payload), "3", CFG).accuracy == 0.0
    assert not marker.exists()


# ---- scoring ----------------------------------------------------------------------------------

def test_reward_weighting():
    cfg = RewardConfig(accuracy_weight=0.9, format_weight=0.1)
    both = score_response(respond("3"), "3", cfg)
    assert (both.reward, both.accuracy, both.format, both.reason, both.predicted) == (1.0, 1.0, 1.0, "exact", "3")
    assert score_response("the answer is \\boxed{3}", "3", cfg).reward == pytest.approx(0.9)
    assert score_response(respond("4"), "3", cfg).reward == pytest.approx(0.1)
    none = score_response("<think>hmm</think> I do not know", "3", cfg)
    assert (none.reward, none.reason, none.predicted) == (0.0, "no_answer", None)
    odd = RewardConfig(accuracy_weight=2.0, format_weight=0.5)
    assert score_response(respond("3"), "3", odd).reward == pytest.approx(2.5)
    assert score_response(respond("4"), "3", odd).reward == pytest.approx(0.5)


def _synthetic_samples():
    samples = list(generate("train", 3 * len(TASKS), seed=0))
    samples += list(generate("test", 2 * len(TASKS), seed=1, difficulty="hard"))  # multi-digit numbers, 8 colours
    return samples


def _a_different_answer(answer: str) -> str:
    if answer.isdigit():
        return str(int(answer) + 1)
    return next(colour for colour in COLOURS if colour != answer)


def test_synthetic_answers_score_correctly():
    samples = _synthetic_samples()
    assert {s.task for s in samples} == set(TASKS)
    truths = [s.answer for s in samples]
    right = score_batch([respond(t) for t in truths], truths, CFG)
    assert all(r.accuracy == 1.0 and r.reward == pytest.approx(1.0) for r in right), right
    # The forms a model writes for these answers also count.
    variants = [respond(f"\\text{{{t.capitalize()}}}") for t in truths]
    assert all(r.accuracy == 1.0 for r in score_batch(variants, truths, CFG))
    wrong = score_batch([respond(_a_different_answer(t)) for t in truths], truths, CFG)
    assert all(r.accuracy == 0.0 and r.reason == "wrong" and r.reward == pytest.approx(0.1) for r in wrong), wrong


def test_score_batch_matches_score_response_and_keeps_order():
    texts = [respond("\\frac{1}{2}"), respond("0.3"), "no box", respond("(B)"), respond("\\sqrt{8}"), respond("red")]
    truths = ["0.5", "0.5", "1", "\\boxed{B}", "2\\sqrt{2}", "blue"]
    batch = score_batch(texts, truths, CFG)
    assert batch == [score_response(t, g, CFG) for t, g in zip(texts, truths)]
    assert [r.reason for r in batch] == ["math_verify", "wrong", "no_answer", "choice", "math_verify", "wrong"]
    assert reward_summary(batch) == {"correct": 3, "wrong": 2, "no_answer": 1, "timeout": 0, "bad_truth": 0,
                                     "error": 0, "format_ok": 5, "total": 6}
    with pytest.raises(PapoError, match="2 responses but 1"):
        score_batch(texts[:2], truths[:1], CFG)


def test_exact_matches_never_touch_the_pool(monkeypatch):
    def no_pool():
        raise AssertionError("the worker pool was used")

    monkeypatch.setattr(_pool, "get_pool", no_pool)
    texts = [respond("3"), respond("Red"), respond("(B)"), respond("1,000"), "nothing", respond("7"), respond(TOWER)]
    truths = ["3", "red", "B", "1000", "3", "8", TOWER]
    results = score_batch(texts, truths, CFG)
    assert [r.accuracy for r in results] == [1, 1, 1, 1, 0, 0, 1]


# ---- time limits and the worker pool ----------------------------------------------------------

def test_hanging_check_times_out_and_pool_stays_usable():
    pool = VerifyPool(num_workers=1)
    try:
        assert pool.check("\\frac{1}{2}", "0.5", 5.0) == (True, "math_verify")  # worker started and warm
        start = time.monotonic()
        assert pool.check("1", "1", 0.5, _sleep_s=60) == (False, "timeout")
        assert time.monotonic() - start < 1.5
        assert pool.restarts == 1
        assert pool.check("\\sqrt{8}", "2\\sqrt{2}", 10.0) == (True, "math_verify")
    finally:
        pool.close()
    with pytest.raises(RuntimeError, match="shut down"):
        pool.check("1", "1", 1.0)


def test_workers_outlive_the_thread_that_started_them():
    """A worker started from a short-lived thread (score_batch's) keeps serving afterwards."""
    pool = VerifyPool(num_workers=1)
    try:
        thread = threading.Thread(target=lambda: pool.check("1", "1.0", 10.0))
        thread.start()
        thread.join()
        (worker,) = pool._free
        assert pool.check("\\frac{1}{2}", "0.5", 5.0) == (True, "math_verify")
        assert pool._free == [worker] and worker.alive() and pool.restarts == 0
    finally:
        pool.close()
    assert not worker.alive()


def test_pathological_latex_times_out_from_a_thread():
    """A sympy hang that SIGALRM cannot interrupt, from a non-main thread, through the public API."""
    cfg = RewardConfig(verify_timeout_s=0.5)
    answers_match("1", "1.0", 5.0)  # make sure a worker is up, so start-up time is not measured
    results = []

    def run():
        start = time.monotonic()
        results.append((score_response(respond(TOWER), OTHER_TOWER, cfg), time.monotonic() - start))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=30)
    (result, elapsed), = results
    assert (result.reason, result.accuracy, result.format, result.reward) == ("timeout", 0.0, 1.0, pytest.approx(0.1))
    assert elapsed < 1.5
    # A timeout never overrides an exact match, and the pool still answers.
    assert score_response(respond(TOWER), TOWER, cfg).reason == "exact"
    assert answers_match("0.25", "\\frac{1}{4}", 10.0) == (True, "math_verify")


def test_batch_with_timeouts_runs_in_parallel():
    pairs = [(TOWER, OTHER_TOWER), ("\\frac{2}{4}", "0.5"), (OTHER_TOWER, TOWER), ("\\sqrt{4}", "2")]
    start = time.monotonic()
    results = answers_match_many(pairs, timeout_s=0.5)
    assert results == [(False, "timeout"), (True, "math_verify"), (False, "timeout"), (True, "math_verify")]
    summary = reward_summary(score_batch([respond(p) for p, _ in pairs], [t for _, t in pairs],
                                         RewardConfig(verify_timeout_s=0.5)))
    assert (summary["timeout"], summary["correct"]) == (2, 2)
    assert time.monotonic() - start < 20  # includes restarting the killed workers


def test_pool_restarts_lazily_after_shutdown():
    assert answers_match("\\frac{1}{2}", "0.5", 5.0)[0]
    first = _pool.get_pool()
    shutdown_pool()
    assert first.closed
    assert answers_match("\\frac{1}{2}", "0.5", 10.0)[0]
    assert _pool.get_pool() is not first


def test_worker_that_cannot_start_raises_a_clear_error(tmp_path, monkeypatch):
    script = tmp_path / "worker.py"
    script.write_text('print(\'{"ready": false, "error": "ModuleNotFoundError: math_verify"}\', flush=True)\n')
    monkeypatch.setattr(_pool, "WORKER_SCRIPT", str(script))
    pool = VerifyPool(num_workers=1)
    try:
        with pytest.raises(WorkerStartError, match="pip install math-verify"):
            pool.check("1", "2", 1.0)
    finally:
        pool.close()


def test_worker_crash_is_an_error_and_the_worker_is_replaced(tmp_path, monkeypatch):
    script = tmp_path / "worker.py"
    script.write_text('import sys\nprint(\'{"ready": true}\', flush=True)\nsys.stdin.readline()\nsys.exit(3)\n')
    monkeypatch.setattr(_pool, "WORKER_SCRIPT", str(script))
    pool = VerifyPool(num_workers=1)
    try:
        assert pool.check("1", "2", 5.0) == (False, "error")
        assert pool.check("1", "2", 5.0) == (False, "error")  # a fresh worker each time
        assert pool.restarts == 2
    finally:
        pool.close()
