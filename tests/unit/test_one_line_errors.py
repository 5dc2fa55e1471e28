"""Issue 16 findings 14 and 15: bad input that gave a traceback (or was silently followed) is one
line naming the problem and the fix, exit 2; the README's 72B dry run works on a fresh clone.

Each case is run as a user would: through the `papo-mega` entry point or the tool's script.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from papo_mega.cli import main
from papo_mega.data.synthetic_shards import write_synthetic_shards

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "examples" / "tiny_cpu.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def tool(name: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / name), *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=600)


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "papo_mega.cli", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=600)


def one_error_line(returncode: int, stderr: str) -> str:
    """The single 'error:' line of a refused command (exit 2, no traceback)."""
    assert returncode == 2 and "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "train"
    write_synthetic_shards(out, "train", 4, samples_per_shard=2, progress=False)
    return out


def damaged_copy(shards: Path, tmp_path: Path, manifest_text: str) -> Path:
    copy = tmp_path / "shards"
    copy.mkdir()
    for tar in shards.glob("*.tar"):
        (copy / tar.name).write_bytes(tar.read_bytes())
    (copy / "manifest.json").write_text(manifest_text)
    return copy


def sft_on(directory: Path, tmp_path: Path, capsys) -> str:
    """`papo-mega sft` on a shard directory; the one error line it must give."""
    code = main(["sft", TINY, f"data.train_shards={directory}", f"run.run_dir={tmp_path / 'run'}"])
    return one_error_line(code, capsys.readouterr().err)


def with_shard_name(shards: Path, name: str) -> str:
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["shards"][0]["name"] = name
    return json.dumps(manifest)


@pytest.mark.parametrize("text, problem", [
    ('{"shards": [', "not JSON"),
    ('{"shards": {"shard-000000.tar": 2}}', "expected an object with a 'shards' list"),
    ('{"shards": [{"name": "shard-000000.tar"}]}', "shards[0] is not"),
], ids=["invalid-json", "shards-not-a-list", "entry-without-count"])
def test_corrupt_manifest_is_one_line_naming_the_file_and_the_fix(shards, tmp_path, capsys, text, problem):
    """Finding 14: a damaged manifest.json gave a JSONDecodeError / TypeError traceback."""
    bad = damaged_copy(shards, tmp_path, text)
    line = sft_on(bad, tmp_path, capsys)
    assert f"{bad}/manifest.json is not a valid shard manifest ({problem}" in line
    assert "tools/make_shards.py or tools/make_synthetic.py" in line


@pytest.mark.parametrize("name", ["../outside.tar", "/abs/outside.tar"], ids=["dotdot", "absolute"])
def test_manifest_shard_names_outside_the_directory_are_refused(shards, tmp_path, capsys, name):
    """Finding 14: a shard named '../x.tar' was opened outside the shard folder (and trained on)."""
    bad = damaged_copy(shards, tmp_path, with_shard_name(shards, name))
    line = sft_on(bad, tmp_path, capsys)
    assert f"shard name {name!r} is not a bare file name" in line


def test_the_dry_run_checks_an_existing_shard_manifest(shards, tmp_path):
    """The dry run only looked for manifest.json; a damaged one passed it."""
    bad = damaged_copy(shards, tmp_path, with_shard_name(shards, "../outside.tar"))
    proc = cli("train", TINY, f"data.train_shards={bad}", "data.eval_shards=", f"run.run_dir={tmp_path / 'run'}",
               "--dry-run")
    assert "is not a bare file name" in one_error_line(proc.returncode, proc.stderr)


def parquet_with_a_damaged_page(path: Path) -> Path:
    """A parquet file whose footer is intact and whose second row group's first page is garbage."""
    import io

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    # Row groups larger than make_shards' read batch (256), so the first batch reads before the damage.
    table = pa.table({"question": ["q"] * 600, "answer": ["a"] * 600, "image": [png.getvalue()] * 600})
    pq.write_table(table, path, row_group_size=300)
    data = bytearray(path.read_bytes())
    start = pq.ParquetFile(path).metadata.row_group(1).column(0).data_page_offset
    data[start:start + 40] = b"\xff" * 40
    path.write_bytes(bytes(data))
    return path


def test_corrupt_parquet_for_make_shards_is_one_line(tmp_path):
    """Finding 14: a damaged parquet file gave pyarrow's traceback, at open or mid-conversion."""
    pytest.importorskip("pyarrow")
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1" + bytes(range(256)) * 4)
    proc = tool("make_shards.py", str(garbage), "--out", str(tmp_path / "a"))
    line = one_error_line(proc.returncode, proc.stderr)
    assert f"{garbage} is not a readable parquet file" in line and "re-export" in line
    assert not (tmp_path / "a").exists()
    damaged = parquet_with_a_damaged_page(tmp_path / "damaged.parquet")
    out = tmp_path / "b"
    proc = tool("make_shards.py", str(damaged), "--out", str(out), "--samples-per-shard", "100", "--no-progress")
    assert f"{damaged} is not a readable parquet file" in one_error_line(proc.returncode, proc.stderr)
    # The shards of the first row group stay, under a manifest that readers refuse as unfinished.
    assert json.loads((out / "manifest.json").read_text())["complete"] is False


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> tuple[Path, Path]:
    from tests.distributed.hf_fixtures import make_tiny_hf

    root = tmp_path_factory.mktemp("hf")
    return make_tiny_hf(root / "tied_gqa", "tied_gqa"), make_tiny_hf(root / "untied_odd", "untied_odd")


@pytest.mark.parametrize("keep", [0.5, 0.0001], ids=["half", "header-cut"])
def test_truncated_safetensors_for_conversion_names_the_file(hf_dirs, tmp_path, keep):
    """Finding 14: a truncated model.safetensors gave safetensors' SafetensorError traceback."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text((hf_dirs[0] / "config.json").read_text())
    weights = (hf_dirs[0] / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(weights[: max(1, int(len(weights) * keep))])
    proc = tool("convert_hf_to_mcore.py", "--hf", str(hf), "--out", str(tmp_path / "out"))
    line = one_error_line(proc.returncode, proc.stderr)
    assert f"{hf / 'model.safetensors'} is not a readable safetensors file" in line and "re-download" in line
    assert not (tmp_path / "out").exists()


def test_check_parity_of_different_models_says_which_shapes_differ(hf_dirs, tmp_path):
    """Finding 14: check_parity on an HF model and a checkpoint of another shape: IndexError.

    The checkpoint side needs only its papo_model.json: the shapes are compared before any weight
    is read (a real conversion of tied_gqa is what test_conversion.py checks)."""
    from papo_mega.convert.hf_config import configs_from_hf, read_hf_config

    model, vision, _ = configs_from_hf(read_hf_config(hf_dirs[0]))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "papo_model.json").write_text(json.dumps({"model": dataclasses.asdict(model),
                                                      "vision": dataclasses.asdict(vision)}))
    proc = tool("check_parity.py", "--hf", str(hf_dirs[1]), "--ckpt", str(ckpt))
    line = one_error_line(proc.returncode, proc.stderr)
    assert "are different models" in line
    assert "model.hidden_size HF 96, checkpoint 64" in line and "vision.depth HF 4, checkpoint 3" in line


def test_readme_72b_dry_run_on_a_fresh_clone_lists_every_input_to_create(tmp_path):
    """Finding 15: the README's dry run failed one missing path at a time; it now passes, listing
    all inputs still to be created with the command for each (run where none of them exist)."""
    proc = cli("train", "examples/papo_g_72b.yaml", "--dry-run", "--world-size", "32", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    todo = [line for line in proc.stdout.splitlines() if line.startswith("to create before the real run: ")]
    assert len(todo) == 2, proc.stdout
    assert "data.train_shards=data/virl39k: write shards there (python tools/make_shards.py" in todo[0]
    assert "algo.init_from=ckpt/72b: convert the HF model there (python tools/convert_hf_to_mcore.py" in todo[1]
    assert "2 input(s) to create before the real run" in proc.stdout.splitlines()[-1]
