"""tools/make_shards.py: jsonl / directory / parquet input, the skip report, path confinement,
byte-identical resume after an interrupted run, one-line errors."""

import base64
import importlib.util
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from papo_mega.data.shard_writer import read_manifest
from papo_mega.data.shards import ShardStream
from papo_mega.errors import PapoError

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("make_shards_tool", REPO / "tools" / "make_shards.py")
make_shards = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_shards)


def encoded(colour: int, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 8), (colour, 255 - colour, 7)).save(buffer, format=fmt)
    return buffer.getvalue()


def write_jsonl(path: Path, records: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def run(*args) -> int:
    return make_shards.main([*map(str, args), "--no-progress"])


def read_back(directory: Path) -> list[dict]:
    """Samples in file order (shuffle_buffer 0: no shuffling)."""
    return list(ShardStream(directory, shuffle_buffer=0, epochs=1))


@pytest.fixture
def image_dir(tmp_path) -> Path:
    """input/: images/0..6.png, a broken one, data.jsonl with 7 good records and one of each bad kind;
    secret.png lies outside input/ and is linked from inside it."""
    root = tmp_path / "input"
    (root / "images").mkdir(parents=True)
    for i in range(7):
        (root / "images" / f"{i}.png").write_bytes(encoded(i * 30))
    (root / "images" / "broken.png").write_bytes(encoded(1)[:50])  # header fine, pixel data cut
    (tmp_path / "secret.png").write_bytes(encoded(99))
    os.symlink(tmp_path / "secret.png", root / "images" / "link.png")
    good = [{"qid": f"q{i}", "question": f"What is {i}?", "answer": str(i), "image": f"images/{i}.png",
             "source": "unit"} for i in range(7)]
    bad = [
        {"qid": "broken", "question": "q", "answer": "a", "image": "images/broken.png"},
        {"qid": "dotdot", "question": "q", "answer": "a", "image": "../secret.png"},
        {"qid": "absolute", "question": "q", "answer": "a", "image": str(tmp_path / "secret.png")},
        {"qid": "symlink", "question": "q", "answer": "a", "image": "images/link.png"},
        {"qid": "noanswer", "question": "q", "image": "images/0.png"},
        {"qid": "blank", "question": "q", "answer": "  ", "image": "images/0.png"},
        {"qid": "noimage", "question": "q", "answer": "a"},
        "{not json",
    ]
    # Bad records sit between good ones: rows keep their numbers, good ones keep their order.
    write_jsonl(root / "data.jsonl", good[:3] + bad + good[3:])
    return root


def test_directory_with_jsonl_and_images(image_dir, tmp_path, capsys):
    out = tmp_path / "shards"
    assert run(image_dir, "--out", out, "--samples-per-shard", 3) == 0
    manifest = read_manifest(out)
    assert [s["count"] for s in manifest["shards"]] == [3, 3, 1]
    assert manifest["complete"] is True
    samples = read_back(out)
    assert [s["key"] for s in samples] == [f"q{i}" for i in range(7)]
    assert samples[4]["image_bytes"] == (image_dir / "images" / "4.png").read_bytes()  # stored as given
    assert samples[4]["meta"] == {"qid": "q4", "question": "What is 4?", "answer": "4", "image": "images/4.png",
                                  "source": "unit"}
    printed = capsys.readouterr().out
    assert "wrote 7 samples in 3 shards" in printed and "15 records, 8 skipped" in printed


def test_skip_report_and_confinement(image_dir, tmp_path, capsys):
    out = tmp_path / "shards"
    assert run(image_dir / "data.jsonl", "--out", out, "--samples-per-shard", 4) == 0
    report = read_manifest(out)["skipped"]
    assert report["records"] == 15
    assert report["counts"] == {
        "undecodable image": 1, "image path escapes the input directory": 3, "missing field": 2,
        "empty answer": 1, "bad record": 1,
    }
    escapes = report["examples"]["image path escapes the input directory"]
    assert [e.split(":")[0] for e in escapes] == ["row 4 key dotdot", "row 5 key absolute", "row 6 key symlink"]
    assert report["examples"]["undecodable image"] == ["row 3 key broken: OSError: image file is truncated"]
    assert report["examples"]["missing field"] == ["row 7 key noanswer: answer", "row 9 key noimage: image"]
    assert all(s["image_bytes"] != (tmp_path / "secret.png").read_bytes() for s in read_back(out))
    printed = capsys.readouterr().out
    assert "image path escapes the input directory: 3" in printed and "e.g. row 4 key dotdot" in printed


def test_zip_images_refuse_traversal(tmp_path):
    root = tmp_path / "set"
    root.mkdir()
    with zipfile.ZipFile(root / "images.zip", "w") as archive:
        archive.writestr("images/a.png", encoded(10))
        archive.writestr("../evil.png", encoded(20))
    write_jsonl(root / "train.jsonl", [
        {"id": "a", "question": "q", "answer": "x", "image": "images/a.png"},
        {"id": "evil", "question": "q", "answer": "x", "image": "../evil.png"},
        {"id": "deep", "question": "q", "answer": "x", "image": "images/../../evil.png"},
    ])
    out = tmp_path / "shards"
    assert run(root / "train.jsonl", "--images", root / "images.zip", "--out", out) == 0
    assert [s["key"] for s in read_back(out)] == ["a"]
    assert read_manifest(out)["skipped"]["counts"] == {"image path escapes the input directory": 2}


def test_embedded_images_in_jsonl(tmp_path):
    root = tmp_path / "set"
    root.mkdir()
    jpeg, gif = encoded(5, "JPEG"), encoded(6, "GIF")
    write_jsonl(root / "d.jsonl", [
        {"question": "q", "answer": "1", "image_base64": base64.b64encode(jpeg).decode()},
        {"question": "q", "answer": "2", "image": "data:image/gif;base64," + base64.b64encode(gif).decode()},
        {"question": "q", "answer": "3", "image": {"bytes": base64.b64encode(jpeg).decode(), "path": None}},
    ])
    out = tmp_path / "shards"
    assert run(root, "--out", out) == 0
    samples = read_back(out)
    assert [(s["key"], s["image_ext"]) for s in samples] == [("row000000000", "jpg"), ("row000000001", "png"),
                                                              ("row000000002", "jpg")]
    assert samples[0]["image_bytes"] == jpeg  # JPEG kept byte for byte; GIF re-encoded as PNG
    assert "image_base64" not in samples[0]["meta"]


def test_parquet_bytes_and_virl_style_paths(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    root = tmp_path / "virl"
    (root / "images").mkdir(parents=True)
    (root / "images" / "p0.png").write_bytes(encoded(40))
    # ViRL39K layout: `image` is a list holding one path, answers are \boxed{...}, extra columns kept.
    pq.write_table(pa.table({
        "qid": ["p0", "p1"], "question": ["<image>Which?", "How many?"], "answer": ["\\boxed{A}", ""],
        "image": [["images/p0.png"], ["images/p0.png"]], "category": ["math", "math"]}), root / "39K.parquet")
    out = tmp_path / "virl_shards"
    assert run(root / "39K.parquet", "--out", out) == 0
    [sample] = read_back(out)
    assert sample["meta"] == {"qid": "p0", "question": "<image>Which?", "answer": "\\boxed{A}",
                              "image": ["images/p0.png"], "category": "math"}
    assert read_manifest(out)["skipped"]["counts"] == {"empty answer": 1}
    # Hugging Face `Image` feature: a struct of bytes and path.
    pq.write_table(pa.table({"question": ["q"], "answer": ["b"],
                             "image": [{"bytes": encoded(50), "path": "x.png"}]}), tmp_path / "hf.parquet")
    assert run(tmp_path / "hf.parquet", "--out", tmp_path / "hf_shards") == 0
    assert read_back(tmp_path / "hf_shards")[0]["image_bytes"] == encoded(50)


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(PapoError, match="reading parquet needs pyarrow: pip install pyarrow"):
        make_shards.count_records(tmp_path / "x.parquet", "parquet")


def test_resume_after_interruption_is_byte_identical(image_dir, tmp_path, monkeypatch, capsys):
    reference = tmp_path / "reference"
    assert run(image_dir, "--out", reference, "--samples-per-shard", 2) == 0

    real_read = make_shards.read_records

    def dies_after_12(path, kind):
        for row, record in enumerate(real_read(path, kind)):
            if row == 12:
                raise RuntimeError("killed")
            yield record

    out = tmp_path / "shards"
    monkeypatch.setattr(make_shards, "read_records", dies_after_12)
    with pytest.raises(RuntimeError, match="killed"):
        run(image_dir, "--out", out, "--samples-per-shard", 2)
    monkeypatch.setattr(make_shards, "read_records", real_read)
    partial = read_manifest(out)
    assert partial["complete"] is False and [s["count"] for s in partial["shards"]] == [2, 2]
    with pytest.raises(PapoError, match="unfinished conversion; rerun make_shards with --resume"):
        ShardStream(out)

    capsys.readouterr()
    assert run(image_dir, "--out", out, "--samples-per-shard", 2) == 2
    assert "not empty; use --resume" in capsys.readouterr().err
    assert run(image_dir, "--out", out, "--samples-per-shard", 3, "--resume") == 2
    assert "resume with --samples-per-shard 2" in capsys.readouterr().err

    assert run(image_dir, "--out", out, "--samples-per-shard", 2, "--resume") == 0
    files = sorted(p.name for p in reference.iterdir())
    assert files == sorted(p.name for p in out.iterdir())
    assert files == ["manifest.json"] + [f"shard-{i:06d}.tar" for i in range(4)]
    for name in files:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def test_input_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text("")
    (tmp_path / "b.jsonl").write_text("")
    assert run(tmp_path, "--out", tmp_path / "o") == 2
    assert capsys.readouterr().err == (f"make_shards: error: {tmp_path} must hold exactly one .jsonl or .parquet "
                                       f"file (found a.jsonl, b.jsonl); pass the records file itself\n")
    # The real command line: exit 2, one line, no traceback.
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "make_shards.py"), str(tmp_path / "missing.jsonl"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == f"make_shards: error: input {tmp_path / 'missing.jsonl'} does not exist\n"
