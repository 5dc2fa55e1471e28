"""papo_mega.gpu_env: one-line verdicts on a CUDA machine's Transformer Engine / megatron-core, and the
`gpu` extra's pin against megatron-core's own requirement.

CUDA is emulated by monkeypatching torch.cuda.is_available and the versions by a lookup table (the
check reads only importlib.metadata). The range emulated is megatron-core 0.16.1's METADATA
(`Requires-Dist: transformer-engine[core_cu13,pytorch]<2.12.0,>=2.9.0a0; extra == "dev"`).
"""

import importlib.metadata
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from papo_mega import gpu_env
from papo_mega.errors import PapoError
from papo_mega.gpu_env import GpuEnvError, GpuEnvWarning, check_gpu_environment

REPO = Path(__file__).resolve().parents[2]
GOOD = {"megatron-core": "0.16.1", "transformer-engine": "2.9.0+a1b2c3"}  # an NGC-style local version


def lookup(versions: dict):
    return lambda name: versions.get(name)


@pytest.fixture
def cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_env, "_warned", False)


def test_supported_environment_passes(cuda):
    assert check_gpu_environment("fp8", "tensorwise", lookup=lookup(GOOD)) is None
    assert check_gpu_environment("bf16", lookup=lookup({**GOOD, "transformer-engine": "2.11.0"})) is None


@pytest.mark.parametrize("versions, precision, recipe, match", [
    ({"megatron-core": "0.16.1"}, "fp8", "delayed", r"model.precision=fp8 needs Transformer Engine.*model.precision=bf16"),
    ({**GOOD, "transformer-engine": "2.20.0"}, "bf16", "delayed", r"Transformer Engine 2.20.0 is outside .*>=2.9.0a0,<2.12.0"),
    ({**GOOD, "transformer-engine": "2.8.0"}, "fp8", "delayed", r"Transformer Engine 2.8.0 is outside"),
    ({**GOOD, "transformer-engine": "1.14.0"}, "fp8", "tensorwise", r"tensorwise needs Transformer Engine >= 2.2, found 1.14"),
    ({"transformer-engine": "2.9.0"}, "bf16", "delayed", r"megatron-core has no installed distribution.*0.16.1"),
    ({**GOOD, "megatron-core": "0.15.0"}, "bf16", "delayed", r"megatron-core 0.15.0 is installed .*0.16.x"),
])
def test_bad_environment_is_one_line_naming_the_fix(cuda, versions, precision, recipe, match):
    with pytest.raises(GpuEnvError, match=match) as err:
        check_gpu_environment(precision, recipe, lookup=lookup(versions))
    assert isinstance(err.value, PapoError) and "\n" not in str(err.value)
    assert "docker/Dockerfile" in str(err.value) or "pip install" in str(err.value)


def test_bf16_without_te_warns_once_and_runs(cuda):
    """bf16 without TE: megatron's local spec trains correctly (models/gpt.py select_layer_spec), so a
    warning, once per process, not an error."""
    versions = lookup({"megatron-core": "0.16.1"})
    with pytest.warns(GpuEnvWarning, match="no Transformer Engine on this CUDA machine"):
        note = check_gpu_environment("bf16", lookup=versions)
    assert note and "\n" not in note
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_gpu_environment("bf16", lookup=versions) == note  # returned again, not warned again


def test_warning_is_not_silenced_by_the_runtimes_optional_package_filter(cuda):
    """runtime.quiet_known_warnings drops "...Transformer Engine ... not installed..." (megatron's import
    warning); this one must still show."""
    import re

    note = check_gpu_environment("bf16", warn=False, lookup=lookup({"megatron-core": "0.16.1"}))
    assert not re.match(r".*(Apex|apex|Transformer Engine).*not installed.*", note)


def test_nothing_is_checked_without_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check_gpu_environment("fp8", lookup=lookup({})) is None


def test_first_te_distribution_found_gives_the_version():
    assert gpu_env.te_version(lookup({"transformer-engine-torch": "2.10.0"})) == "2.10.0"
    assert gpu_env.te_version(lookup({})) is None


def test_version_only_cli_exits_2_with_one_line(capsys):
    """`python -m papo_mega.gpu_env` (docker/Dockerfile's last build step) needs no GPU."""
    assert gpu_env.main(["--precision", "fp8"], lookup({"megatron-core": "0.16.1"})) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("papo-mega: error: model.precision=fp8 needs Transformer Engine") and "\n" not in err
    assert gpu_env.main([], lookup(GOOD)) == 0
    assert capsys.readouterr().out.strip() == "megatron-core 0.16.1, transformer-engine 2.9.0+a1b2c3: ok"


def _te_requirement(requirements: list[str]) -> SpecifierSet:
    found = [Requirement(r) for r in requirements if Requirement(r).name == "transformer-engine"]
    assert len(found) == 1, requirements
    return found[0].specifier


def test_gpu_extra_pins_transformer_engine_to_megatron_cores_range():
    """pyproject's `gpu` extra, megatron-core's installed METADATA and gpu_env's constants name one range:
    an unpinned extra would let pip take TE 2.20, whose API megatron-core 0.16.1 does not call correctly."""
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    ours = _te_requirement(extra)
    mcore = _te_requirement(importlib.metadata.requires("megatron-core") or [])
    assert ours == mcore, f"pyproject gpu extra {ours} != megatron-core's {mcore}"
    assert ours == SpecifierSet(f">={gpu_env.TE_MIN},<{gpu_env.TE_BELOW}")
    assert gpu_env.MCORE_SERIES == ".".join(importlib.metadata.version("megatron-core").split(".")[:2])


def test_a_cuda_model_build_checks_the_environment_before_building(cuda, monkeypatch):
    """build_model_chunks (train, sft, eval, conversion all build through it) stops with the one line
    on a CUDA device before megatron sees the config: fp8 asked for, no TE installed."""
    from types import SimpleNamespace

    import torch

    from papo_mega.config import ModelConfig
    from papo_mega.models import qwen_vl

    def version(name):
        if name == "megatron-core":
            return "0.16.1"
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", version)

    class Untouched:
        def __getattr__(self, name):
            raise AssertionError(f"the model build started (layout.{name}) before the environment check")

    groups = SimpleNamespace(device=torch.device("cuda", 0), rank=0, layout=Untouched())
    with pytest.raises(GpuEnvError, match="model.precision=fp8 needs Transformer Engine"):
        qwen_vl.build_model_chunks(ModelConfig(precision="fp8"), None, groups)
