"""Model directories: a model's weights in megatron-core's distributed format plus its metadata.

    RUN_DIR/final/  papo_model.json (architecture, the transformers config of the same model, dtype)
                    model/          (metadata.json, *.distcp, common.pt)

What convert_hf_to_mcore.py writes, SFT and RL training export, and eval, export and training
load (`algo.init_from`). Every rank writes only its shards, keyed by global names with global
offsets, so weights written at TP2xPP2 load at TP1, PP2 or any other layout, and with either layer
spec: Transformer Engine's modules add `_extra_state` entries (fp8 metadata) that a checkpoint
written with the local spec lacks, and a TE-written checkpoint carries entries the local spec does
not ask for. `load_sharded` and `load_chunk_states` tolerate exactly those and nothing else.
"""

from __future__ import annotations

from pathlib import Path

from papo_mega.errors import PapoError
from papo_mega.models.te_names import is_extra_state


def unwrap(chunk):
    """The model inside megatron's DDP wrapper (or the chunk itself)."""
    return getattr(chunk, "module", chunk)


def model_sharded_state_dict(chunks) -> dict:
    """All chunks' sharded state dicts; the chunk index only names the entry, storage is by global key."""
    return {f"chunk{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def save_model(chunks, directory: str | Path) -> None:
    """Write the model's shards from every rank (collective: all ranks must call it)."""
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model_sharded_state_dict(chunks), str(directory))


def load_sharded(sharded: dict, directory: str | Path,
                 fix: str = "check the model config and the checkpoint path") -> dict:
    """megatron's dist_checkpointing.load, with extra state absent from the checkpoint left out.

    megatron's StrictHandling.RETURN_UNEXPECTED reads the checkpoint's metadata, drops the requested
    entries it lacks ("unexpected" in megatron's terms) and returns their keys; entries the
    checkpoint holds but nobody asks for are ignored, as by default. Only extra state may be
    absent: a missing weight is an error, as it was before (then raised inside torch's DCP).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    loaded, _, unexpected = dist_checkpointing.load(sharded, str(directory), strict=StrictHandling.RETURN_UNEXPECTED)
    absent = sorted(key for key in unexpected if not is_extra_state(key))
    if absent:
        raise PapoError(f"{directory} lacks {len(absent)} tensors this model needs ({', '.join(absent[:3])}); "
                        f"it was written for a different model: {fix}")
    return loaded


def load_chunk_states(chunks, states: dict) -> None:
    """Load each chunk's entry of a loaded state dict; absent extra state keeps the module's own
    (TE's set_extra_state(None) does nothing either, and megatron's local linears default it to None)."""
    for i, chunk in enumerate(chunks):
        result = unwrap(chunk).load_state_dict(states[f"chunk{i}"], strict=False)
        wrong = [k for k in (*result.missing_keys, *result.unexpected_keys) if not is_extra_state(k)]
        if wrong:
            raise PapoError(f"chunk {i} does not match its checkpoint ({', '.join(wrong[:3])}); "
                            f"check the model config")


def load_model(chunks, directory: str | Path) -> None:
    """Load a model checkpoint written at any layout into this layout's chunks (collective)."""
    directory = Path(directory)
    if not (directory / "metadata.json").is_file():
        raise PapoError(f"{directory} is not a megatron distributed checkpoint (no metadata.json); check the path")
    load_chunk_states(chunks, load_sharded(model_sharded_state_dict(chunks), directory))


def load_model_dir(ckpt_dir: str | Path, groups, precision: str | None = None):
    """Build this rank's chunks for a model directory (papo_model.json + model/) and load them.

    A model directory is what convert_hf_to_mcore.py writes (and what training exports). Returns
    (chunks, metadata dict, ModelConfig, VisionConfig). precision overrides the stored one
    (parity is judged in fp32 whatever the stored dtype). Collective over all ranks.
    """
    from papo_mega.convert.hf_to_mcore import read_metadata
    from papo_mega.models.qwen_vl import build_model_chunks

    meta, model, vision = read_metadata(ckpt_dir)
    if precision is not None:
        model.precision = precision
    chunks = build_model_chunks(model, vision, groups, initialise=False)
    load_model(chunks, Path(ckpt_dir) / "model")
    return chunks, meta, model, vision


def save_model_dir(chunks, out_dir: str | Path, model, vision, groups) -> Path:
    """Write a model directory (papo_model.json + model/) that eval, export and training load.

    The metadata carries the transformers config of the same architecture, so
    convert_mcore_to_hf.py can export it. Collective; rank 0 writes the metadata.
    """
    import torch.distributed as dist

    from papo_mega.convert.hf_config import hf_config_kwargs
    from papo_mega.convert.hf_to_mcore import write_metadata

    out = Path(out_dir)
    if dist.get_rank() == 0 and (out / "model").exists():
        import shutil

        shutil.rmtree(out / "model")  # a re-run replaces its model directory (e.g. RUN_DIR/final)
    dist.barrier()
    save_model(chunks, out / "model")
    if dist.get_rank() == 0:
        from transformers import Qwen2_5_VLConfig
        from transformers.utils import logging as hf_logging

        # A tiny vocabulary makes transformers warn that Qwen's default bos/eos ids lie outside
        # it; they are unused by export and eval, so keep the run's output clean.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            hf_config = Qwen2_5_VLConfig(**hf_config_kwargs(model, vision)).to_dict()
        finally:
            hf_logging.set_verbosity(verbosity)
        dtype = {"fp32": "float32", "bf16": "bfloat16", "fp8": "bfloat16"}[model.precision]
        write_metadata(out, hf_config, model, vision, dtype)
    dist.barrier()
    return out
