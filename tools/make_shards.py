#!/usr/bin/env python
"""Convert a visual question-answering set (jsonl, parquet, or a directory with images) into webdataset shards.

    python tools/make_shards.py data/virl/39Krelease.parquet --out data/virl39k --samples-per-shard 1000
    python tools/make_shards.py data/myset/ --out data/myset-shards          # a directory: images + one jsonl
    python tools/make_shards.py data/myset/train.jsonl --images data/myset/images.zip --out ...

Every record needs a question, an answer and one image: a path (relative to the input directory or
to --images, a directory or a .zip), bytes (parquet), base64 (a `data:` URI, or a field named
*base64*/*b64*) or a {"bytes", "path"} struct. Other fields are kept in the sample's JSON. Records
are written in input order; bad ones are skipped and reported by reason with examples. Image paths
that lead outside the input directory (`..`, absolute paths, symlinks) are refused without being
opened. An interrupted run continues with --resume (same arguments). See docs/data.md.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import os
import posixpath
import re
import sys
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from papo_mega.convert.jobs import run_tool
from papo_mega.data.shard_writer import (
    MANIFEST,
    Sample,
    encode_png,
    read_manifest,
    update_manifest,
    write_shards,
)
from papo_mega.errors import PapoError

IMAGE_FIELDS = ("image", "images", "image_path", "image_bytes", "image_base64", "image_b64", "img")
KEY_FIELDS = ("qid", "id", "key", "uid", "sample_id")
EXAMPLES_PER_REASON = 5

BAD_RECORD = "bad record"
MISSING_FIELD = "missing field"
EMPTY_ANSWER = "empty answer"
BAD_IMAGE = "undecodable image"
IMAGE_NOT_FOUND = "image not found"
ESCAPES = "image path escapes the input directory"
MULTIPLE_IMAGES = "not exactly one image"
DUPLICATE_KEY = "duplicate key"


class Skip(Exception):
    """A record that cannot become a sample: reason (a fixed category) and detail."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


class SkipReport:
    """Skipped records counted by reason, with the first few examples of each."""

    def __init__(self) -> None:
        self.rows = 0
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, row: int, key: str, skip: Skip) -> None:
        self.counts[skip.reason] += 1
        examples = self.examples.setdefault(skip.reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(f"row {row} key {key}" + (f": {skip.detail}" if skip.detail else ""))

    def as_dict(self) -> dict:
        return {"records": self.rows, "counts": dict(self.counts), "examples": self.examples}

    def lines(self) -> list[str]:
        out = []
        for reason, count in self.counts.most_common():
            out.append(f"  {reason}: {count}")
            out.extend(f"    e.g. {example}" for example in self.examples[reason])
        return out


# -- reading the input ----------------------------------------------------------------------------


def find_input(path: Path) -> tuple[Path, str, Path]:
    """(records file, 'jsonl' | 'parquet', directory image paths are relative to)."""
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".parquet") and p.is_file())
        if len(found) != 1:
            names = ", ".join(p.name for p in found) or "none"
            raise PapoError(f"{path} must hold exactly one .jsonl or .parquet file (found {names}); "
                            f"pass the records file itself")
        return found[0], found[0].suffix[1:], path
    if not path.is_file():
        raise PapoError(f"input {path} does not exist")
    if path.suffix not in (".jsonl", ".parquet"):
        raise PapoError(f"input {path} is not a .jsonl or .parquet file or a directory")
    return path, path.suffix[1:], path.parent


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PapoError("reading parquet needs pyarrow: pip install pyarrow (or convert the set to jsonl)") from None
    return pq


def _parquet_errors() -> tuple[type[Exception], ...]:
    """What pyarrow raises for a damaged file (ArrowInvalid for a bad footer, OSError for bad thrift)."""
    import pyarrow

    return OSError, pyarrow.ArrowException


def _unreadable_parquet(path: Path, err: Exception) -> PapoError:
    cause = " ".join(str(err).split())[:200]  # pyarrow's thrift messages span lines
    return PapoError(f"{path} is not a readable parquet file ({type(err).__name__}: {cause}); "
                     f"re-download or re-export it (or convert it to jsonl), then rerun with an empty --out")


def count_records(path: Path, kind: str) -> int:
    if kind == "parquet":
        pq = _pyarrow_parquet()
        try:
            return pq.ParquetFile(path).metadata.num_rows
        except _parquet_errors() as err:  # a bad footer: nothing is written yet
            raise _unreadable_parquet(path, err) from None
    with open(path, "rb") as stream:
        return sum(1 for line in stream if line.strip())


def read_records(path: Path, kind: str) -> Iterator[dict | Skip]:
    """Records in file order; an unparseable jsonl line comes out as a Skip so rows keep their numbers."""
    if kind == "parquet":
        pq = _pyarrow_parquet()
        try:
            # A damaged row group surfaces here, mid-conversion: the shards written so far stay,
            # under a manifest marked incomplete, so readers refuse them until a rerun finishes.
            for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
                yield from batch.to_pylist()
        except _parquet_errors() as err:
            raise _unreadable_parquet(path, err) from None
        return
    with open(path, "rb") as stream:
        for line in stream:
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                yield Skip(BAD_RECORD, f"not JSON ({err})")
                continue
            yield record if isinstance(record, dict) else Skip(BAD_RECORD, "not a JSON object")


class ImageFiles:
    """Reads image files under one root (a directory or a .zip); refuses every path that leads out."""

    def __init__(self, root: Path):
        if root.is_file() and not zipfile.is_zipfile(root):
            raise PapoError(f"--images {root} is neither a directory nor a .zip archive")
        self.root = root
        self.zip = zipfile.ZipFile(root) if root.is_file() else None
        self.names = set(self.zip.namelist()) if self.zip else set()
        self.real_root = os.path.realpath(root)

    def read(self, ref: str) -> bytes:
        return self._read_zip(ref) if self.zip else self._read_dir(ref)

    def _read_dir(self, ref: str) -> bytes:
        # realpath resolves '..' and symlinks before the check, so nothing outside is ever opened.
        real = os.path.realpath(os.path.join(self.real_root, ref))
        if os.path.commonpath([real, self.real_root]) != self.real_root:
            raise Skip(ESCAPES, ref)
        if not os.path.isfile(real):
            raise Skip(IMAGE_NOT_FOUND, ref)
        with open(real, "rb") as stream:
            return stream.read()

    def _read_zip(self, ref: str) -> bytes:
        name = posixpath.normpath(ref.replace("\\", "/"))
        if name.startswith(("/", "../")) or name == ".." or re.match(r"^[A-Za-z]:", name):
            raise Skip(ESCAPES, ref)
        if name not in self.names:
            raise Skip(IMAGE_NOT_FOUND, f"{ref} (not in {self.root.name})")
        return self.zip.read(name)


# -- records to samples ---------------------------------------------------------------------------


def image_bytes(value, field: str, files: ImageFiles) -> tuple[bytes, bool]:
    """(encoded image, whether the record named a path) for an image field's value."""
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise Skip(MULTIPLE_IMAGES, f"{field} holds {len(value)} images")
        value = value[0]
    if isinstance(value, dict):
        if value.get("bytes"):
            return image_bytes(value["bytes"], "base64", files)[0], False
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), False
    if not isinstance(value, str) or not value.strip():
        raise Skip(MISSING_FIELD, f"{field} is empty")
    encoded = value.split(",", 1)[1] if value.startswith("data:") else value if _is_b64(field) else None
    if encoded is None:
        return files.read(value.strip()), True
    try:
        return base64.b64decode(encoded, validate=True), False
    except (binascii.Error, ValueError) as err:
        raise Skip(BAD_IMAGE, f"bad base64 ({err})") from None


def _is_b64(field: str) -> bool:
    return "base64" in field or "b64" in field


def check_image(data: bytes) -> tuple[bytes, str]:
    """Fully decode (catches truncation, not only bad headers); PNG/JPEG kept as they are, other
    formats re-encoded as PNG because samples hold png or jpg."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.format in ("PNG", "JPEG"):
                return data, "png" if image.format == "PNG" else "jpg"
            keep = image if image.mode in ("RGB", "RGBA", "L", "LA") else image.convert("RGB")
            return encode_png(keep), "png"
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad bytes
        # PIL names the BytesIO by address; drop it so reports are the same on every run.
        detail = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(err))
        raise Skip(BAD_IMAGE, f"{type(err).__name__}: {detail}") from None


def _jsonable(value):
    """Extra fields as JSON: bytes dropped (image columns we do not use), other odd types as str."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items() if not isinstance(v, (bytes, bytearray))}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value if not isinstance(v, (bytes, bytearray))]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def sample_key(record: dict, row: int, key_field: str | None) -> str:
    """The record's id made safe as a webdataset key (no dots or slashes), or its row number."""
    fields = [key_field] if key_field else [f for f in KEY_FIELDS if record.get(f) not in (None, "")]
    raw = record.get(fields[0]) if fields else None
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(raw)) if raw not in (None, "") else f"row{row:09d}"


def to_sample(record: dict, key: str, args: argparse.Namespace, files: ImageFiles) -> Sample:
    for field in (args.question_field, args.answer_field):
        if record.get(field) is None:
            raise Skip(MISSING_FIELD, field)
    question, answer = str(record[args.question_field]), str(record[args.answer_field])
    if not question.strip():
        raise Skip(MISSING_FIELD, f"{args.question_field} is empty")
    if not answer.strip():
        raise Skip(EMPTY_ANSWER)
    field = args.image_field or next((f for f in IMAGE_FIELDS if record.get(f) is not None), None)
    if field is None or record.get(field) is None:
        raise Skip(MISSING_FIELD, field or "image")
    data, is_path = image_bytes(record[field], field, files)
    data, ext = check_image(data)
    meta = {k: v for k, v in record.items() if k != field or is_path}
    meta.update(question=question, answer=answer)
    return Sample(key, data, ext, _jsonable(meta))


def samples(records: Iterable[dict | Skip], args: argparse.Namespace, files: ImageFiles,
            report: SkipReport) -> Iterator[Sample]:
    seen: set[str] = set()
    for row, record in enumerate(records):
        report.rows = row + 1
        key = f"row{row:09d}"
        try:
            if isinstance(record, Skip):
                raise record
            key = sample_key(record, row, args.key_field)
            if key in seen:
                raise Skip(DUPLICATE_KEY)
            seen.add(key)
            yield to_sample(record, key, args, files)
        except Skip as skip:
            report.add(row, key, skip)


# -- the tool ---------------------------------------------------------------------------------------


def check_out_dir(out: Path, source: dict, samples_per_shard: int, resume: bool) -> None:
    """A fresh run needs an empty directory; a resumed one the same input and settings."""
    if not resume and out.is_dir() and any(out.iterdir()):
        raise PapoError(f"{out} is not empty; use --resume to continue an interrupted conversion "
                        f"or choose a new --out")
    if out.exists() and not out.is_dir():
        raise PapoError(f"--out {out} is a file; choose a directory")
    if resume and (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        if manifest.get("source") != source:
            raise PapoError(f"{out} was converted from {manifest.get('source')}; resume with the same "
                            f"input and options or choose a new --out")
        if manifest.get("samples_per_shard") != samples_per_shard:
            raise PapoError(f"{out} has {manifest.get('samples_per_shard')} samples per shard; "
                            f"resume with --samples-per-shard {manifest.get('samples_per_shard')}")


def convert(args: argparse.Namespace) -> int:
    if args.samples_per_shard < 1:
        raise PapoError(f"--samples-per-shard must be positive, not {args.samples_per_shard}")
    records_path, kind, root = find_input(Path(args.input))
    root = Path(args.images) if args.images else root
    if not root.exists():
        raise PapoError(f"--images {root} does not exist")
    out = Path(args.out)
    source = {"input": str(records_path.resolve()), "images": str(root.resolve()),
              "fields": [args.question_field, args.answer_field, args.image_field, args.key_field]}
    check_out_dir(out, source, args.samples_per_shard, args.resume)
    report = SkipReport()
    records = tqdm(read_records(records_path, kind), total=count_records(records_path, kind), unit="record",
                   desc="make_shards", disable=args.no_progress)
    write_shards(samples(records, args, ImageFiles(root), report), out, args.samples_per_shard,
                 resume=args.resume, extra_manifest={"source": source, "complete": False})
    manifest = update_manifest(out, {"complete": True, "skipped": report.as_dict()})
    written = sum(s["count"] for s in manifest["shards"])
    print(f"wrote {written} samples in {len(manifest['shards'])} shards to {out} "
          f"({report.rows} records, {sum(report.counts.values())} skipped)")
    for line in report.lines():
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="a .jsonl or .parquet file, or a directory holding one plus images")
    parser.add_argument("--out", required=True, help="output directory (shards + manifest.json)")
    parser.add_argument("--images", default="", help="directory or .zip that image paths are relative to "
                        "(default: the input's directory)")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="samples in each tar shard")
    parser.add_argument("--resume", action="store_true", help="continue after the last complete shard in --out")
    parser.add_argument("--question-field", default="question")
    parser.add_argument("--answer-field", default="answer")
    parser.add_argument("--image-field", default="", help=f"default: the first of {', '.join(IMAGE_FIELDS)}")
    parser.add_argument("--key-field", default="", help=f"default: the first of {', '.join(KEY_FIELDS)}, else the row")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    return run_tool("make_shards", lambda: convert(args))


if __name__ == "__main__":
    sys.exit(main())
