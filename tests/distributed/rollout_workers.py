"""Workers for the rollout tests: our KV-cached engine at a layout, transformers' generate."""

from __future__ import annotations

import torch
import torch.distributed as dist

from papo_mega.config import RolloutConfig
from papo_mega.convert.parity import build_probe_inputs
from papo_mega.types import RolloutPrompt

PAD_ID = 0


def probe_prompts(model, vision, seed: int = 0) -> list[RolloutPrompt]:
    """Two prompts of different lengths, each with its own image (different grids)."""
    probe = build_probe_inputs(model, vision, seed=seed)
    patches = probe.image_grid_thw.prod(dim=1).tolist()
    prompts = []
    for row in range(2):
        length = int(probe.attention_mask[row].sum())
        start = sum(patches[:row])
        prompts.append(RolloutPrompt(probe.input_ids[row, :length].clone(),
                                     probe.pixel_values[start : start + patches[row]],
                                     probe.image_grid_thw[row : row + 1]))
    return prompts


def _engine_at_layout(ckpt_dir: str, layout: dict, stop_ids: list[int]):
    """The converted checkpoint at `layout` in eval mode (fp32) and our engine on it."""
    from papo_mega.distributed import init_distributed
    from papo_mega.model_dir import load_model_dir
    from papo_mega.rollout.engine import MegatronEngine

    groups = init_distributed(layout, seed=99)
    chunks, _, model, vision = load_model_dir(ckpt_dir, groups, precision="fp32")
    for chunk in chunks:
        chunk.eval()
    engine = MegatronEngine(chunks, groups, model, vision.spatial_merge_size, stop_ids, PAD_ID)
    return groups, chunks, model, vision, engine


def generate_at_layout(ckpt_dir: str, layout: dict, rollout: dict, seed: int, stop_ids: list[int],
                       recompute: bool = False):
    """Our engine's rollout on the probe prompts; optionally the training forward's log-probs of it."""
    from papo_mega.algo.policy import compute_logprobs
    from papo_mega.rollout.assemble import assemble_policy_rows

    groups, chunks, model, vision, engine = _engine_at_layout(ckpt_dir, layout, stop_ids)
    prompts = probe_prompts(model, vision)
    params = RolloutConfig(**rollout)
    out = engine.generate(prompts, params, seed=seed, step=3)
    result = {"tokens": out.response_ids, "lengths": out.lengths, "finish": out.finish_reason,
              "logprobs": out.logprobs, "prompt_index": out.prompt_index}
    if recompute:
        rows = assemble_policy_rows(prompts, out, torch.zeros(len(out.lengths)), model,
                                    vision.spatial_merge_size, PAD_ID)
        logp = compute_logprobs(chunks, groups, [rows.to(groups.device)], params.temperature or 1.0,
                                views=("original",))[0]["original"].cpu()
        # Back to response coordinates: response token k of row r sits at column prompt_len - 1 + k.
        aligned = torch.zeros_like(out.logprobs)
        for r in range(len(out.lengths)):
            start = len(prompts[int(out.prompt_index[r])].input_ids) - 1
            n = int(out.lengths[r])
            aligned[r, :n] = logp[r, start : start + n]
        result["recomputed"] = aligned
    return result if dist.get_rank() == 0 else None


def hf_greedy(hf_dir: str, prompts: list[RolloutPrompt], model_cfg, max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy generate, one prompt at a time (no padding involved), with the vision
    special tokens banned as our engine bans them."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    banned = [model_cfg.image_token_id, model_cfg.video_token_id, model_cfg.vision_start_token_id,
              model_cfg.vision_end_token_id]
    out = []
    for prompt in prompts:
        ids = prompt.input_ids[None]
        with torch.no_grad():
            generated = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=prompt.pixel_values,
                image_grid_thw=prompt.image_grid_thw, mm_token_type_ids=(ids == model_cfg.image_token_id).int(),
                max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=PAD_ID,
                bad_words_ids=[[t] for t in banned])
        out.append(generated[0, ids.shape[1] :].tolist())
    return out


def count_fp8_weight_refreshes(ckpt_dir: str, layout: dict, rollout: dict) -> list[int]:
    """How often the engine asks Transformer Engine to re-cast weights (set_is_first_microbatch,
    what megatron's TE layers key their fp8 weight cache on) during one generate call, per chunk
    of this rank: the prefill of each prompt chunk should, decode steps should not."""
    groups, chunks, model, vision, engine = _engine_at_layout(ckpt_dir, layout, [])
    calls = []
    for chunk in chunks:
        chunk.set_is_first_microbatch = lambda: calls.append(1)  # CPU has no TE: count instead of cast
    engine.generate(probe_prompts(model, vision), RolloutConfig(**rollout), seed=0, step=0)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, len(calls))
    return gathered if dist.get_rank() == 0 else None
