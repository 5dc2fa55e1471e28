"""Training checkpoints in megatron-core's distributed format (model directories: model_dir.py).

Every rank writes only its shards; the stored tensors are keyed by global names with global
offsets, so model weights written at TP2xPP2 load at TP1, PP2 or any other layout.

Training checkpoints (docs/checkpoints.md) add the optimizer, the LR scheduler, the step, the
resolved config and every rank's own state (data position, RNG) on top, and are published
atomically:

    RUN_DIR/checkpoints/step_00000004/     model + optimizer shards (metadata.json, *.distcp, common.pt),
                                           checkpoint.json (the completion marker), config.yaml,
                                           rank_state/rank_00000.pt ...
    RUN_DIR/checkpoints/latest             "step_00000004", rewritten last

    path = save_training_checkpoint(run_dir, step, chunks, optimizer, scheduler, rank_state, cfg, groups)
    resume = resolve_resume(cfg)           # auto | none | a path
    state = load_training_checkpoint(resume, chunks, optimizer, scheduler, groups)
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from papo_mega.errors import PapoError
from papo_mega.model_dir import load_chunk_states, load_sharded, model_sharded_state_dict, unwrap
from papo_mega.optim_state import (
    optimizer_has_state,
    optimizer_kind,
    optimizer_metadata,
    prepare_optimizer_for_load,
    restore_steps,
    tolerate_missing_step,
)
from papo_mega.run_dir import fsync_dir, write_atomic

_log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MARKER = "checkpoint.json"
RANK_STATE = "rank_state"
FORMAT_VERSION = 1
DISTOPT_FORMAT = "dp_reshardable"
"""How the DistributedOptimizer's state is stored: megatron-core 0.16's default for training
(parallel save and load without exchange; reshards across the data-parallel size only). The other
reshardable choice, 'fully_reshardable', gathers a whole model-parallel shard's optimizer state on
every DP rank at each save; pass it as `optimizer_format` when a resume must change TP/PP."""
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_TMP_DIR = re.compile(r"^step_\d{8}\.(tmp|old)-[0-9a-f]+$")

_FAULT_HOOK: Callable[[str], None] | None = None
"""Tests only: called with the save phase ('shards_written', 'published') to simulate a crash there."""


# -- training checkpoints -----------------------------------------------------------------------


def _fault(phase: str) -> None:
    if _FAULT_HOOK is not None:
        _FAULT_HOOK(phase)


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def read_marker(path: str | Path) -> dict | None:
    """The completion marker of a published checkpoint directory, or None when it is not one."""
    marker = Path(path) / MARKER
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("complete") is True else None


def is_complete_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return not _TMP_DIR.match(path.name) and read_marker(path) is not None


def _complete_steps(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete checkpoint under RUN_DIR/checkpoints, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for entry in ckpt_root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir() and read_marker(entry) is not None:
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint RUN_DIR/checkpoints/latest names; if that pointer is missing or names no
    complete checkpoint, the complete step directory with the highest step (None if there is none).
    Temporary (unpublished) directories are never returned. No collectives."""
    root = checkpoints_dir(run_dir)
    pointer = root / LATEST
    name = _pointer_name(root)
    if name and _STEP_DIR.match(name) and is_complete_checkpoint(root / name):
        return root / name
    steps = _complete_steps(root)
    if name is not None or steps:
        _log.warning("%s %s; using the newest complete checkpoint instead: %s", pointer,
                     "names no complete checkpoint" if name is not None else "is missing",
                     steps[-1][1] if steps else None)
    return steps[-1][1] if steps else None


def _pointer_name(root: Path) -> str | None:
    try:
        return (root / LATEST).read_text().strip()
    except OSError:
        return None


# -- damaged checkpoints ---------------------------------------------------------------------------


def _marker_problem(path: Path) -> str | None:
    """Why path/checkpoint.json does not mark a complete checkpoint (None: it does)."""
    try:
        meta = json.loads((path / MARKER).read_text())
    except OSError as err:
        return f"{MARKER} unreadable ({err.strerror or type(err).__name__})"
    except ValueError as err:
        return f"{MARKER} is not valid JSON ({str(err).splitlines()[0]})"
    if not (isinstance(meta, dict) and meta.get("complete") is True):
        return f"{MARKER} does not say complete: true"
    return None


def _shards_problem(path: Path) -> str | None:
    """A missing or truncated shard file: every byte range torch's .metadata indexes must exist."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        storage = FileSystemReader(str(path)).read_metadata().storage_data
    except Exception as err:  # noqa: BLE001 - a truncated pickle raises many kinds
        return f"its shard index .metadata is unreadable ({type(err).__name__})"
    need: dict[str, int] = {}
    for info in storage.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        try:
            have = (path / name).stat().st_size
        except OSError:
            return f"shard file {name} is missing"
        if have < size:
            return f"shard file {name} is truncated ({have} of {size} bytes)"
    return None


def _rank_files_problem(path: Path, meta: dict) -> str | None:
    for entry in meta.get("ranks") or []:
        rank_file = path / RANK_STATE / f"rank_{int(entry['rank']):05d}.pt"
        try:
            torch.load(rank_file, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - OSError, unpickling or zip errors of a cut file
            return f"{RANK_STATE}/{rank_file.name} is unreadable ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    return None


def checkpoint_problem(path: str | Path) -> str | None:
    """Why a published checkpoint directory cannot be resumed (None: intact as far as can be told
    without loading it): an unreadable marker, a missing or truncated shard file, an unreadable
    rank_state file or config.yaml. Checkpoints of another format version are left to the load to
    report. No collectives (rank 0 decides for all: `prepare_resume`)."""
    path = Path(path)
    problem = _marker_problem(path)
    if problem is not None:
        return problem
    meta = read_marker(path) or {}
    if meta.get("format_version") != FORMAT_VERSION:
        return None
    for check in (lambda: _shards_problem(path), lambda: _rank_files_problem(path, meta)):
        problem = check()
        if problem is not None:
            return problem
    from papo_mega.config import read_yaml

    try:
        read_yaml(path / "config.yaml")
    except Exception as err:  # noqa: BLE001 - OSError, YAML or duplicate-key errors
        return f"config.yaml is unreadable ({type(err).__name__})"
    return None


def _published_steps(root: Path) -> list[Path]:
    """Every published-looking step_N directory (complete or not), newest first."""
    if not root.is_dir():
        return []
    return sorted((e for e in root.iterdir() if _STEP_DIR.match(e.name) and e.is_dir()), reverse=True)


def newest_intact_checkpoint(run_dir: str | Path, notes: list[str] | None = None) -> Path | None:
    """The checkpoint `resume=auto` takes: `latest`'s if intact, else the newest intact step_N.
    Every damaged checkpoint newer than the one chosen is reported in `notes` with its cause;
    a PapoError when step directories exist but none is intact. No collectives."""
    root = checkpoints_dir(run_dir)
    name = _pointer_name(root)
    pointed = root / name if name and _STEP_DIR.match(name) else None
    candidates = ([pointed] if pointed is not None and pointed.is_dir() else [])
    candidates += [p for p in _published_steps(root) if p != pointed]
    damaged = []
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            notes = notes if notes is not None else []
            notes += [f"checkpoint {p} is damaged ({why}); resuming from the newest intact one, {path}"
                      for p, why in damaged]
            return path
        damaged.append((path, problem))
    if damaged:
        causes = "; ".join(f"{p.name}: {why}" for p, why in damaged)
        raise PapoError(f"no intact checkpoint in {root} ({causes}); resume from another run's checkpoint with "
                        f"checkpoint.resume=PATH, or start afresh with --resume none --overwrite")
    return None


def resolve_resume(cfg, run_dir: str | Path | None = None, notes: list[str] | None = None) -> Path | None:
    """Which checkpoint to resume from: checkpoint.resume = auto (the newest intact one in
    run_dir, default run.run_dir, or None for a fresh run), none (None), or a path (that
    checkpoint; PapoError if incomplete or damaged). Damaged checkpoints skipped by auto are
    described in `notes`. No collectives."""
    resume = str(cfg.checkpoint.resume).strip()
    if resume == "auto":
        return newest_intact_checkpoint(run_dir if run_dir is not None else cfg.run.run_dir, notes)
    if resume in ("none", ""):
        return None
    path = Path(resume)
    if (path / MARKER).exists() and not _TMP_DIR.match(path.name):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        raise PapoError(f"checkpoint.resume={resume} is damaged ({problem}); pass an earlier checkpoint of "
                        f"{path.parent} or checkpoint.resume=auto, which takes the newest intact one")
    if (path / CHECKPOINTS).is_dir() or path.name == CHECKPOINTS:
        hint = f"it looks like a run directory; pass one of its {CHECKPOINTS}/step_* directories or resume=auto"
    elif _TMP_DIR.match(path.name):
        hint = "it is an unpublished (interrupted) save; pass a published step_* directory"
    elif not path.exists():
        hint = "it does not exist"
    else:
        hint = f"it has no {MARKER} completion marker"
    raise PapoError(f"checkpoint.resume={resume} is not a complete training checkpoint ({hint}); "
                    f"use auto, none or a RUN_DIR/{CHECKPOINTS}/step_NNNNNNNN directory")


# -- what identifies the model, the layout and the optimizer ---------------------------------------


def _local_signature(chunks) -> dict:
    """Shape-defining settings of this rank's chunks, named as config keys."""
    sig: dict = {}
    for chunk in chunks:
        inner = unwrap(chunk)
        config = getattr(inner, "config", None)
        for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups"):
            if config is not None and getattr(config, key, None) is not None:
                sig[f"model.{key}"] = int(getattr(config, key))
        if getattr(inner, "vocab_size", None) is not None:
            sig["model.vocab_size"] = int(inner.vocab_size)
        lm = getattr(inner, "lm", None)
        if lm is not None and getattr(lm, "vocab_size", None) is not None:
            sig["model.padded_vocab_size"] = int(lm.vocab_size)
        if hasattr(inner, "share_embeddings_and_output_weights"):
            sig["model.tie_embeddings"] = bool(inner.share_embeddings_and_output_weights)
        vision = getattr(inner, "vision", None)
        if vision is not None:
            sig["vision.enabled"] = True
            vcfg = getattr(vision, "vision_cfg", None)
            for key in ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                        "temporal_patch_size", "spatial_merge_size"):
                if vcfg is not None and getattr(vcfg, key, None) is not None:
                    sig[f"vision.{key}"] = int(getattr(vcfg, key))
        elif getattr(inner, "pre_process", False):
            sig["vision.enabled"] = False  # the first stage is where a vision tower would live
    return sig


def model_signature(chunks) -> dict:
    """The union of every rank's `_local_signature` (collective): the same dict on every rank."""
    import torch.distributed as dist

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, _local_signature(chunks))
    merged: dict = {}
    for sig in gathered:
        merged.update(sig)
    return dict(sorted(merged.items()))


def _layout_of(groups) -> dict:
    lay = groups.layout
    return {"world_size": lay.world_size, "tp_size": lay.tp_size, "pp_size": lay.pp_size,
            "vpp_size": lay.vpp_size, "cp_size": lay.cp_size, "dp_size": lay.dp_size}


# -- RNG -------------------------------------------------------------------------------------------


def capture_rng_states() -> dict:
    """Every generator a training step may draw from: python, numpy, torch CPU, CUDA, megatron's tracker."""
    import numpy as np
    from megatron.core.tensor_parallel import random as mp_random

    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch_cpu": torch.get_rng_state(),
              "torch_cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    tracker = mp_random.get_cuda_rng_tracker()
    states["megatron_tracker"] = {name: state.clone() for name, state in tracker.get_states().items()}
    return states


def restore_rng_states(states: dict, tracker: bool = True) -> None:
    """Put back what `capture_rng_states` took (the megatron tracker only when `tracker`)."""
    import numpy as np
    from megatron.core.tensor_parallel import random as mp_random

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch_cpu"])
    if states.get("torch_cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["torch_cuda"])
    if tracker and states.get("megatron_tracker"):
        mp_random.get_cuda_rng_tracker().set_states({k: v.clone() for k, v in states["megatron_tracker"].items()})


# -- saving ----------------------------------------------------------------------------------------


def _first_oserror(err: BaseException) -> BaseException | None:
    """The OSError behind err (itself, its cause chain, or a torch CheckpointException's failures)."""
    seen = set()
    stack = [err]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError):
            return current
        stack.extend([current.__cause__, current.__context__])
        for failure in (getattr(current, "failures", None) or {}).values():
            if isinstance(failure, BaseException):
                stack.append(failure)
            elif isinstance(failure, tuple) and failure and isinstance(failure[0], BaseException):
                stack.append(failure[0])
    return None


def _checkpoint_exception() -> type:
    """torch.distributed.checkpoint's CheckpointException (a BaseException, not an Exception)."""
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


def _is_save_failure(err: BaseException) -> bool:
    """An I/O failure (disk full, permissions, ...) or megatron's report of one on some rank."""
    return _first_oserror(err) is not None or isinstance(err, _checkpoint_exception())


def _save_error(step: int, directory: Path, err: BaseException | str, previous: Path | None) -> PapoError:
    if isinstance(err, BaseException):
        cause = _first_oserror(err)
        where = ""
        if cause is None:
            # megatron's writer failures arrive as {rank: (exception, traceback)}, the OSError
            # itself only in the text (its __cause__ does not survive the gather between ranks).
            failures = getattr(err, "failures", None) or {}
            for rank, failure in sorted(failures.items()):
                cause = failure[0] if isinstance(failure, tuple) and failure else failure
                where = f" on rank {rank}"
                break
        cause = cause if isinstance(cause, BaseException) else err
        what = f"{type(cause).__name__}{where}: {cause}".splitlines()[0]
        if getattr(cause, "errno", None) == errno.ENOSPC or "No space left on device" in what:
            what += " - free disk space or lower checkpoint.keep_last"
    else:
        what = err
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    return PapoError(f"saving the checkpoint of step {step} to {directory} failed ({what}); nothing was "
                     f"published and {kept}")


def _agree(error: str | None) -> str | None:
    """Every rank's local outcome -> the first error any rank had (collective; same on all ranks)."""
    import torch.distributed as dist

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, error)
    return next((e for e in gathered if e), None)


def _publish(root: Path, tmp: Path, final: Path) -> None:
    """Rank 0: move the finished temporary directory into place, then repoint `latest` (last)."""
    aside = None
    if final.exists():
        # Re-saving a step (a resume from an older checkpoint): move the old one aside first; it is
        # cleaned up with the stale temporary directories.
        aside = root / f"{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, aside)
    try:
        os.replace(tmp, final)
    except OSError:
        if aside is not None:
            os.replace(aside, final)
        raise
    fsync_dir(root)
    _fault("published")
    write_atomic(root / LATEST, final.name + "\n")


def _prune(root: Path, keep_last: int, new: Path, current_tmp: Path) -> None:
    """Rank 0, after publishing: drop complete checkpoints beyond keep_last (never `new`) and stale
    temporary directories of interrupted saves. Failures here only warn: the new checkpoint stands."""
    others = [path for _, path in _complete_steps(root) if path != new]
    doomed = others[: max(0, len(others) - (keep_last - 1))]
    doomed += [e for e in root.iterdir() if _TMP_DIR.match(e.name) and e != current_tmp and e.is_dir()]
    for path in doomed:
        try:
            shutil.rmtree(path)
        except OSError as err:
            _log.warning("could not delete old checkpoint directory %s: %s", path, err)


def save_training_checkpoint(run_dir: str | Path, step: int, chunks, optimizer, scheduler, rank_state: dict,
                             cfg, groups, *, optimizer_format: str = DISTOPT_FORMAT) -> Path:
    """Write a full training checkpoint of `step` and publish it atomically (collective).

    Saved: model shards and optimizer state (megatron dist_checkpointing), the scheduler state, the
    step, the resolved config, and per rank `rank_state` (the caller's data position, counters, ...)
    plus every RNG state. Written under RUN_DIR/checkpoints/step_X.tmp-ID, renamed to step_X once
    every rank has finished and the completion marker is written; RUN_DIR/checkpoints/latest is
    rewritten after that, then checkpoints beyond cfg.checkpoint.keep_last and stale temporary
    directories are deleted. Returns the published directory.

    Any OSError while saving (a full disk, ...) raises a one-line PapoError on every rank; nothing is
    published and the previous checkpoint stays the latest. (A failure inside megatron's writer that
    only one rank sees is reported by megatron to all ranks; a failure before megatron's first
    collective can leave the other ranks waiting for parallel.timeout_s.)
    """
    import torch.distributed as dist

    from papo_mega.config import save_config

    root = checkpoints_dir(run_dir)
    final = root / step_dir_name(step)
    is_main = dist.get_rank() == 0
    previous = latest_checkpoint(run_dir) if is_main else None

    # 1. rank 0 names and creates the temporary directory; everyone learns its name (or the error).
    plan: list = [None, None, str(previous) if previous else None]
    if is_main:
        tmp_name = f"{final.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            (root / tmp_name).mkdir(parents=True)
            plan[0] = tmp_name
        except OSError as err:
            plan[1] = str(_save_error(step, root / tmp_name, err, previous))
    dist.broadcast_object_list(plan, src=0)
    if plan[1]:
        raise PapoError(plan[1])
    tmp = root / plan[0]
    previous = Path(plan[2]) if plan[2] else None

    # 2. model + optimizer shards (megatron reports a write failure on any rank to all ranks).
    kind = optimizer_kind(optimizer)
    empty = kind is not None and not optimizer_has_state(optimizer)
    model_sd = model_sharded_state_dict(chunks)
    sharded: dict = {"model": model_sd}
    if kind is not None and not empty:
        sharded["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=False, metadata=optimizer_metadata(kind, optimizer_format))
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    # As megatron's training does by default: the DP replicas share the writing of replicated shards.
    strategy = FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), groups.dp)
    try:
        dist_checkpointing.save(sharded, str(tmp), sharded_strategy=strategy)
    except (Exception, _checkpoint_exception()) as err:
        if not _is_save_failure(err):
            raise
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _save_error(step, tmp, err, previous) from None

    # 3. this rank's own state, and (rank 0) the config; then everyone agrees it all went well.
    signature = model_signature(chunks)
    index: list = [None] * dist.get_world_size()
    me = {"rank": dist.get_rank(), "dp_rank": groups.dp_rank, "tp_rank": groups.tp_rank, "pp_rank": groups.pp_rank}
    dist.all_gather_object(index, me)
    error = None
    try:
        (tmp / RANK_STATE).mkdir(exist_ok=True)
        payload = {**me, "layout": _layout_of(groups), "user": rank_state, "rng": capture_rng_states()}
        torch.save(payload, tmp / RANK_STATE / f"rank_{dist.get_rank():05d}.pt")
        if is_main:
            save_config(cfg, tmp)
    except Exception as err:  # noqa: BLE001 - every rank must reach the agreement below
        error = str(_save_error(step, tmp, err, previous))
    error = _agree(error)
    if error is None:
        _fault("shards_written")
        # 4. rank 0 writes the completion marker and publishes; then tells everyone how it went.
        if is_main:
            marker = {
                "complete": True, "format_version": FORMAT_VERSION, "step": int(step), "saved_at": time.time(),
                "layout": _layout_of(groups), "ranks": index, "model_signature": signature,
                "optimizer": {"kind": kind, "format": optimizer_format if kind == "distributed" else "model_space",
                              "empty": empty},
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
            }
            try:
                write_atomic(tmp / MARKER, json.dumps(marker, indent=1))
                _publish(root, tmp, final)
            except Exception as err:  # noqa: BLE001 - the other ranks wait for the outcome
                error = str(_save_error(step, tmp, err, previous))
        outcome = [error]
        dist.broadcast_object_list(outcome, src=0)
        error = outcome[0]
    if error is not None:
        if is_main and not final.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise PapoError(error)
    if is_main:
        _prune(root, cfg.checkpoint.keep_last, final, tmp)
    return final


# -- loading ---------------------------------------------------------------------------------------


def _describe_layout(layout: dict) -> str:
    text = f"tp={layout['tp_size']} pp={layout['pp_size']} dp={layout['dp_size']}"
    return text + (f" vpp={layout['vpp_size']}" if layout.get("vpp_size") else "")


def _check_same_model(path: Path, saved: dict, current: dict) -> None:
    differ = [f"{key} {saved[key]} in the checkpoint, {current[key]} now"
              for key in sorted(set(saved) & set(current)) if saved[key] != current[key]]
    if differ:
        raise PapoError(f"{path} holds a different model ({'; '.join(differ)}); resume with the config it was "
                        f"saved with ({path / 'config.yaml'}) or start a new run directory")


def _check_optimizer(path: Path, meta: dict, kind: str, layout: dict) -> None:
    saved = meta.get("optimizer") or {}
    fix = "pass checkpoint.load_optimizer=false to resume with the weights, step and data position and fresh " \
          "optimizer moments"
    if saved.get("kind") is None:
        raise PapoError(f"{path} holds no optimizer state; {fix}")
    if saved["kind"] != kind:
        names = {"distributed": "the distributed optimizer", "plain": "the non-distributed optimizer"}
        raise PapoError(f"{path} was saved with {names[saved['kind']]} but this run uses {names[kind]} "
                        f"(parallel.use_distributed_optimizer); set it as saved, or {fix}")
    then = meta["layout"]
    if kind == "distributed" and saved.get("format") == "dp_reshardable":
        moved = [k for k in ("tp_size", "pp_size", "vpp_size", "cp_size") if then.get(k) != layout.get(k)]
        if moved:
            raise PapoError(f"the distributed-optimizer state in {path} was saved at {_describe_layout(then)} and "
                            f"reshards only across the data-parallel size, not to {_describe_layout(layout)}; "
                            f"resume at tp={then['tp_size']} pp={then['pp_size']}, or {fix}")


def _pick_rank_file(path: Path, meta: dict, groups, layout: dict) -> tuple[Path | None, str]:
    """(file, how): this rank's own state ('own'), a same-DP-rank peer's ('same_dp_rank'), or none."""
    import torch.distributed as dist

    then = meta["layout"]
    if then == layout:
        return path / RANK_STATE / f"rank_{dist.get_rank():05d}.pt", "own"
    if then["dp_size"] == layout["dp_size"]:
        for entry in meta["ranks"]:
            if entry["dp_rank"] == groups.dp_rank:
                return path / RANK_STATE / f"rank_{entry['rank']:05d}.pt", "same_dp_rank"
    return None, "none"


def _damaged_fix(path: Path) -> str:
    """The fix for a checkpoint whose files cannot be read: the newest earlier intact one."""
    earlier = [p for p in _published_steps(path.parent) if p.name < path.name and checkpoint_problem(p) is None]
    if earlier:
        return f"the checkpoint is damaged; resume from the earlier one with checkpoint.resume={earlier[0]}"
    return "the checkpoint is damaged and no earlier intact one exists; start afresh with --resume none --overwrite"


def load_training_checkpoint(path: str | Path, chunks, optimizer, scheduler, groups,
                             load_optimizer: bool = True) -> dict:
    """Restore a training checkpoint into this run's chunks, optimizer and scheduler (collective).

    Returns {'step', 'rank_state', 'config'}: the step saved, this rank's `rank_state` as passed to
    the save, and the saved config as a dict. Model weights load at any TP/PP/DP layout. The
    optimizer state loads where megatron can reshard it (the non-distributed optimizer: any layout;
    the distributed one: a different DP size only) - otherwise a PapoError says to pass
    checkpoint.load_optimizer=false. The scheduler's update count is always restored.

    rank_state and RNG: with the saved layout, each rank gets its own state and every generator is
    restored (exact resume). With the same DP size at another TP/PP, each rank gets the state of
    a saved rank with its DP rank (data position) and the python/numpy/torch generators, not
    megatron's per-TP-rank tracker. With another DP size rank_state is None (a warning is logged):
    the caller restarts its data stream at the start of the saved epoch.
    """
    import torch.distributed as dist

    path = Path(path)
    meta = read_marker(path)
    if meta is None or _TMP_DIR.match(path.name):
        raise PapoError(f"{path} is not a complete training checkpoint (no {MARKER} marker, or an unpublished "
                        f"save); pass a RUN_DIR/{CHECKPOINTS}/step_NNNNNNNN directory")
    if meta.get("format_version") != FORMAT_VERSION:
        raise PapoError(f"{path} has checkpoint format {meta.get('format_version')}, this version reads "
                        f"{FORMAT_VERSION}; load it with the papo_mega version that wrote it")
    # Everything that can be decided from the marker is decided before megatron reads a byte.
    _check_same_model(path, meta.get("model_signature") or {}, model_signature(chunks))
    layout = _layout_of(groups)
    kind = optimizer_kind(optimizer)
    # An optimizer saved before its first step is a fresh one: nothing to restore.
    restore_optimizer = load_optimizer and kind is not None and not (meta.get("optimizer") or {}).get("empty")
    if restore_optimizer:
        _check_optimizer(path, meta, kind, layout)

    model_sd = model_sharded_state_dict(chunks)
    sharded: dict = {"model": model_sd}
    if restore_optimizer:
        prepare_optimizer_for_load(optimizer)
        fmt = meta["optimizer"]["format"] if kind == "distributed" else DISTOPT_FORMAT
        sharded["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=True, metadata=optimizer_metadata(kind, fmt))
    hint = " or pass checkpoint.load_optimizer=false" if restore_optimizer else ""
    try:
        loaded = load_sharded(sharded, path, fix=f"check the checkpoint matches this model{hint}")
    except PapoError:
        raise
    except (Exception, _checkpoint_exception()) as err:  # noqa: BLE001 - megatron's reasons are many
        # The model signature matched (checked above), so a failing read means damaged files, not a
        # wrong optimizer setting: name the earlier checkpoint to resume from instead.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PapoError(f"could not load {path} ({type(err).__name__}: {first[:300]}); {_damaged_fix(path)}") from None
    load_chunk_states(chunks, loaded["model"])
    if restore_optimizer:
        # megatron 0.16's dp_reshardable load copies into views of the (fp32) weights; outside
        # no_grad autograd refuses the in-place copy.
        with torch.no_grad(), tolerate_missing_step(optimizer):
            optimizer.load_state_dict(loaded["optimizer"])
        restore_steps(optimizer)
    elif optimizer is not None:
        optimizer.reload_model_params()  # main (fp32) copies follow the loaded weights
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])

    rank_file, how = _pick_rank_file(path, meta, groups, layout)
    rank_state = None
    if rank_file is not None:
        try:
            payload = torch.load(rank_file, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - OSError / unpickling error of a cut file
            raise PapoError(f"could not read {rank_file} ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                            f"{_damaged_fix(path)}") from None
        rank_state = payload["user"]
        restore_rng_states(payload["rng"], tracker=how == "own")
    if how != "own" and dist.get_rank() == 0:
        _log.warning("%s was saved at %s, this run is %s: %s", path, _describe_layout(meta["layout"]),
                     _describe_layout(layout),
                     "each rank continues from the data position and RNG of a saved rank with its DP rank "
                     "(megatron's per-TP-rank RNG tracker keeps this run's seeding)" if how == "same_dp_rank" else
                     "the data-parallel size changed, so the saved data positions and RNG states do not apply "
                     "(rank_state=None): data streams start afresh")
    config = {}
    try:
        from papo_mega.config import read_yaml

        config = read_yaml(path / "config.yaml") or {}
    except Exception as err:  # noqa: BLE001 - OSError, YAML errors: the config is informative only
        _log.warning("could not read %s: %s", path / "config.yaml", err)
    return {"step": int(meta["step"]), "rank_state": rank_state, "config": config}


# -- starting or continuing a run (collective: rank 0 decides, every rank gets the same answer) ----


def _holds_output(path: Path) -> bool:
    """Whether path is saved work: a checkpoints folder with step directories, a non-empty file, a
    model directory."""
    if path.name == CHECKPOINTS:
        return bool(_published_steps(path))
    if path.is_file():
        return path.stat().st_size > 0
    return path.exists()


def move_aside(run_dir: Path, paths: list[Path]) -> Path:
    """--overwrite: move `paths` into RUN_DIR/replaced-<UTC time>/ (kept, not deleted)."""
    dest = run_dir / time.strftime("replaced-%Y%m%dT%H%M%SZ", time.gmtime())
    while dest.exists():
        dest = dest.with_name(dest.name + "-1")
    dest.mkdir(parents=True)
    for path in paths:
        if path.exists():
            os.replace(path, dest / path.name)
    return dest


def _fresh_start(run_dir: Path, mode: str, evidence: list[Path], outputs: list[Path], overwrite: bool,
                 command: str) -> list[str]:
    """A run starting at step 0 in a directory that holds saved work refuses, unless --overwrite
    moves that work aside. With resume=auto and no checkpoint, a metrics.jsonl alone is a run killed
    before its first save: starting again repeats it, nothing is lost."""
    found = [p for p in evidence if _holds_output(p) and not (mode == "auto" and p.name == "metrics.jsonl")]
    if not found:
        return []
    if overwrite:
        return [f"--overwrite: moved the earlier run's {', '.join(p.name for p in outputs if p.exists())} to "
                f"{move_aside(run_dir, outputs)}"]
    names = ", ".join(str(p) for p in found)
    raise PapoError(f"{run_dir} already holds a {command} run ({names}) and checkpoint.resume={mode} would start "
                    f"over it; continue it with --resume auto, choose a new run.run_dir, or pass --overwrite to "
                    f"move the earlier run to {run_dir}/replaced-<time>/")


def _check_config(resume: Path, cfg, benign: tuple[str, ...], allow: bool) -> list[str]:
    """Print how the config differs from the checkpoint's; refuse what changes the experiment."""
    from papo_mega.config import config_to_dict, read_yaml
    from papo_mega.config_diff import config_diff, describe, refused

    diff = config_diff(read_yaml(resume / "config.yaml") or {}, config_to_dict(cfg))
    bad = refused(diff, benign)
    if bad and not allow:
        raise PapoError(f"the config differs from the one {resume} was saved with in what defines the run "
                        f"({describe(bad)}); resume with {resume / 'config.yaml'}, start a new run.run_dir, or "
                        f"pass --allow-config-change")
    return [f"config changed since {resume.name}{' (allowed by --allow-config-change)' if bad else ''}: "
            f"{describe(diff)}"] if diff else []


def archive_config(run_dir: Path, cfg, step: int) -> list[str]:
    """Keep RUN_DIR/config.yaml as config.step_N.yaml (the config up to step N) when this run's
    config differs from it, before save_config replaces it: the history stays readable."""
    from papo_mega.config import config_to_dict, read_yaml
    from papo_mega.config_diff import config_diff

    target = run_dir / "config.yaml"
    try:
        old = read_yaml(target) or {}
    except Exception:  # noqa: BLE001 - missing or unreadable: keep whatever is there if it exists
        old = None
    if old is None and not target.exists():
        return []
    if old is not None and not config_diff(old, config_to_dict(cfg)):
        return []
    kept = run_dir / f"config.step_{step:08d}.yaml"
    while kept.exists():
        kept = kept.with_name(kept.stem + "-1.yaml")
    os.replace(target, kept)
    return [f"kept the earlier {target.name} as {kept.name}"]


def _decide_resume(cfg, run_dir: Path, evidence: list[Path], outputs: list[Path], benign: tuple[str, ...],
                   overwrite: bool, allow_config_change: bool, command: str) -> tuple[Path | None, list[str]]:
    notes: list[str] = []
    resume = resolve_resume(cfg, run_dir, notes)
    if resume is None:
        notes += _fresh_start(run_dir, str(cfg.checkpoint.resume).strip(), evidence, outputs, overwrite, command)
        step = 0
    else:
        notes += _check_config(resume, cfg, benign, allow_config_change)
        step = int((read_marker(resume) or {}).get("step", 0))
    notes += archive_config(run_dir, cfg, step)
    return resume, notes


def prepare_resume(cfg, run_dir: str | Path, *, evidence: list[Path], outputs: list[Path],
                   benign: tuple[str, ...], overwrite: bool = False, allow_config_change: bool = False,
                   command: str = "train") -> Path | None:
    """The checkpoint a run continues from (None: a fresh start), decided once on rank 0 and
    broadcast, so every rank resumes from the same one or raises the same PapoError (collective).

    resume=auto skips damaged checkpoints, saying so; a resume whose config differs from the
    checkpoint's prints the difference and refuses what is not in `benign` unless
    `allow_config_change` (papo_mega/config_diff.py); a fresh start in a directory holding saved
    work (`evidence`) refuses unless `overwrite` moves `outputs` aside; RUN_DIR/config.yaml of an
    earlier config is kept as config.step_N.yaml. Call before anything writes to run_dir."""
    import sys

    import torch.distributed as dist

    run_dir = Path(run_dir)
    answer: list = [None, None]
    if dist.get_rank() == 0:
        try:
            resume, notes = _decide_resume(cfg, run_dir, evidence, outputs, benign, overwrite, allow_config_change,
                                           command)
            answer[0] = str(resume) if resume is not None else None
            for note in notes:
                print(f"[papo-mega] {note}", file=sys.stderr, flush=True)
        except PapoError as err:
            answer[1] = str(err)
        except OSError as err:  # moving aside, renaming config.yaml: one line on every rank
            answer[1] = f"could not prepare {run_dir} ({type(err).__name__}: {err}); check the run directory"
    dist.broadcast_object_list(answer, src=0)
    if answer[1]:
        raise PapoError(answer[1])
    return Path(answer[0]) if answer[0] else None


def run_files(run_dir: str | Path, model_dir: str | Path | None = None) -> tuple[list[Path], list[Path]]:
    """(evidence of an earlier run, everything --overwrite moves aside) of a run directory whose
    final model is `model_dir` (default RUN_DIR/final, as train writes it)."""
    from papo_mega.metrics import METRICS_FILE, TB_DIR

    run_dir = Path(run_dir)
    evidence = [run_dir / CHECKPOINTS, run_dir / METRICS_FILE, Path(model_dir) if model_dir else run_dir / "final"]
    outputs = evidence + [run_dir / name for name in (TB_DIR, "plots", "eval", "config.yaml")]
    outputs += sorted(run_dir.glob("config.step_*.yaml"))
    return evidence, outputs
