"""A math-verify worker process: one JSON request per stdin line, one JSON reply per stdout line.

Started by `papo_mega.reward._pool` as `python <this file>` (a plain script: it imports only the
standard library and math-verify, never papo_mega, torch or the trainer's main module, so it
starts in about a second). It never evaluates its input as Python: answers go through
math-verify's LaTeX parser only (latex2sympy2's grammar), not its plain-expression extractor,
which hands text to sympy's `parse_expr` (an `eval`).

Protocol (UTF-8, one object per line):
    -> {"ready": true} | {"ready": false, "error": "..."}           once, after start-up
    <- {"gold": "<truth>", "pred": "<answer>"[, "sleep": s]}
    -> {"ok": bool, "reason": "math_verify" | "wrong" | "unparsable_truth" | "error", "detail": "..."}
`sleep` (seconds, before verifying) is a test hook that makes a call hang on purpose.
The parent enforces time limits by killing this process; math-verify's own SIGALRM timeouts are
off. The process dies with its parent (Linux PR_SET_PDEATHSIG) and when stdin closes.
"""

import json
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
# Run as a script, this file's directory is sys.path[0]; drop it so that our module names
# (verify.py, score.py, ...) can never shadow a library's imports.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL us when the parent dies, even while we are stuck in C code."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except Exception:  # best effort: stdin EOF still ends an idle worker
        pass
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(0)


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
