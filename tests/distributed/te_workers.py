"""Workers for test_te_spec_checkpoint.py: models with Transformer Engine's parameter names on CPU.

`build_chunks(..., te=True)` builds the local spec and turns it into TE's names and extra state with
papo_mega.models.te_names.apply_te_naming (before DDP wrapping, as the TE spec would build it).
Every worker returns plain tensors on global rank 0.
"""

from __future__ import annotations

import torch.distributed as dist

from papo_mega.config import ModelConfig, TrainConfig
from papo_mega.distributed import init_distributed
from papo_mega.distributed.sharding import gather_full_tensors
from papo_mega.model_dir import unwrap
from papo_mega.models.qwen_vl import build_model_chunks
from papo_mega.models.te_names import apply_te_naming
from tests.distributed.workers import TINY_MODEL, TINY_TRAIN, _probe_logits


def build_chunks(model: ModelConfig, vision, groups, te: bool, seed: int = 1234, initialise: bool = True) -> list:
    chunks = build_model_chunks(model, vision, groups, seed=seed, initialise=initialise)
    if te:
        for chunk in chunks:
            apply_te_naming(chunk)
    return chunks


def _module_names(chunks) -> list[str]:
    return [name for chunk in chunks for name, _ in unwrap(chunk).named_parameters()]


def init_both_specs(layout: dict):
    """Local spec and TE names, both given the layout-invariant init of seed 11 (the TE model was
    built from another seed, so only the re-init can make them agree): full weights and logits."""
    from papo_mega.models.init import apply_layout_invariant_init

    groups = init_distributed(layout, seed=1234)
    model = ModelConfig(**TINY_MODEL)
    local = build_chunks(model, None, groups, te=False, seed=11)
    te = build_chunks(model, None, groups, te=True, seed=99)
    apply_layout_invariant_init(te, groups, 11, model.init_std, model.num_layers)
    out = {"local": gather_full_tensors(local, groups), "te": gather_full_tensors(te, groups),
           "te_module_names": _module_names(te),
           "te_norms": {n: p.detach().clone() for c in te for n, p in unwrap(c).named_parameters()
                        if n.endswith("layer_norm_weight")},
           "local_logits": _probe_logits(local, groups, model.vocab_size),
           "te_logits": _probe_logits(te, groups, model.vocab_size)}
    return out if dist.get_rank() == 0 else None


def convert_into_te(hf_dir: str, layout: dict, out_dir: str):
    """HF -> a TE-named model at `layout` (fill_from_hf), gathered and mapped back to HF names; the
    TE-named model is also written as a model directory (with its extra state)."""
    from pathlib import Path

    from papo_mega.convert.hf_config import configs_from_hf, read_hf_config
    from papo_mega.convert.hf_to_mcore import TORCH_DTYPES, fill_from_hf, write_metadata
    from papo_mega.convert.mcore_to_hf import full_state_to_hf
    from papo_mega.convert.safetensors_io import SafetensorsReader
    from papo_mega.model_dir import save_model

    hf_config = read_hf_config(hf_dir)
    model, vision, dtype = configs_from_hf(hf_config)
    groups = init_distributed(layout)
    chunks = build_chunks(model, vision, groups, te=True, initialise=False)
    fill_from_hf(chunks, groups, SafetensorsReader(hf_dir), model, vision, TORCH_DTYPES[dtype], show_progress=False)
    full = gather_full_tensors(chunks, groups)
    save_model(chunks, Path(out_dir) / "model")
    if dist.get_rank() != 0:
        return None
    write_metadata(Path(out_dir), hf_config, model, vision, dtype)
    return full_state_to_hf(full, model, vision, dtype)


def load_dir_into(ckpt_dir: str, layout: dict, te: bool):
    """A model directory loaded into a local-spec or TE-named model: HF tensors and extra states."""
    from pathlib import Path

    from papo_mega.convert.hf_to_mcore import read_metadata
    from papo_mega.convert.mcore_to_hf import full_state_to_hf
    from papo_mega.model_dir import load_model

    meta, model, vision = read_metadata(ckpt_dir)
    groups = init_distributed(layout)
    chunks = build_chunks(model, vision, groups, te=te, initialise=False)
    load_model(chunks, Path(ckpt_dir) / "model")
    full = gather_full_tensors(chunks, groups)
    extra = {n: bytes(m.te_extra_state.numpy()) for c in chunks for n, m in unwrap(c).named_modules()
             if hasattr(m, "te_extra_state")}
    if dist.get_rank() != 0:
        return None
    return {"hf": full_state_to_hf(full, model, vision, meta["hf_dtype"]), "extra_state": extra}


def _trainer(layout: dict, te: bool):
    from papo_mega.optim import attach_grad_finalisation, build_optimizer, build_scheduler, wrap_ddp

    groups = init_distributed(layout, seed=1234)
    model = ModelConfig(**TINY_MODEL)
    train = TrainConfig(**TINY_TRAIN)
    chunks = wrap_ddp(build_chunks(model, None, groups, te=te), groups, use_distributed_optimizer=False)
    attach_grad_finalisation(chunks)
    optimizer = build_optimizer(chunks, train, use_distributed_optimizer=False)
    return groups, model, train, chunks, optimizer, build_scheduler(optimizer, train, 4)


def _step(chunks, optimizer, groups, model: ModelConfig, train: TrainConfig, step: int) -> float:
    from papo_mega.lm_step import make_lm_batch, train_step

    batch = make_lm_batch(train.global_batch_size, train.seq_len, model.vocab_size, 3, step)
    return train_step(chunks, optimizer, batch, groups, train.micro_batch_size)["loss"]


def save_training(run_dir: str, layout: dict, te: bool):
    """One training step, a training checkpoint, then a second step (the reference a resume must match)."""
    from papo_mega.checkpoint import save_training_checkpoint
    from papo_mega.config import CheckpointConfig, Config, RunConfig

    groups, model, train, chunks, optimizer, scheduler = _trainer(layout, te)
    _step(chunks, optimizer, groups, model, train, 0)
    scheduler.step(1)
    cfg = Config(model=model, train=train, checkpoint=CheckpointConfig(save_every=1), run=RunConfig(run_dir=run_dir))
    path = save_training_checkpoint(run_dir, 1, chunks, optimizer, scheduler, {"step": 1}, cfg, groups)
    loss = _step(chunks, optimizer, groups, model, train, 1)
    weights = gather_full_tensors(chunks, groups)
    return {"path": str(path), "loss": loss, "weights": weights} if dist.get_rank() == 0 else None


def resume_training(path: str, layout: dict, te: bool):
    """Restore the checkpoint (weights and Adam moments) into a fresh model, take the second step."""
    from papo_mega.checkpoint import load_training_checkpoint

    groups, model, train, chunks, optimizer, scheduler = _trainer(layout, te)
    state = load_training_checkpoint(path, chunks, optimizer, scheduler, groups)
    loss = _step(chunks, optimizer, groups, model, train, state["step"])
    weights = gather_full_tensors(chunks, groups)
    return {"loss": loss, "weights": weights} if dist.get_rank() == 0 else None


def checkpoint_missing_a_weight(directory: str):
    """A checkpoint of tied embeddings loaded into an untied model (its output layer is absent from
    the checkpoint): tolerating absent extra state must not let a missing weight through."""
    from papo_mega.errors import PapoError
    from papo_mega.model_dir import load_model, save_model

    groups = init_distributed({}, seed=1234)
    save_model(build_chunks(ModelConfig(**TINY_MODEL, tie_embeddings=True), None, groups, te=False), directory)
    untied = build_chunks(ModelConfig(**TINY_MODEL, tie_embeddings=False), None, groups, te=True)
    try:
        load_model(untied, directory)
    except PapoError as err:
        return str(err)
    return None
