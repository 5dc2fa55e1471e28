"""A math-verify worker process: one JSON request per stdin line, one JSON reply per stdout line.

Started by `papo_mega.reward._pool` as `python <this file>` (a plain script: it imports only the
standard library and math-verify, never papo_mega, torch or the trainer's main module, so it
starts in about a second). It never evaluates its input as Python: answers go through
math-verify's LaTeX parser only (latex2sympy2's grammar), not its plain-expression extractor,
which hands text to sympy's `parse_expr` (an `eval`).

Protocol (UTF-8, one object per line):
    -> {"ready": true} | {"ready": false, "error": "..."}           once, after start-up
    <- {"gold": "<truth>", "pred": "<answer>", "cpu_budget": s[, "sleep": s]}
    -> {"ok": bool, "reason": "math_verify" | "wrong" | "unparsable_truth" | "error", "detail": "..."}
`sleep` (seconds, before verifying) is a test hook that makes a call hang on purpose.
The parent enforces time limits by killing this process; math-verify's own SIGALRM timeouts are
off. The worker dies with its parent: PR_SET_PDEATHSIG (the pool starts workers from one
long-lived thread, so "the thread that started us" lives as long as the parent); without it (not
Linux) an idle worker exits when stdin closes and a busy one by the CPU-time limit `cpu_budget`
(seconds) set before each check.
"""

import json
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
# Run as a script, this file's directory is sys.path[0]; drop it so that our module names
# (verify.py, score.py, ...) can never shadow a library's imports.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]


def _limit_cpu(budget_s: float) -> None:
    """Let this process use at most budget_s more CPU seconds (then the kernel ends it with SIGXCPU).

    The parent kills a worker at the time limit; this is the backstop for a worker whose parent
    died while it was stuck in C code (sympy's big-integer arithmetic ignores signals and threads).
    Only the soft limit moves: an unprivileged process cannot raise a hard limit it lowered.
    (Where PR_SET_PDEATHSIG is available, `_die_with_parent` makes this moot.)"""
    try:
        import resource

        usage = resource.getrusage(resource.RUSAGE_SELF)
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        soft = int(usage.ru_utime + usage.ru_stime + budget_s) + 1
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
    except Exception:
        pass


def _die_with_parent() -> None:
    """SIGKILL from the kernel when the parent's starting thread exits; exit if the parent is gone.

    The same as papo_mega.distributed.lifetime.die_with_parent, repeated because this script must
    not import papo_mega (papo_mega.distributed's __init__ imports torch)."""
    parent = int(os.environ.get("PAPO_REWARD_PARENT_PID", "0") or 0)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


def _limit_memory() -> None:
    """Cap the address space (PAPO_REWARD_WORKER_MEMORY_MB) so pathological input fails with
    MemoryError in here instead of eating the node's memory."""
    megabytes = int(os.environ.get("PAPO_REWARD_WORKER_MEMORY_MB", "0") or 0)
    if megabytes <= 0:
        return
    try:
        import resource

        limit = megabytes * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except Exception:
        pass


def _send(obj: dict, out) -> None:
    out.write((json.dumps(obj) + "\n").encode("utf-8"))
    out.flush()


def main() -> int:
    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # anything a library prints must not corrupt the protocol
    _die_with_parent()
    _limit_memory()
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # SIGXCPU (see _limit_cpu) must not dump core
    except Exception:
        pass
    try:
        import logging

        # "Timeout is disabled ..." and per-call timeout warnings: the parent does the timing.
        logging.getLogger("math_verify").setLevel(logging.CRITICAL)
        from math_verify import LatexExtractionConfig, parse, verify

        config = [LatexExtractionConfig(boxed_match_priority=0)]

        def check(gold: str, pred: str) -> tuple[bool, str]:
            gold_parsed = parse("\\boxed{" + gold + "}", extraction_config=config, parsing_timeout=None)
            if not gold_parsed:
                return False, "unparsable_truth"
            pred_parsed = parse("\\boxed{" + pred + "}", extraction_config=config, parsing_timeout=None)
            if not pred_parsed:
                return False, "wrong"
            ok = verify(gold_parsed, pred_parsed, timeout_seconds=None)
            return bool(ok), "math_verify" if ok else "wrong"

        check("\\frac{1}{2}", "0.5")  # warm the parser up before reporting ready
    except BaseException as exc:  # reported to the parent, which raises a clear error
        _send({"ready": False, "error": f"{type(exc).__name__}: {exc}"}, out)
        return 1
    _send({"ready": True}, out)

    import time

    for line in sys.stdin.buffer:
        try:
            request = json.loads(line)
            _limit_cpu(float(request.get("cpu_budget", 60.0)))
            if request.get("sleep"):
                time.sleep(float(request["sleep"]))
            ok, reason = check(str(request["gold"]), str(request["pred"]))
            reply = {"ok": ok, "reason": reason}
        except Exception as exc:  # MemoryError, RecursionError, sympy bugs: a failed check, not a crash
            # Only the type: str() of a sympy object inside an exception can itself hang.
            reply = {"ok": False, "reason": "error", "detail": type(exc).__name__}
        _send(reply, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
