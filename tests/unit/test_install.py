"""Issue 16.7: the shipped recipes and defaults work from a wheel install, outside the checkout.

`papo-mega plan` and the demo's default recipe used to read examples/ relative to the package
directory, which a (non-editable) wheel does not contain. This builds the project's wheel, unpacks
it into an empty directory and runs the commands from another empty directory, with nothing of the
checkout on the import path.
"""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    wheels = tmp_path_factory.mktemp("wheels")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(ROOT)], check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("papo_mega-*.whl")
    site = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


def _run(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    code = ("import sys, papo_mega, papo_mega.cli as c; assert papo_mega.__file__.startswith(sys.argv[1]), "
            "papo_mega.__file__; sys.exit(c.main(sys.argv[2:]))")
    return subprocess.run([sys.executable, "-c", code, str(site), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})


def test_the_wheel_ships_every_recipe(installed):
    shipped = sorted(p.name for p in (installed / "papo_mega" / "recipes").glob("*.yaml"))
    assert shipped == sorted(p.name for p in (ROOT / "examples").glob("*.yaml")) and "tiny_cpu.yaml" in shipped


def test_plan_and_dry_run_work_from_a_wheel_in_an_empty_directory(installed, tmp_path):
    plan = _run(installed, tmp_path, "plan", "--model", "qwen2.5-vl-7b", "--gpus", "8")
    assert plan.returncode == 0, plan.stderr
    assert "workload from papo_g_7b.yaml" in plan.stdout and "fits: best layouts" in plan.stdout
    # The README's spelling (examples/...) names the shipped recipe from anywhere.
    dry = _run(installed, tmp_path, "train", "examples/tiny_cpu.yaml", "--dry-run")
    assert "config file" not in dry.stderr, dry.stderr
