"""Write samples as webdataset tar shards with a manifest (what make_shards and make_synthetic emit).

Sample format: one tar member per field under a shared key - the image bytes as `<key>.png` or
`<key>.jpg`, and `<key>.json` holding at least `question` and `answer` (plus `task` and any extra
fields). Shards are `shard-000000.tar`, ... with a fixed number of samples each (the last may be
short). `manifest.json` lists every shard with its sample count - readers use it for exact resume
and epoch accounting.

Each shard is written under a temporary name and renamed when closed, and the manifest is
rewritten after every shard, so an interrupted run never leaves a shard that looks complete but
is not, and a rerun with `resume=True` continues after the last complete shard. Tar headers carry
a fixed mtime, so the same samples always give byte-identical shards (a resumed conversion equals
an uninterrupted one).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from papo_mega.errors import PapoError

MANIFEST = "manifest.json"


@dataclass
class Sample:
    """One example: a stable key, the encoded image, and the JSON metadata."""

    key: str
    image_bytes: bytes
    image_ext: str
    """'png' or 'jpg'."""
    meta: dict
    """At least 'question' and 'answer'."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a shard directory (an empty one if there is none); a damaged one is a PapoError."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return {"shards": [], "samples_per_shard": None}
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _damaged(path, f"not JSON: {err}") from None
    problem = manifest_problem(manifest)
    if problem:
        raise _damaged(path, problem)
    return manifest


def manifest_problem(manifest) -> str | None:
    """What is wrong with a parsed manifest's structure, or None. Shard names must be bare file
    names: a reader opens directory / name, so '../x.tar' or '/abs.tar' would read outside it."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards", []), list):
        return "expected an object with a 'shards' list"
    for i, entry in enumerate(manifest.get("shards", [])):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) \
                or type(entry.get("count")) is not int or entry["count"] < 0:
            return f"shards[{i}] is not {{\"name\": str, \"count\": int >= 0}}"
        name = entry["name"]
        if name in ("", ".", "..") or "/" in name or "\\" in name:
            return f"shard name {name!r} is not a bare file name, so it would be read from outside the directory"
    return None


def _damaged(path: Path, problem: str) -> PapoError:
    return PapoError(f"{path} is not a valid shard manifest ({problem}); re-write the shards into a new directory with "
                     f"tools/make_shards.py or tools/make_synthetic.py")


def _write_manifest(directory: Path, manifest: dict) -> None:
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, directory / MANIFEST)


def update_manifest(directory: str | Path, fields: dict) -> dict:
    """Set top-level manifest fields (e.g. `complete`, a skip report) atomically; returns the manifest."""
    manifest = read_manifest(directory)
    manifest.update(fields)
    _write_manifest(Path(directory), manifest)
    return manifest


def _write_shard(path: Path, samples: list[Sample]) -> None:
    tmp = path.with_suffix(".tar.tmp")
    # mtime=0: headers must not depend on the wall clock, or reruns would not be byte-identical.
    with open(tmp, "wb") as stream, wds.TarWriter(stream, mtime=0) as writer:
        for s in samples:
            writer.write({"__key__": s.key, s.image_ext: s.image_bytes,
                          "json": json.dumps(s.meta, ensure_ascii=False).encode()})
    os.replace(tmp, path)


def _batches(samples: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    batch: list[Sample] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_shards(samples: Iterable[Sample], out_dir: str | Path, samples_per_shard: int,
                 resume: bool = False, extra_manifest: dict | None = None) -> dict:
    """Write samples into shards; returns the manifest.

    With resume=True, shards already listed in the manifest are kept and the first
    `sum(counts)` samples of the iterator are skipped (the iterator must be deterministic).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(out) if resume else {"shards": [], "samples_per_shard": samples_per_shard}
    if resume and manifest["samples_per_shard"] not in (None, samples_per_shard):
        raise ValueError(f"{out} was written with {manifest['samples_per_shard']} samples per shard, "
                         f"not {samples_per_shard}; resume with the same value or use a new directory")
    manifest["samples_per_shard"] = samples_per_shard
    manifest.update(extra_manifest or {})
    done = sum(entry["count"] for entry in manifest["shards"])
    iterator = iter(samples)
    for _ in range(done):
        next(iterator, None)
    for batch in _batches(iterator, samples_per_shard):
        name = shard_name(len(manifest["shards"]))
        _write_shard(out / name, batch)
        manifest["shards"].append({"name": name, "count": len(batch)})
        _write_manifest(out, manifest)
    _write_manifest(out, manifest)
    return manifest


def encode_png(image) -> bytes:
    """PIL image -> PNG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
