"""The multi-process test harness: `papo_mega.distributed.spawn` plus tensor comparisons."""

from papo_mega.distributed.spawn import DistributedTestFailure, run_distributed

__all__ = ["DistributedTestFailure", "assert_tensors_close", "make_synthetic", "max_abs_diff_report", "run_distributed"]


def max_abs_diff_report(actual: dict, expected: dict) -> tuple[float, str]:
    """Largest elementwise difference over matching named tensors, and the name where it occurs."""
    if set(actual) != set(expected):
        missing, extra = sorted(set(expected) - set(actual)), sorted(set(actual) - set(expected))
        raise AssertionError(f"tensor names differ: missing {missing[:5]}, unexpected {extra[:5]}")
    worst, where = 0.0, ""
    for name, ref in expected.items():
        got = actual[name]
        if got.shape != ref.shape:
            raise AssertionError(f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
        diff = (got.double() - ref.double()).abs().max().item()
        if diff > worst:
            worst, where = diff, name
    return worst, where


def assert_tensors_close(actual: dict, expected: dict, atol: float, what: str) -> None:
    worst, where = max_abs_diff_report(actual, expected)
    assert worst <= atol, f"{what}: max |diff| {worst:.3g} at {where} exceeds {atol:.1g}"


def make_synthetic(out, split: str, num: int, samples_per_shard: int = 1000, timeout_s: float = 300.0):
    """Synthetic shards written by tools/make_synthetic.py as a user would run it (a subprocess);
    returns `out` as a Path. A failed run fails the test with the tool's stderr."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(repo / "tools" / "make_synthetic.py"), "--split", split, "--num",
                           str(num), "--out", str(out), "--samples-per-shard", str(samples_per_shard)],
                          capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, f"make_synthetic.py failed: {proc.stderr[-2000:]}"
    return Path(out)
