"""Rollout engines. The training loop sees only `RolloutEngine.generate`; an external engine
(vLLM on GPU) can be added by implementing it, without touching the loop.

`MegatronEngine` generates on the training model itself, split the way it trains (any TP/PP):
- prompts are left-padded so every row's last prompt token sits at the same position and one
  static KV cache offset serves the whole batch (megatron-core's StaticInferenceContext);
- prefill runs once per prompt (the vision tower included), then the cache rows are repeated
  G times: the prompt's G samples share its image embeddings and prompt keys/values;
- each decode step feeds one token per live row; rows that finish are dropped from the batch and
  the cache (their slots freed), so the cost follows the live rows;
- image placeholder and vision span tokens are never sampled: a response holding them would not
  line up with any image in the training forward (their log-probs stay unfiltered);
- with rollout.max_batch_rows, a rank's prompts are decoded in length-sorted chunks of
  max_batch_rows // G prompts, one after another, each with its own cache: the KV cache and the
  prefill are bounded by the chunk, not by prompts_per_step (rows come back in prompt order);
- with interleaved pipelining (vpp > 1) the forward walks the model chunks itself
  (`_forward_virtual_chunks`): megatron's interleaved schedule needs >= pp micro-batches per call;
- with fp8, weights are cast once per prefill and the decode steps reuse TE's cached copies, and
  every GEMM's token count obeys TE's fp8 rule (models/fp8_shapes.py): the prompt length is padded
  to the fp8 token multiple (more left padding), and decode batches keep a multiple of 8 rows -
  inert copies of prompt 0 at first, then finished rows kept until enough have finished. Inert
  rows are never sampled, so the real rows draw exactly what they draw without fp8 padding;
- tokens are drawn on the last pipeline stage from logits gathered over TP and sent to the other
  stages, seeded per (seed, step, DP rank): the same responses at any TP/PP layout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Protocol

import torch
import torch.distributed as dist

from papo_mega.config import ModelConfig, RolloutConfig
from papo_mega.distributed.runtime import ParallelGroups
from papo_mega.errors import PapoError
from papo_mega.models.forward import run_schedule
from papo_mega.models.fp8_shapes import fp8_padded_length, fp8_padded_rows
from papo_mega.models.rope_index import compute_mrope_position_ids
from papo_mega.rollout.sampling import rollout_generator, sample_tokens, token_logprobs
from papo_mega.types import RolloutBatch, RolloutPrompt


@contextlib.contextmanager
def _without_cpu_device_mode(suspend: bool):
    """Pop CPU mode's device-rewriting TorchFunctionMode for the block (when it is the innermost
    torch-function mode). Its Python hook on every torch call costs ~25 % of a tiny model's decode
    step (docs/rollout.md). Only for code that names no CUDA device: a TP1/PP1 decode step (the
    KV cache is allocated at prefill, the rotary tables are cached by then or need no device, and
    no TP collective runs). On CUDA, or outside CPU mode, this does nothing.
    """
    from papo_mega.distributed import cpu_mode

    mode = cpu_mode._active_mode
    if not suspend or mode is None or torch.overrides._get_current_function_mode() is not mode:
        yield
        return
    mode.__exit__(None, None, None)
    try:
        yield
    finally:
        mode.__enter__()


class RolloutEngine(Protocol):
    def generate(self, prompts: list[RolloutPrompt], params: RolloutConfig, seed: int, step: int) -> RolloutBatch:
        """G = params.n responses per prompt, grouped by prompt."""


class MegatronEngine:
    """KV-cached batched sampling on megatron-core model chunks (see the module doc)."""

    def __init__(self, chunks, groups: ParallelGroups, model: ModelConfig, spatial_merge_size: int,
                 stop_token_ids: list[int], pad_token_id: int, decode: Callable[[list[int]], str] | None = None):
        self.chunks = chunks
        self.groups = groups
        self.model = model
        self.merge = spatial_merge_size
        self.stop_token_ids = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long)
        self.pad_token_id = pad_token_id
        self.decode = decode
        self._p2p = None  # megatron P2PCommunicator of the interleaved (vpp > 1) forward, built once
        special = [model.image_token_id, model.video_token_id, model.vision_start_token_id, model.vision_end_token_id]
        self.banned = torch.tensor([t for t in special if 0 <= t < model.vocab_size], dtype=torch.long)

    # -- one forward through the pipeline, logits of the last position on every rank ---------
    def _forward(self, context, input_ids, position_ids, attention_mask, pixel_values=None, image_grid_thw=None):
        groups, vocab = self.groups, self.model.vocab_size
        device = groups.device
        batch = dict(input_ids=input_ids.to(device), position_ids=position_ids.to(device),
                     attention_mask=attention_mask.to(device),
                     pixel_values=None if pixel_values is None else pixel_values.to(device),
                     image_grid_thw=None if image_grid_thw is None else image_grid_thw.to(device))
        rows, seq = input_ids.shape
        # fp8 weight caching: megatron's Transformer Engine layers cast their weights to fp8 on the
        # first forward after set_is_first_microbatch() and reuse that copy until the next one. The
        # weights do not change during a generate call, so only the prefill casts; decode steps reuse.
        prefill = context.sequence_len_offset == 0
        if groups.layout.pp_size == 1 and len(self.chunks) == 1:
            # One stage, one micro-batch: the forward-only schedule would only call the chunk
            # (after the fp8 first-micro-batch flag, kept here); calling it directly saves its
            # bookkeeping, and lets a decode step run outside CPU mode (_without_cpu_device_mode).
            chunk = self.chunks[0]
            if prefill and hasattr(chunk, "set_is_first_microbatch"):
                chunk.set_is_first_microbatch()
            suspend = context.sequence_len_offset > 0 and groups.layout.tp_size == 1
            with torch.no_grad(), _without_cpu_device_mode(suspend):
                logits = self._last_logits(chunk(**batch, inference_context=context))
            context.sequence_len_offset += seq
            return logits

        if len(self.chunks) > 1:
            logits = self._forward_virtual_chunks(context, batch, prefill)
            context.sequence_len_offset += seq
            return logits

        def forward_step(data_iterator, model):
            output = model(**next(data_iterator), inference_context=context)

            def collect(logits):
                return logits.new_zeros(()), {"logits": self._last_logits(logits)}

            return output, collect

        with torch.no_grad():
            out = run_schedule(self.chunks, [batch], forward_step, seq_length=seq, micro_batch_size=rows,
                               refresh_fp8_weights=prefill)
        logits = out[0]["logits"] if out else torch.empty(rows, vocab, device=device)
        context.sequence_len_offset += seq
        return logits

    def _last_logits(self, output: torch.Tensor) -> torch.Tensor:
        """[rows, vocab] fp32 logits of the last position (the output's vocabulary is padded)."""
        return output[:, -1, : self.model.vocab_size].float().contiguous()

    def _forward_virtual_chunks(self, context, batch: dict, prefill: bool) -> torch.Tensor:
        """One micro-batch through an interleaved (vpp > 1) pipeline, model chunk by model chunk:
        virtual stage v*pp + r runs chunk v of pipeline rank r, receiving from the previous rank
        (rank pp-1 hands over to rank 0 between chunks) and sending to the next. megatron's
        interleaved schedule cannot do this: it needs at least pp micro-batches per call."""
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
        from megatron.core.utils import get_attr_wrapped_model, get_model_config

        groups, vocab = self.groups, self.model.vocab_size
        pp, rank, vpp = groups.layout.pp_size, groups.pp_rank, len(self.chunks)
        rows, seq = batch["input_ids"].shape
        config = get_model_config(self.chunks[0])
        if self._p2p is None:  # one per engine: the pipeline group and the model config do not change
            self._p2p = P2PCommunicator(groups.pp, config)
        comm = self._p2p
        shape = (seq, rows, config.hidden_size)
        logits = torch.empty(rows, vocab, device=groups.device)
        with torch.no_grad():
            for v, chunk in enumerate(self.chunks):
                first, last = v == 0 and rank == 0, v == vpp - 1 and rank == pp - 1
                if prefill and hasattr(chunk, "set_is_first_microbatch"):
                    chunk.set_is_first_microbatch()
                get_attr_wrapped_model(chunk, "set_input_tensor")(comm.recv_forward(shape, is_first_stage=first))
                output = chunk(**batch, inference_context=context)
                if last:
                    logits = self._last_logits(output)
                else:
                    comm.send_forward(output, is_last_stage=False)
        return logits

    def _share_last_stage(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        if self.groups.layout.pp_size == 1:  # every rank is the last stage
            return list(tensors)
        last = dist.get_global_rank(self.groups.pp, self.groups.layout.pp_size - 1)
        out = []
        for tensor in tensors:
            tensor = tensor.contiguous()
            dist.broadcast(tensor, src=last, group=self.groups.pp)
            out.append(tensor)
        return out

    @staticmethod
    def _select_cache_rows(context, rows: torch.Tensor) -> None:
        """Keep (and repeat) KV cache rows: prefill -> G copies, finished rows -> dropped."""
        for layer, (keys, values) in context.key_value_memory_dict.items():
            context.key_value_memory_dict[layer] = (keys[:, rows], values[:, rows])

    def generate(self, prompts: list[RolloutPrompt], params: RolloutConfig, seed: int, step: int) -> RolloutBatch:
        if not prompts:
            raise ValueError("generate() needs at least one prompt")
        generator = rollout_generator(seed, step, self.groups.dp_rank)
        chunks = prompt_chunks([int(p.input_ids.numel()) for p in prompts], params.n, params.max_batch_rows)
        if len(chunks) == 1:
            return self._generate_chunk(prompts, params, generator)
        # Every rank of a model replica holds the same prompts, so all of them cut the same chunks.
        parts = [(chunk, self._generate_chunk([prompts[i] for i in chunk], params, generator)) for chunk in chunks]
        return merge_chunks(parts, self.pad_token_id)

    def _generate_chunk(self, prompts: list[RolloutPrompt], params: RolloutConfig,
                        generator: torch.Generator) -> RolloutBatch:
        from megatron.core.inference.contexts import StaticInferenceContext

        device, group_size = self.groups.device, params.n
        lengths = [int(p.input_ids.numel()) for p in prompts]
        longest = max(lengths)
        if longest >= self.model.max_seq_len:
            raise PapoError(f"a prompt of {longest} tokens leaves no room in model.max_seq_len="
                            f"{self.model.max_seq_len}; lower data.max_prompt_len so such prompts are skipped")
        # Responses stop at the context's end (finish reason 'length'), never past it.
        max_new = min(params.max_new_tokens, self.model.max_seq_len - longest)
        # fp8: the prefill's rows x prompt_len tokens obey TE's GEMM rule (models/fp8_shapes.py) with
        # extra left padding, masked like any other; the rope positions skip it.
        prompt_len = fp8_padded_length(longest, self.model)
        total_len = prompt_len + max_new

        # Left-pad the prompts; key_pad marks padding keys for every later step.
        ids = torch.full((len(prompts), prompt_len), self.pad_token_id, dtype=torch.long)
        real = torch.zeros(len(prompts), prompt_len, dtype=torch.bool)
        for row, (prompt, length) in enumerate(zip(prompts, lengths)):
            ids[row, prompt_len - length :] = prompt.input_ids
            real[row, prompt_len - length :] = True
        has_images = any(p.pixel_values is not None for p in prompts)
        pixels = torch.cat([p.pixel_values for p in prompts if p.pixel_values is not None]) if has_images else None
        grids = torch.cat([p.image_grid_thw for p in prompts if p.image_grid_thw is not None]) if has_images else None
        prompt_pos = compute_mrope_position_ids(ids, grids, self.model.image_token_id, self.merge, real.long())
        if not self.model.mrope_section:
            prompt_pos = prompt_pos[0]
        # Text after the prompt continues from the largest prompt position, all axes together.
        next_pos = prompt_pos.reshape(-1, *ids.shape).amax(dim=(0, 2)) + 1 if prompt_pos.dim() == 3 else prompt_pos.amax(dim=1) + 1

        context = StaticInferenceContext(max_batch_size=len(prompts), max_sequence_length=total_len)
        causal = torch.ones(prompt_len, prompt_len, dtype=torch.bool).tril()
        prefill_mask = ~(causal[None] & real[:, None, :])  # True = masked, megatron's convention
        logits = self._forward(context, ids, prompt_pos, prefill_mask[:, None], pixels, grids)

        # G samples per prompt: repeat the cache rows, the positions, the key padding. fp8: decode
        # batches keep a multiple of TE's row count; the extra slots are inert copies of prompt 0.
        expand = torch.arange(len(prompts)).repeat_interleave(group_size)
        rows = len(expand)
        slots = torch.cat([expand, expand.new_zeros(fp8_padded_rows(rows, self.model) - rows)])
        self._select_cache_rows(context, slots.to(device))
        logits = logits[slots.to(logits.device)]
        key_pad = torch.cat([~real[slots], torch.zeros(len(slots), max_new, dtype=torch.bool)], dim=1)
        positions = torch.cat([prompt_pos[..., slots, :],
                               (next_pos[slots][:, None] + torch.arange(max_new)).expand(*prompt_pos.shape[:-2], len(slots), max_new)
                               if prompt_pos.dim() == 3 else next_pos[slots][:, None] + torch.arange(max_new)], dim=-1)
        return self._decode(context, logits, key_pad, positions, prompt_len, expand, params, generator)

    def _decode(self, context, logits: torch.Tensor, key_pad: torch.Tensor, positions: torch.Tensor, prompt_len: int,
                prompt_index: torch.Tensor, params: RolloutConfig, generator: torch.Generator) -> RolloutBatch:
        """Sample one response per prompt_index entry from the prefilled cache. Slot s of key_pad,
        positions and the cache is response row s for s < rows; later slots are inert fp8 filler."""
        device, max_new, rows = self.groups.device, key_pad.shape[1] - prompt_len, len(prompt_index)
        tokens_out = torch.full((rows, max_new), self.pad_token_id, dtype=torch.long)
        logprobs_out = torch.zeros(rows, max_new)
        finish = ["length"] * rows
        out_len = torch.zeros(rows, dtype=torch.long)
        batch = torch.arange(len(key_pad))  # slot of each batch row
        active = batch < rows  # batch rows still writing a response (their slot is their response row)
        for t in range(max_new):
            live = torch.nonzero(active).flatten()
            row_of = batch[live]
            # Only live rows draw: inert rows leave the generator's stream as it is without them.
            # Without fp8 filler every batch row is live: no gather (a rows x vocab copy per token).
            live_logits = logits if len(live) == len(batch) else logits[live.to(logits.device)]
            allowed = live_logits.index_fill(1, self.banned.to(logits.device), float("-inf"))
            tokens = sample_tokens(allowed, params.temperature, params.top_k, params.top_p, generator)
            logp = token_logprobs(live_logits, tokens, params.temperature)
            tokens, logp = self._share_last_stage(tokens.to(device), logp.to(device))
            tokens, logp = tokens.cpu(), logp.cpu()
            tokens_out[row_of, t] = tokens
            logprobs_out[row_of, t] = logp
            out_len[row_of] = t + 1
            done = torch.isin(tokens, self.stop_token_ids)
            for i in torch.nonzero(done).flatten().tolist():
                finish[int(row_of[i])] = "eos"
            if params.stop and self.decode is not None:
                for i in torch.nonzero(~done).flatten().tolist():
                    row = int(row_of[i])
                    text = self.decode(tokens_out[row, : t + 1].tolist())
                    if any(s in text for s in params.stop):
                        finish[row], done[i] = "stop", True
            if t == max_new - 1 or bool(done.all()):
                break
            active = torch.zeros_like(active).index_fill_(0, live[~done], True)
            keep = self._rows_to_keep(active)
            if keep.numel() < len(batch):  # free finished rows' slots
                batch, active = batch[keep], active[keep]
                self._select_cache_rows(context, keep.to(device))
            step_tokens = torch.full((len(batch),), self.pad_token_id, dtype=torch.long)
            step_tokens[active] = tokens_out[batch[active], t]
            seen = prompt_len + t + 1
            mask = key_pad[batch, :seen][:, None, None, :]
            logits = self._forward(context, step_tokens[:, None], positions[..., batch, :seen], mask)

        steps = torch.arange(max_new)[None, :]
        response_mask = (steps < out_len[:, None]).float()
        return RolloutBatch(prompt_index=prompt_index, response_ids=tokens_out.masked_fill(response_mask == 0, self.pad_token_id),
                            response_mask=response_mask, logprobs=logprobs_out * response_mask,
                            lengths=out_len, finish_reason=finish)

    def _rows_to_keep(self, active: torch.Tensor) -> torch.Tensor:
        """Batch rows for the next decode step, in order: the live ones and, under fp8, finished ones
        kept as inert filler up to TE's row multiple (the batch is such a multiple already)."""
        live = torch.nonzero(active).flatten()
        filler = torch.nonzero(~active).flatten()[: fp8_padded_rows(len(live), self.model) - len(live)]
        return torch.sort(torch.cat([live, filler])).values


def prompt_chunks(lengths: list[int], group_size: int, max_batch_rows: int) -> list[list[int]]:
    """Prompt indices per generate batch: all at once (max_batch_rows 0 or enough), else chunks of
    max_batch_rows // group_size prompts in order of length, so each chunk pads its prompts to
    similar lengths (left padding costs prefill compute and cache slots)."""
    per_chunk = max_batch_rows // group_size if max_batch_rows else len(lengths)
    if per_chunk >= len(lengths):
        return [list(range(len(lengths)))]
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + per_chunk] for i in range(0, len(order), per_chunk)]


def merge_chunks(parts: list[tuple[list[int], RolloutBatch]], pad_token_id: int) -> RolloutBatch:
    """One RolloutBatch from chunk results (chunk = the original indices of its prompts), rows
    grouped by original prompt order again; responses right-padded to the longest chunk's width."""
    width = max(batch.response_ids.shape[1] for _, batch in parts)

    def widen(t: torch.Tensor, fill) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill)

    index = torch.cat([torch.tensor(chunk, dtype=torch.long)[batch.prompt_index] for chunk, batch in parts])
    order = torch.sort(index, stable=True).indices  # stable: a prompt's G rows keep their sample order
    finish = [reason for _, batch in parts for reason in batch.finish_reason]
    return RolloutBatch(
        prompt_index=index[order],
        response_ids=torch.cat([widen(b.response_ids, pad_token_id) for _, b in parts])[order],
        response_mask=torch.cat([widen(b.response_mask, 0.0) for _, b in parts])[order],
        logprobs=torch.cat([widen(b.logprobs, 0.0) for _, b in parts])[order],
        lengths=torch.cat([b.lengths for _, b in parts])[order],
        finish_reason=[finish[i] for i in order.tolist()],
    )
