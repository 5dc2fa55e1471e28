"""Stream tensors out of, and write tensors into, Hugging Face safetensors directories."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from papo_mega.errors import PapoError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class SafetensorsReader:
    """Name -> tensor, opening only the shard that holds the tensor asked for."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.is_file():
            self.weight_map: dict[str, str] = _read_index(index)
        elif (self.directory / SINGLE).is_file():
            self.weight_map = {name: SINGLE for name in _open_checked(self.directory / SINGLE).keys()}
        else:
            raise PapoError(f"no {SINGLE} or {INDEX} in {self.directory}; is this a Hugging Face model directory?")
        self._open: dict[str, object] = {}
        for shard in sorted(set(self.weight_map.values())):
            if not (self.directory / shard).is_file():
                raise PapoError(f"shard {shard} listed in {INDEX} is missing from {self.directory}; re-download it")
            # Opening reads only the header, and safetensors checks it against the file size: a
            # truncated shard fails here, in one line, before any conversion process starts.
            self._open[shard] = _open_checked(self.directory / shard)

    def names(self) -> list[str]:
        return sorted(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise PapoError(f"tensor {name} is missing from {self.directory}; the checkpoint is incomplete")
        return self._open[self.weight_map[name]].get_tensor(name)

    def get_many(self, prefix: str) -> dict[str, torch.Tensor]:
        return {name: self.get(name) for name in self.weight_map if name.startswith(prefix)}

    def total_bytes(self) -> int:
        return sum((self.directory / shard).stat().st_size for shard in set(self.weight_map.values()))


def _read_index(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise PapoError(f"{path} is damaged ({type(err).__name__}: {err}); re-download the model") from None
    if not isinstance(weight_map, dict):
        raise PapoError(f"{path} is damaged (weight_map is not an object); re-download the model")
    return weight_map


def _open_checked(path: Path):
    """safe_open, with a damaged file (truncated, bad header) as one line naming it."""
    try:
        return safe_open(path, "pt")
    except (SafetensorError, OSError) as err:
        raise PapoError(f"{path} is not a readable safetensors file ({err}); it is truncated or damaged: "
                        f"re-download it") from None


def write_safetensors(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write tensors as transformers does: one file, or size-capped shards plus an index."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name].contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(directory / SINGLE), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / filename), metadata={"format": "pt"})
        weight_map.update({name: filename for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
