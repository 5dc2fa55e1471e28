"""GPU environment checks: the library versions a CUDA job needs, as one line naming the fix.

    check_gpu_environment(cfg.model.precision, cfg.model.fp8_recipe)   # before any model is built
    python -m papo_mega.gpu_env [--precision fp8] [--fp8-recipe tensorwise]   # e.g. in a container build

Versions are read from the installed distributions' metadata (importlib.metadata): nothing heavy is
imported, so the check costs milliseconds and runs before megatron or Transformer Engine would fail
deep inside a model build with an AttributeError. The supported ranges are the ones megatron-core
0.16.1 itself declares (its METADATA: `transformer-engine[...]<2.12.0,>=2.9.0a0`), which is also the
pin of pyproject.toml's `gpu` extra (tests/unit/test_gpu_env.py checks the three agree).

Transformer Engine absent on a CUDA machine:
* precision fp8 -> an error: fp8 GEMMs exist only in TE, there is nothing to fall back to;
* bf16 / fp32 -> one warning, and the job runs megatron's local spec (models/gpt.py): correct, but
  without TE's fused kernels - a user on a GPU node without TE most likely has a broken install
  (the TE build failed or ran in another environment) and wants to hear it, not to be stopped when
  the model itself would train fine.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import warnings
from collections.abc import Callable

from packaging.version import Version

from papo_mega.errors import PapoError

TE_MIN, TE_BELOW = "2.9.0a0", "2.12.0"
"""megatron-core 0.16.1's Transformer Engine range (its `dev` extra, METADATA Requires-Dist)."""
MCORE_SERIES = "0.16"
TENSORWISE_TE_MIN = "2.2"
"""Per-tensor current scaling (TE's Float8CurrentScaling, model.fp8_recipe=tensorwise) arrived in TE 2.2."""
TE_DISTRIBUTIONS = ("transformer-engine", "transformer-engine-torch", "transformer-engine-cu12",
                    "transformer-engine-cu13")
"""pip installs a `transformer-engine` meta package beside the torch and core wheels; a source build (the
NGC images) installs one `transformer_engine` distribution. The first one found gives the version."""
INSTALL_HINT = ("run in the container of docker/Dockerfile (NGC PyTorch 25.11, TE 2.9) or pip install "
                "--no-build-isolation 'papo_mega[gpu]' on a GPU node (docs/scaling.md, 'GPU dependencies')")

VersionLookup = Callable[[str], "str | None"]


class GpuEnvError(PapoError):
    """A CUDA machine whose Transformer Engine / megatron-core cannot run the configured model."""


class GpuEnvWarning(UserWarning):
    """The job runs, but slower than it should (no Transformer Engine on a GPU node)."""


def installed_version(name: str) -> str | None:
    """The installed version of distribution `name`, or None (metadata only: nothing is imported)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def te_version(lookup: VersionLookup = installed_version) -> str | None:
    return next((v for v in map(lookup, TE_DISTRIBUTIONS) if v is not None), None)


def check_versions(precision: str, fp8_recipe: str = "delayed",
                   lookup: VersionLookup = installed_version) -> str | None:
    """Raise GpuEnvError for a combination that cannot run; return a warning line (or None) otherwise."""
    mcore = lookup("megatron-core")
    if mcore is None:
        raise GpuEnvError(f"megatron-core has no installed distribution here; pip install 'megatron-core=={MCORE_SERIES}.1' "
                          f"(papo_mega's dependency) into this environment, or {INSTALL_HINT}")
    if Version(mcore).release[:2] != Version(MCORE_SERIES).release:
        raise GpuEnvError(f"megatron-core {mcore} is installed but papo_mega is written against {MCORE_SERIES}.x; "
                          f"pip install 'megatron-core=={MCORE_SERIES}.1' (with --no-deps inside an NGC container)")
    te = te_version(lookup)
    if te is None:
        if precision == "fp8":
            raise GpuEnvError(f"model.precision=fp8 needs Transformer Engine and none is installed here; {INSTALL_HINT}, "
                              f"or set model.precision=bf16")
        return (f"no Transformer Engine on this CUDA machine: training runs megatron's local layers (correct, "
                f"without TE's fused kernels, slower); {INSTALL_HINT}")
    if precision == "fp8" and fp8_recipe == "tensorwise" and Version(te) < Version(TENSORWISE_TE_MIN):
        raise GpuEnvError(f"model.fp8_recipe=tensorwise needs Transformer Engine >= {TENSORWISE_TE_MIN}, found {te}; "
                          f"{INSTALL_HINT}, or set model.fp8_recipe=delayed")
    if not Version(TE_MIN) <= Version(te) < Version(TE_BELOW):
        raise GpuEnvError(f"Transformer Engine {te} is outside megatron-core {mcore}'s supported range "
                          f">={TE_MIN},<{TE_BELOW}; {INSTALL_HINT}")
    return None


_warned = False


def check_gpu_environment(precision: str = "bf16", fp8_recipe: str = "delayed", *, warn: bool = True,
                          lookup: VersionLookup = installed_version) -> str | None:
    """On a CUDA machine: raise GpuEnvError naming the fix, or warn once per process (when `warn`, e.g.
    on rank 0 only) and return the warning line. Without CUDA nothing is checked (CPU runs use the
    local spec by design) and None is returned."""
    global _warned
    import torch

    if not torch.cuda.is_available():
        return None
    note = check_versions(precision, fp8_recipe, lookup)
    if note and warn and not _warned:
        _warned = True
        warnings.warn(note, GpuEnvWarning, stacklevel=2)
    return note


def main(argv: list[str] | None = None, lookup: VersionLookup = installed_version) -> int:
    """Check the versions only (no GPU needed): exit 0 with the versions, or 2 with the one-line fix."""
    parser = argparse.ArgumentParser(prog="python -m papo_mega.gpu_env", description=main.__doc__)
    parser.add_argument("--precision", default="fp8", help="model.precision to check for (default fp8)")
    parser.add_argument("--fp8-recipe", default="tensorwise", help="model.fp8_recipe (default tensorwise)")
    args = parser.parse_args(argv)
    try:
        note = check_versions(args.precision, args.fp8_recipe, lookup)
    except GpuEnvError as err:
        print(f"papo-mega: error: {err}", file=sys.stderr)
        return 2
    print(f"megatron-core {lookup('megatron-core')}, transformer-engine {te_version(lookup)}"
          f"{': ' + note if note else ': ok'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
