"""Workers for test_fp8_shapes: the training step, SFT and the rollout on the tiny Qwen2.5-VL with
Transformer Engine's fp8 GEMM rule checked on every decoder GEMM (models/fp8_shapes.py).

The model runs fp32 with the local spec on CPU; `fp8=True` hands the code under test a ModelConfig
with precision=fp8, so it takes the fp8 padding decisions. fp8=False is today's shapes (the control).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from papo_mega.config import LossConfig, RolloutConfig, load_config
from papo_mega.convert.parity import build_probe_inputs
from papo_mega.models.fp8_shapes import check_fp8_gemm_shapes
from papo_mega.types import RolloutBatch, RolloutPrompt

PAD_ID = 0
MODEL_SEED = 11
RESPONSE_LENGTHS = [3, 9, 1, 5, 2, 6]  # with prompts of 17 and 15 tokens: rows of awkward lengths (26 longest)


def _setup(fp8: bool, ddp: bool):
    from papo_mega.distributed import init_distributed
    from papo_mega.models.qwen_vl import build_model_chunks
    from papo_mega.optim import attach_grad_finalisation, wrap_ddp

    cfg = load_config(None, ["preset=tiny"])
    groups = init_distributed({}, seed=1234)
    chunks = build_model_chunks(cfg.model, cfg.vision, groups, seed=MODEL_SEED)
    if ddp:
        chunks = wrap_ddp(chunks, groups, use_distributed_optimizer=False)
        attach_grad_finalisation(chunks)
    padding_model = replace(cfg.model, precision="fp8") if fp8 else cfg.model
    return cfg, groups, chunks, padding_model


def _image_prompts(cfg) -> list[RolloutPrompt]:
    """The two probe prompts (17 and 15 tokens), each with its own image."""
    probe = build_probe_inputs(cfg.model, cfg.vision, seed=0)
    patches = probe.image_grid_thw.prod(dim=1).tolist()
    out = []
    for row in range(2):
        length, start = int(probe.attention_mask[row].sum()), sum(patches[:row])
        out.append(RolloutPrompt(probe.input_ids[row, :length].clone(), probe.pixel_values[start : start + patches[row]],
                                 probe.image_grid_thw[row : row + 1]))
    return out


def _rollout(cfg) -> RolloutBatch:
    gen = torch.Generator().manual_seed(3)
    rows, width = len(RESPONSE_LENGTHS), max(RESPONSE_LENGTHS)
    lengths = torch.tensor(RESPONSE_LENGTHS)
    mask = (torch.arange(width)[None] < lengths[:, None]).float()
    ids = torch.randint(1, 200, (rows, width), generator=gen) * mask.long()
    return RolloutBatch(torch.arange(2).repeat_interleave(3), ids, mask, torch.zeros(rows, width), lengths, ["eos"] * rows)


def _full_grads(chunks, groups) -> dict:
    from papo_mega.distributed.sharding import gather_full_tensors

    return gather_full_tensors(chunks, groups, kind="grad")


def policy_step(fp8: bool) -> dict | None:
    """Micro-batches of 1 from assemble_policy_rows, the no-grad log-prob forward (both views) and
    the PAPO forward/backward, with every decoder GEMM checked."""
    from papo_mega.algo.policy import attach_old_logprobs, papo_forward_backward
    from papo_mega.rollout.assemble import assemble_policy_rows, longest_sequence

    cfg, groups, chunks, model = _setup(fp8, ddp=True)
    prompts, rollout = _image_prompts(cfg), _rollout(cfg)
    masked = [p.pixel_values * 0.5 for p in prompts]
    advantages = torch.linspace(-1, 1, len(RESPONSE_LENGTHS))
    seq_len = longest_sequence(prompts, rollout, model)
    batches = [assemble_policy_rows(prompts, rollout, advantages, model, cfg.vision.spatial_merge_size, PAD_ID, masked,
                                    seq_len, range(r, r + 1)).to(groups.device) for r in range(len(RESPONSE_LENGTHS))]
    loss_cfg = LossConfig(kl_coef=0.0, prcp_coef=0.1, entropy_coef=0.03)
    with check_fp8_gemm_shapes(chunks, model.fp8_recipe) as report:
        batches = attach_old_logprobs(chunks, groups, batches, loss_cfg)
        real = [mb.response_mask.bool() for mb in batches]
        logp = [(mb.old_logp[r], mb.masked_logp[r]) for mb, r in zip(batches, real)]
        for mb in batches:  # move the old policy away so the clipped terms engage
            mb.old_logp = mb.old_logp + 0.2 * torch.sin(torch.arange(mb.old_logp.numel()).view_as(mb.old_logp))
        metrics = papo_forward_backward(chunks, groups, batches, loss_cfg)
    return {"seq_len": seq_len, "violations": report.violations, "calls": report.calls, "metrics": metrics,
            "real_logp": logp, "grads": _full_grads(chunks, groups)}


def sft_step(fp8: bool) -> dict | None:
    """Two SFT examples (prompt + target + eos) at micro-batch 1 through lm_step.forward_backward."""
    from papo_mega.lm_step import forward_backward
    from papo_mega.sft import Example, collate, step_seq_len

    cfg, groups, chunks, model = _setup(fp8, ddp=True)
    examples = []
    for prompt, target in zip(_image_prompts(cfg), ([20, 21, 22, 23], [30, 31, 32, 33, 34, 35, 36])):
        ids = torch.cat([prompt.input_ids, torch.tensor([*target, 1])])
        examples.append(Example(ids, len(prompt.input_ids), prompt.pixel_values, prompt.image_grid_thw))
    seq_len = step_seq_len(examples, model)
    pad_cfg = replace(cfg, model=model)
    microbatches = [collate([ex], seq_len, PAD_ID, pad_cfg).to(groups.device) for ex in examples]
    with check_fp8_gemm_shapes(chunks, model.fp8_recipe) as report:
        loss = forward_backward(chunks, microbatches, groups)
    return {"seq_len": seq_len, "violations": report.violations, "loss": loss, "grads": _full_grads(chunks, groups)}


def rollout_run(fp8: bool, max_batch_rows: int = 0) -> dict | None:
    """Sampled rollouts of two text prompts (5 and 17 tokens), n=3, with a quarter of the vocabulary
    as stop tokens so rows finish at different steps."""
    from papo_mega.rollout.engine import MegatronEngine

    cfg, groups, chunks, model = _setup(fp8, ddp=False)
    for chunk in chunks:
        chunk.eval()
    gen = torch.Generator().manual_seed(5)
    prompts = [RolloutPrompt(torch.randint(64, 250, (n,), generator=gen)) for n in (5, 17)]
    engine = MegatronEngine(chunks, groups, model, cfg.vision.spatial_merge_size, list(range(1, 64)), PAD_ID)
    params = RolloutConfig(n=3, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=12, max_batch_rows=max_batch_rows)
    with check_fp8_gemm_shapes(chunks, model.fp8_recipe) as report:
        out = engine.generate(prompts, params, seed=3, step=1)
    # [S, B] of every linear_qkv call: the prefill, then one per decode step.
    token_shapes = [inp[:2] for name, inp, _ in report.calls if name.endswith("layers.0.self_attention.linear_qkv")]
    result = {"tokens": out.response_ids, "logprobs": out.logprobs, "lengths": out.lengths,
              "finish": out.finish_reason, "prompt_index": out.prompt_index, "violations": report.violations,
              "token_shapes": token_shapes}
    return result if dist.get_rank() == 0 else None
