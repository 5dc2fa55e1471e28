"""Hugging Face Qwen2.5-VL -> megatron-core distributed checkpoint, one rank's share at a time.

Every rank of a tp*pp job builds its chunks of the model, then fills them unit by unit (the
global tensors, one decoder layer, the vision tower): it reads only the HF tensors of units it
holds, maps them to full single-process tensors, keeps its shard and drops the rest. Parameters
are matched by their local-spec names (`named_local_params`), so a model built with Transformer
Engine's spec (fused norms named `linear_qkv.layer_norm_weight`) fills the same way. Peak memory
is this rank's shard plus one unit's full tensors. The checkpoint is written under a temporary
name and renamed when complete.

Checkpoint directory:  <out>/model/ (megatron dist checkpoint)  <out>/papo_model.json
                       <out>/tokenizer/ (the HF folder's tokenizer and preprocessor files)
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from papo_mega.config import ModelConfig, VisionConfig
from papo_mega.convert.hf_config import configs_from_hf, read_hf_config
from papo_mega.convert.safetensors_io import SafetensorsReader
from papo_mega.distributed.sharding import named_local_params, take_local_shard
from papo_mega.errors import PapoError
from papo_mega.metrics import peak_rss_bytes, rss_bytes
from papo_mega.models.lm_hf import lm_globals_hf_to_mcore, lm_layer_hf_to_mcore

META = "papo_model.json"
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_LM_LAYER = re.compile(r"^lm\.decoder\.layers\.(\d+)\.")


def unit_of(name: str) -> str:
    """Which conversion unit a parameter belongs to: 'vision', 'layer.<i>' or 'globals'."""
    if name.startswith("vision."):
        return "vision"
    match = _LM_LAYER.match(name)
    return f"layer.{match.group(1)}" if match else "globals"


def map_unit(unit: str, reader: SafetensorsReader, model: ModelConfig, vision: VisionConfig,
             wanted: set[str] | None = None) -> dict:
    """Full single-process tensors (our names) of one unit, read from the HF checkpoint.

    For the global unit only the tensors behind `wanted` are read (the first stage needs the
    embedding, the last stage the final norm and output layer).
    """
    if unit == "vision":
        from papo_mega.models.vision_hf import vision_hf_to_mcore

        return {f"vision.{k}": v for k, v in vision_hf_to_mcore(reader.get_many("visual."), vision).items()}
    if unit.startswith("layer."):
        i = int(unit.split(".")[1])
        return lm_layer_hf_to_mcore(reader.get_many(f"model.layers.{i}."), i, model)
    sources = {"lm.embedding.word_embeddings.weight": "model.embed_tokens.weight",
               "lm.decoder.final_layernorm.weight": "model.norm.weight", "lm.output_layer.weight": "lm_head.weight"}
    needed = [theirs for ours, theirs in sources.items() if wanted is None or ours in wanted]
    if model.tie_embeddings:
        needed = [n for n in needed if n != "lm_head.weight"]
    # Absent entries map to tensors this rank does not hold: stand in empty ones, then drop them.
    hf = {n: reader.get(n) if n in needed else torch.empty(0, 0) for n in sources.values()}
    mapped = lm_globals_hf_to_mcore(hf, model)
    return {k: v for k, v in mapped.items() if sources[k] in needed}


@torch.no_grad()
def fill_from_hf(chunks, groups, reader: SafetensorsReader, model: ModelConfig, vision: VisionConfig,
                 dtype: torch.dtype, show_progress: bool) -> None:
    """Copy this rank's shards of the HF weights (all of `dtype`) into its chunks, one unit at a time."""
    params_by_unit: dict[str, list] = {}
    for chunk in chunks:
        for name, param in named_local_params(chunk):
            params_by_unit.setdefault(unit_of(name), []).append((name, param))
    for unit in tqdm(sorted(params_by_unit), desc="convert", disable=not show_progress):
        full = map_unit(unit, reader, model, vision, wanted={name for name, _ in params_by_unit[unit]})
        for name, param in params_by_unit[unit]:
            if name not in full:
                raise PapoError(f"no HF tensor maps to {name}; the checkpoint does not match its config.json")
            if full[name].dtype != dtype:
                raise PapoError(f"{name} is stored as {full[name].dtype} but config.json says {dtype}; "
                                f"fix the config's dtype or re-save the checkpoint in one dtype")
            shard = take_local_shard(full[name], name, param, groups)
            if shard.shape != param.shape:
                raise PapoError(f"{name}: HF gives shape {tuple(shard.shape)}, model expects {tuple(param.shape)}")
            param.copy_(shard.to(param.dtype))
        del full


def write_metadata(out: Path, hf_config: dict, model: ModelConfig, vision: VisionConfig, dtype: str,
                   settings: dict | None = None, tokenizer: str | None = None) -> None:
    """papo_model.json; settings (model_dir.STORED_SETTINGS) and tokenizer (a file relative to out)
    make the directory self-describing."""
    from dataclasses import asdict

    meta = {"format": "papo_mega/1", "hf_config": hf_config, "hf_dtype": dtype,
            "model": asdict(model), "vision": asdict(vision)}
    if settings:
        meta["settings"] = settings
    if tokenizer:
        meta["tokenizer"] = tokenizer
    (out / META).write_text(json.dumps(meta, indent=2))


def read_metadata(ckpt: str | Path) -> tuple[dict, ModelConfig, VisionConfig]:
    path = Path(ckpt) / META
    if not path.is_file():
        raise PapoError(f"{path} not found; --ckpt must be a model directory (training's final/, papo-mega sft "
                        f"output or tools/convert_hf_to_mcore.py output) or a RUN_DIR/checkpoints/step_N")
    try:
        meta = json.loads(path.read_text())
        return meta, ModelConfig(**meta["model"]), VisionConfig(**meta["vision"])
    except (ValueError, KeyError, TypeError) as err:  # ConfigError is a ValueError too: one line either way
        raise PapoError(f"{path} is damaged or from another version ({type(err).__name__}: {str(err)[:200]}); "
                        f"re-convert or re-export the model") from None


def convert_rank(hf_dir: str, out_dir: str, layout_sizes: dict) -> dict:
    """Run on every rank of the conversion job; returns this rank's peak RSS (bytes)."""

    from papo_mega.data.tokenizer import HF_TOKENIZER, copy_hf_tokenizer_files
    from papo_mega.distributed import init_distributed
    from papo_mega.model_dir import TOKENIZER_DIR, save_model
    from papo_mega.models.qwen_vl import build_model_chunks

    hf_config = read_hf_config(hf_dir)
    model, vision, dtype = configs_from_hf(hf_config)
    reader = SafetensorsReader(hf_dir)
    groups = init_distributed(layout_sizes)
    baseline = rss_bytes()  # interpreter, torch and megatron, before any weight
    chunks = build_model_chunks(model, vision, groups, initialise=False)
    fill_from_hf(chunks, groups, reader, model, vision, TORCH_DTYPES[dtype], show_progress=groups.rank == 0)
    out, tmp = Path(out_dir), Path(f"{out_dir}.tmp-convert")
    if groups.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    save_model(chunks, tmp / "model")
    dist.barrier()
    if groups.rank == 0:
        # The tokenizer and preprocessor files travel with the model: eval and training find them.
        copied = copy_hf_tokenizer_files(hf_dir, tmp / TOKENIZER_DIR)
        tokenizer = f"{TOKENIZER_DIR}/{HF_TOKENIZER}" if HF_TOKENIZER in copied else None
        write_metadata(tmp, hf_config, model, vision, dtype, tokenizer=tokenizer)
        tmp.rename(out)  # published only when complete
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, (peak_rss_bytes(), peak_rss_bytes() - baseline))
    return {"peak_rss": max(p[0] for p in peaks), "peak_rss_growth": max(p[1] for p in peaks),
            "hf_bytes": reader.total_bytes(), "layout": groups.layout.describe(),
            "tokenizer_files": sorted(p.name for p in (out / TOKENIZER_DIR).glob("*"))}
