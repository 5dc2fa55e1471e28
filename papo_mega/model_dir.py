"""Model directories: a model's weights in megatron-core's distributed format plus its metadata.

    RUN_DIR/final/  papo_model.json (architecture, the transformers config of the same model, dtype,
                                     the data / rollout / reward settings it was trained with)
                    model/          (metadata.json, *.distcp, common.pt)
                    tokenizer/      (tokenizer.json and its companion files, or a sentencepiece *.model)

What convert_hf_to_mcore.py writes, SFT and RL training export, and eval, export and training
load (`algo.init_from`). A model directory is self-describing: `config_from_model` fills every
setting the user did not set explicitly from the stored ones and points data.tokenizer at the
stored tokenizer (precedence: explicit > stored > defaults). A training checkpoint
(RUN_DIR/checkpoints/step_N) loads the same way, its settings read from its config.yaml.

Every rank writes only its shards, keyed by global names with global offsets, so weights written
at TP2xPP2 load at TP1, PP2 or any other layout, and with either layer spec: Transformer Engine's
modules add `_extra_state` entries (fp8 metadata) that a checkpoint written with the local spec
lacks, and a TE-written checkpoint carries entries the local spec does not ask for.
`load_sharded` and `load_chunk_states` tolerate exactly those and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from papo_mega.config import ModelConfig, VisionConfig
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
                 fix: str = "check the model config and the checkpoint path", refuse_unused: bool = False) -> dict:
    """megatron's dist_checkpointing.load, with extra state absent from the checkpoint left out.

    megatron's StrictHandling.RETURN_UNEXPECTED reads the checkpoint's metadata, drops the requested
    entries it lacks ("unexpected" in megatron's terms) and returns their keys; entries the
    checkpoint holds but nobody asks for are ignored, as by default. Only extra state may be
    absent: a missing weight is an error, as it was before (then raised inside torch's DCP).
    refuse_unused (model loads): stored weights no rank asks for are an error too (megatron's
    RETURN_ALL gathers every rank's requests), since a model with fewer layers than its weights
    would otherwise load silently; optimizer entries of a training checkpoint are not weights.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    strict = StrictHandling.RETURN_ALL if refuse_unused else StrictHandling.RETURN_UNEXPECTED
    loaded, unused, unexpected = dist_checkpointing.load(sharded, str(directory), strict=strict)
    absent = sorted(key for key in unexpected if not is_extra_state(key))
    if absent:
        raise PapoError(f"{directory} lacks {len(absent)} tensors this model needs ({', '.join(absent[:3])}); "
                        f"it was written for a different model: {fix}")
    unused = sorted(key for key in unused if not is_extra_state(key) and not key.startswith("optimizer."))
    if unused:
        raise PapoError(f"{directory} holds {len(unused)} tensors this model does not have ({', '.join(unused[:3])}); "
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


def load_model(chunks, directory: str | Path, fix: str = "check the model config and the checkpoint path") -> None:
    """Load a model checkpoint written at any layout into this layout's chunks (collective).

    Any disagreement between the chunks and the stored weights (names, counts, shapes) is one
    PapoError line ending in `fix`, not megatron's traceback."""
    directory = Path(directory)
    if not (directory / "metadata.json").is_file():
        raise PapoError(f"{directory} is not a megatron distributed checkpoint (no metadata.json); check the path")
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    try:
        states = load_sharded(model_sharded_state_dict(chunks), directory, fix, refuse_unused=True)
    except PapoError:
        raise
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - shape mismatches are reported many ways
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__).strip()
        raise PapoError(f"could not load the weights in {directory} ({type(err).__name__}: {first[:300]}); "
                        f"{fix}") from None
    load_chunk_states(chunks, states)


# -- what a model directory or training checkpoint says about itself -------------------------------

STORED_SETTINGS = {
    "data": ("min_pixels", "max_pixels", "mask_ratio", "mask_cell", "mask_mode", "max_prompt_len"),
    "rollout": ("temperature", "top_p", "top_k", "max_new_tokens", "stop"),
    "reward": ("accuracy_weight", "format_weight", "verify_timeout_s"),
}
"""The settings a model directory carries: how its images and prompts were prepared, how it
answers and how answers are scored. Layout, batch sizes and the algorithm stay the recipe's."""
RUNTIME_MODEL_KEYS = ("max_seq_len", "precision", "recompute", "fp8_recipe", "fp8_format", "fp8_bf16_layers_start",
                      "fp8_bf16_layers_end", "init_std")
"""model.* keys that change how the stored weights run, not their shapes: an explicit value wins."""
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_MARKER = "checkpoint.json"  # as in checkpoint.py (which imports this module)


@dataclass
class ModelSource:
    """A model to load: a model directory or a training checkpoint, and what it stores."""

    path: Path
    weights: Path
    """The megatron distributed checkpoint holding the model's tensors."""
    model: ModelConfig
    vision: VisionConfig
    hf_config: dict
    hf_dtype: str
    settings: dict = field(default_factory=dict)
    """{section: {key: value}} of STORED_SETTINGS (empty for converted and older model directories)."""
    tokenizer: str = ""
    """data.tokenizer for this model: a stored file, the checkpoint's config value, or '' (none stored)."""

    @property
    def meta(self) -> dict:
        return {"hf_config": self.hf_config, "hf_dtype": self.hf_dtype}


def _model_dir_source(path: Path) -> ModelSource:
    from papo_mega.convert.hf_to_mcore import read_metadata

    meta, model, vision = read_metadata(path)
    tokenizer = str(path / meta["tokenizer"]) if meta.get("tokenizer") else ""
    return ModelSource(path, path / "model", model, vision, meta["hf_config"], meta["hf_dtype"],
                       meta.get("settings") or {}, tokenizer)


def _checkpoint_source(path: Path) -> ModelSource:
    """A training checkpoint: its weights sit beside the optimizer's, its settings in config.yaml."""
    import yaml

    from papo_mega.convert.hf_config import hf_config_dict, precision_dtype

    try:
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
        model, vision = ModelConfig(**config["model"]), VisionConfig(**config["vision"])
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as err:
        raise PapoError(f"{path / 'config.yaml'} cannot be read as a papo_mega config ({type(err).__name__}: "
                        f"{str(err)[:200]}); evaluate or export another checkpoint") from None
    settings = {section: {k: config.get(section, {})[k] for k in keys if k in config.get(section, {})}
                for section, keys in STORED_SETTINGS.items()}
    tokenizer = str((config.get("data") or {}).get("tokenizer") or "")
    return ModelSource(path, path, model, vision, hf_config_dict(model, vision), precision_dtype(model.precision),
                       settings, tokenizer)


def read_model_source(path: str | Path) -> ModelSource:
    """What `papo-mega eval --ckpt`, export and `algo.init_from` accept: a model directory
    (papo_model.json + model/) or a published training checkpoint (RUN_DIR/checkpoints/step_N)."""
    from papo_mega.convert.hf_to_mcore import META

    path = Path(path)
    if (path / META).is_file():
        return _model_dir_source(path)
    if (path / CHECKPOINT_MARKER).is_file() and (path / "config.yaml").is_file():
        return _checkpoint_source(path)
    if (path / "final" / META).is_file() or (path / "checkpoints").is_dir():
        hint = f"it is a run directory; pass {path / 'final'} or one of {path / 'checkpoints'}/step_*"
    else:
        hint = "it does not exist" if not path.exists() else f"it has neither {META} nor {CHECKPOINT_MARKER}"
    raise PapoError(f"{path} is not a model directory (training's final/, papo-mega sft output or "
                    f"tools/convert_hf_to_mcore.py output) nor a training checkpoint (RUN_DIR/checkpoints/step_N): "
                    f"{hint}")


def _architecture(cfg, source: ModelSource, explicit: frozenset) -> tuple[ModelConfig, VisionConfig, list[str]]:
    """The stored architecture with the explicit runtime-only model keys applied; an explicit shape
    key that differs from the stored one is refused (it cannot apply to these weights)."""
    for section, stored in (("model", source.model), ("vision", source.vision)):
        for f in fields(stored):
            key, value = f"{section}.{f.name}", getattr(getattr(cfg, section), f.name)
            if key in explicit and f.name not in RUNTIME_MODEL_KEYS and value != getattr(stored, f.name):
                raise PapoError(f"{key}={value!r} differs from {getattr(stored, f.name)!r} stored in {source.path}, "
                                f"whose weights have that shape; drop {key} from the recipe or overrides")
    runtime = {k: getattr(cfg.model, k) for k in RUNTIME_MODEL_KEYS if f"model.{k}" in explicit}
    kept = [f"model.{k}={v!r}" for k, v in runtime.items() if v != getattr(source.model, k)]
    return replace(source.model, **runtime), source.vision, kept


def config_from_model(cfg, source: ModelSource):
    """(cfg with the model's architecture and stored settings, one line saying what came from where).

    Precedence: an explicit key (the recipe or an override, config.explicit_keys) > the stored
    value > the default. data.tokenizer='' takes the model's stored tokenizer."""
    from papo_mega.config import explicit_keys, set_explicit_keys

    explicit = explicit_keys(cfg)
    model, vision, kept = _architecture(cfg, source, explicit)
    sections, filled = {}, []
    for section, keys in STORED_SETTINGS.items():
        current, changes = getattr(cfg, section), {}
        for key, value in (source.settings.get(section) or {}).items():
            if key not in keys or getattr(current, key) == value:
                continue  # keys of another version are ignored; equal values need no word
            if f"{section}.{key}" in explicit:
                kept.append(f"{section}.{key}={getattr(current, key)!r} (stored {value!r})")
            else:
                changes[key] = value
                filled.append(f"{section}.{key}={value!r}")
        sections[section] = replace(current, **changes)
    if source.tokenizer and not cfg.data.tokenizer:
        sections["data"] = replace(sections["data"], tokenizer=source.tokenizer)
        filled.append(f"data.tokenizer={source.tokenizer}")
    elif source.tokenizer and cfg.data.tokenizer != source.tokenizer:
        kept.append(f"data.tokenizer={cfg.data.tokenizer} (stored {source.tokenizer})")
    out = set_explicit_keys(replace(cfg, model=model, vision=vision, **sections), explicit)
    note = (f"[papo-mega] {source.path}: architecture and {', '.join(filled) or 'no other setting'} from the model; "
            f"explicit values kept: {', '.join(kept) or 'none'}")
    return out, note


def load_model_dir(ckpt_dir: str | Path, groups, precision: str | None = None, model: ModelConfig | None = None,
                   vision: VisionConfig | None = None):
    """Build this rank's chunks for a model directory or training checkpoint and load them.

    Returns (chunks, metadata dict, ModelConfig, VisionConfig). model/vision (config_from_model's,
    with runtime keys applied) replace the stored ones; precision overrides the stored one (parity
    is judged in fp32 whatever the stored dtype). Collective over all ranks.
    """
    from papo_mega.models.qwen_vl import build_model_chunks

    source = read_model_source(ckpt_dir)
    model, vision = model or source.model, vision or source.vision
    if precision is not None:
        model = replace(model, precision=precision)
    chunks = build_model_chunks(model, vision, groups, initialise=False)
    fix = (f"{source.path} stores weights that disagree with its own description (papo_model.json / config.yaml); "
           f"re-export or re-convert the model")
    load_model(chunks, source.weights, fix)
    return chunks, source.meta, model, vision


def init_from_model(cfg, path: str | Path, groups):
    """Start from a model: (cfg filled by config_from_model, this rank's loaded chunks); rank 0
    prints which settings came from the model and which explicit values won. Collective."""
    cfg, note = config_from_model(cfg, read_model_source(path))
    if groups.rank == 0:
        print(note, flush=True)
    return cfg, load_model_dir(path, groups, model=cfg.model, vision=cfg.vision)[0]


# -- writing ---------------------------------------------------------------------------------------


def _settings_of(cfg) -> dict:
    return {section: {k: getattr(getattr(cfg, section), k) for k in keys} for section, keys in STORED_SETTINGS.items()}


def _prepare_target(out: Path) -> None:
    """Refuse to replace a directory that is not a model directory (every rank checks: no collective
    may wait for a rank that raised)."""
    from papo_mega.convert.hf_to_mcore import META

    if out.exists() and not (out / META).is_file() and any(out.iterdir()):
        raise PapoError(f"{out} exists and is not a model directory, so it is not replaced; write the model "
                        f"elsewhere (sft.out / run.run_dir) or empty it")


def _publish(tmp: Path, out: Path) -> None:
    """Rename the complete tmp into place; an older model directory is moved aside, then deleted."""
    import shutil

    old = out.with_name(f"{out.name}.old-save")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def save_model_dir(chunks, out_dir: str | Path, model, vision, groups, cfg=None) -> Path:
    """Write a model directory (papo_model.json + model/ [+ tokenizer/]) that eval, export and
    training load, published atomically: written under OUT.tmp-save and renamed into place when
    complete, so an interrupted save leaves the previous model directory whole.

    The metadata carries the transformers config of the same architecture, so
    convert_mcore_to_hf.py can export it; with cfg (the run's config) also its STORED_SETTINGS and
    its tokenizer as files, so the directory is self-describing. Collective; rank 0 writes the metadata.
    """
    import shutil

    import torch.distributed as dist

    from papo_mega.convert.hf_config import hf_config_dict, precision_dtype
    from papo_mega.convert.hf_to_mcore import write_metadata
    from papo_mega.data.tokenizer import store_tokenizer

    out = Path(out_dir)
    tmp = out.with_name(f"{out.name}.tmp-save")
    _prepare_target(out)
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # the leftover of an interrupted save
        tmp.mkdir(parents=True)
    dist.barrier()
    save_model(chunks, tmp / "model")
    error: list = [None]
    if dist.get_rank() == 0:
        try:
            settings = tokenizer = None
            if cfg is not None:
                settings = _settings_of(cfg)
                tokenizer = store_tokenizer(cfg.data.tokenizer, model, tmp / TOKENIZER_DIR)
            write_metadata(tmp, hf_config_dict(model, vision), model, vision, precision_dtype(model.precision),
                           settings=settings, tokenizer=tokenizer and f"{TOKENIZER_DIR}/{tokenizer}")
            _publish(tmp, out)
        except (OSError, PapoError) as err:  # every rank must learn it, not wait for rank 0
            error[0] = f"could not write the model directory {out}: {err}"
    dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise PapoError(error[0])
    return out
