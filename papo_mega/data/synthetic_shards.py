"""Write the synthetic task suite as webdataset shards (used by tools/make_synthetic.py and the demo).

    write_synthetic_shards("data/synth/train", "train", 20000, tasks=["count"])

The manifest records the recipe (split, num, seed, tasks, difficulty) and `complete`; a set
written part-way continues with resume=True, and a finished set with the same recipe is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from papo_mega.data.shard_writer import MANIFEST, read_manifest, update_manifest, write_shards
from papo_mega.data.synthetic import check_tasks, generate, to_shard_samples
from papo_mega.errors import PapoError


def synthetic_recipe(split: str, num: int, seed: int = 0, tasks: Sequence[str] | None = None,
                     difficulty: str = "easy") -> dict:
    return {"split": split, "num": num, "seed": seed, "tasks": list(check_tasks(tasks)), "difficulty": difficulty}


def is_complete(out: str | Path, recipe: dict) -> bool:
    """Whether `out` already holds the finished set of exactly this recipe."""
    path = Path(out)
    if not (path / MANIFEST).is_file():
        return False
    manifest = read_manifest(path)
    return manifest.get("synthetic") == recipe and bool(manifest.get("complete"))


def check_out_dir(out: Path, recipe: dict, resume: bool) -> None:
    """Refuse to mix runs: a fresh run needs an empty directory, a resumed one the same recipe."""
    if not resume and out.is_dir() and any(out.iterdir()):
        raise PapoError(f"{out} is not empty; use --resume to continue an interrupted run or choose a new --out")
    if resume and (out / MANIFEST).is_file():
        previous = read_manifest(out).get("synthetic")
        if previous not in (None, recipe):
            raise PapoError(f"{out} holds a different synthetic set ({previous}); rerun with those arguments "
                            f"or choose a new --out")


def write_synthetic_shards(out: str | Path, split: str, num: int, seed: int = 0, tasks: Sequence[str] | None = None,
                           difficulty: str = "easy", samples_per_shard: int = 1000, resume: bool = False,
                           progress: bool = True) -> int:
    """Write `num` samples of `split` to `out`; return the number of samples in the finished set."""
    if num < 1 or samples_per_shard < 1:
        raise PapoError(f"num ({num}) and samples_per_shard ({samples_per_shard}) must be positive")
    recipe = synthetic_recipe(split, num, seed, tasks, difficulty)
    out = Path(out)
    check_out_dir(out, recipe, resume)
    samples = generate(split, num, seed=seed, tasks=recipe["tasks"], difficulty=difficulty)
    bar = tqdm(to_shard_samples(samples), total=num, unit="sample", desc=f"synthetic {split}", disable=not progress)
    # complete=False until the last shard is written: readers refuse a half-written set.
    write_shards(bar, out, samples_per_shard, resume=resume, extra_manifest={"synthetic": recipe, "complete": False})
    manifest = update_manifest(out, {"complete": True})
    return sum(s["count"] for s in manifest["shards"])


def synthetic_chance(shards: str | Path) -> dict[str, float]:
    """{task: chance level} of a synthetic shard set (its manifest's recipe); {} for other data."""
    from papo_mega.data.synthetic import chance_level

    recipe = read_manifest(shards).get("synthetic") or {}
    return {task: chance_level(task, recipe.get("difficulty", "easy")) for task in recipe.get("tasks", [])}
