"""The multi-process test harness: `papo_mega.distributed.spawn` plus tensor comparisons."""

from papo_mega.distributed.spawn import DistributedTestFailure, run_distributed

__all__ = ["DistributedTestFailure", "assert_tensors_close", "max_abs_diff_report", "run_distributed"]


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
