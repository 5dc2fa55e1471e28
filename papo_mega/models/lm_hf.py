"""Language-model tensors: Hugging Face Qwen2.5-VL names <-> our single-process (TP1) names.

Pure functions over full tensors. The only non-trivial layouts:
* megatron's `linear_qkv` stacks, per query group g: [q rows of g's heads; k_g; v_g]
  (HF keeps q_proj, k_proj, v_proj apart);
* `linear_fc1` is [gate; up] (HF: gate_proj, up_proj);
* embedding and output rows are padded to `padded_vocab_size` with zeros.
"""

from __future__ import annotations

import torch

from papo_mega.config import ModelConfig

_PER_LAYER = {  # ours (under lm.decoder.layers.{i}.) <- HF (under model.layers.{i}.)
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}


def _head_dim(cfg: ModelConfig) -> int:
    return cfg.hidden_size // cfg.num_attention_heads


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """HF q/k/v (weights [rows, H] or biases [rows]) -> megatron's per-group [q_g; k_g; v_g] rows."""
    groups, d = cfg.num_query_groups, _head_dim(cfg)
    per_group = cfg.num_attention_heads // groups
    tail = q.shape[1:]
    q = q.reshape(groups, per_group * d, *tail)
    k = k.reshape(groups, d, *tail)
    v = v.reshape(groups, d, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `interleave_qkv`."""
    groups, d = cfg.num_query_groups, _head_dim(cfg)
    per_group = cfg.num_attention_heads // groups
    tail = qkv.shape[1:]
    grouped = qkv.reshape(groups, (per_group + 2) * d, *tail)
    q, k, v = grouped.split([per_group * d, d, d], dim=1)
    return q.reshape(-1, *tail).clone(), k.reshape(-1, *tail).clone(), v.reshape(-1, *tail).clone()


def _pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    if weight.shape[0] == rows:
        return weight
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], *weight.shape[1:])])


def lm_globals_hf_to_mcore(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Embedding, final norm and (untied) output layer."""
    out = {"lm.embedding.word_embeddings.weight": _pad_rows(hf["model.embed_tokens.weight"], cfg.padded_vocab_size),
           "lm.decoder.final_layernorm.weight": hf["model.norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm.output_layer.weight"] = _pad_rows(hf["lm_head.weight"], cfg.padded_vocab_size)
    return out


def lm_layer_hf_to_mcore(hf: dict[str, torch.Tensor], i: int, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """One decoder layer's tensors (hf holds at least the model.layers.{i}. entries)."""
    src, dst = f"model.layers.{i}.", f"lm.decoder.layers.{i}."
    out = {dst + ours: hf[src + theirs] for ours, theirs in _PER_LAYER.items()}
    for kind in ("weight", "bias"):
        q, k, v = (hf[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv")
        out[f"{dst}self_attention.linear_qkv.{kind}"] = interleave_qkv(q, k, v, cfg)
    out[dst + "mlp.linear_fc1.weight"] = torch.cat([hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]])
    return out


def lm_hf_to_mcore(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF language-model tensors (hub names) -> ours (names inside QwenVLChunk, TP1/PP1)."""
    out = lm_globals_hf_to_mcore(hf, cfg)
    for i in range(cfg.num_layers):
        out.update(lm_layer_hf_to_mcore(hf, i, cfg))
    return out


def lm_mcore_to_hf(ours: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of `lm_hf_to_mcore` (padding rows dropped)."""
    vocab = cfg.vocab_size
    out = {"model.embed_tokens.weight": ours["lm.embedding.word_embeddings.weight"][:vocab].clone(),
           "model.norm.weight": ours["lm.decoder.final_layernorm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = ours["lm.output_layer.weight"][:vocab].clone()
    for i in range(cfg.num_layers):
        src, dst = f"lm.decoder.layers.{i}.", f"model.layers.{i}."
        for theirs_from, theirs in _PER_LAYER.items():
            out[dst + theirs] = ours[src + theirs_from]
        for kind in ("weight", "bias"):
            q, k, v = split_qkv(ours[f"{src}self_attention.linear_qkv.{kind}"], cfg)
            for name, tensor in zip("qkv", (q, k, v)):
                out[f"{dst}self_attn.{name}_proj.{kind}"] = tensor
        gate, up = ours[src + "mlp.linear_fc1.weight"].chunk(2)
        out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = gate.clone(), up.clone()
    return out
