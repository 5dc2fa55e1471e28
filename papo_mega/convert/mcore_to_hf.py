"""megatron-core checkpoint -> Hugging Face Qwen2.5-VL (safetensors + config.json + tokenizer files).

Loads the checkpoint at TP1/PP1 in one process (the full model in host memory), maps names and
layouts back, restores the original dtype and writes under a temporary name, renamed at the end.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from papo_mega.convert.hf_to_mcore import TORCH_DTYPES
from papo_mega.convert.safetensors_io import write_safetensors
from papo_mega.errors import PapoError
from papo_mega.models.lm_hf import lm_mcore_to_hf
from papo_mega.models.te_names import to_local_name


def full_state_to_hf(ours: dict[str, torch.Tensor], model, vision, dtype: str) -> dict[str, torch.Tensor]:
    """Our full single-process tensors (either layer spec's names) -> HF hub-named tensors in the original dtype."""
    from papo_mega.models.vision_hf import vision_mcore_to_hf

    ours = {to_local_name(k): v for k, v in ours.items()}
    tower = {k[len("vision."):]: v for k, v in ours.items() if k.startswith("vision.")}
    hf = lm_mcore_to_hf(ours, model)
    hf.update(vision_mcore_to_hf(tower, vision))
    target = TORCH_DTYPES[dtype]
    return {k: v.detach().to(target).contiguous() for k, v in hf.items()}


def export_rank(ckpt_dir: str, out_dir: str) -> dict:
    """Single-process export (run inside a world of one) of a model directory or training checkpoint;
    the HF folder gets the model's tokenizer and preprocessor files beside its weights."""
    from papo_mega.data.tokenizer import store_tokenizer
    from papo_mega.distributed import init_distributed
    from papo_mega.distributed.sharding import named_local_params
    from papo_mega.model_dir import load_model_dir, read_model_source

    groups = init_distributed({})
    source = read_model_source(ckpt_dir)
    chunks, meta, model, vision = load_model_dir(ckpt_dir, groups)
    ours = {name: param.detach() for chunk in chunks for name, param in named_local_params(chunk)}
    hf = full_state_to_hf(ours, model, vision, meta["hf_dtype"])
    out, tmp = Path(out_dir), Path(f"{out_dir}.tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_safetensors(hf, tmp)
    (tmp / "config.json").write_text(json.dumps(meta["hf_config"], indent=2))
    tokenizer = store_tokenizer(source.tokenizer, model, tmp)
    tmp.rename(out)
    return {"tensors": len(hf), "tokenizer": tokenizer}


def check_output_dir(out: str | Path) -> None:
    if Path(out).exists():
        raise PapoError(f"output directory {out} already exists; choose a new --out or delete it first")
