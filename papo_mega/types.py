"""Payloads passed between stages (shapes in the field docs)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class ModelInputs:
    """A batch of right-padded sequences with any number of images each, as the model takes it."""

    input_ids: torch.Tensor
    """[B, S] token ids; image placeholders appear as one token per merged patch."""
    position_ids: torch.Tensor
    """[3, B, S] multimodal rotary positions ([B, S] for a text-only 1D-rope model)."""
    attention_mask: torch.Tensor | None = None
    """[B, S] 1 for real tokens, 0 for right padding (causal attention keeps padding harmless)."""
    pixel_values: torch.Tensor | None = None
    """[P, C*T*p*p] flattened patches of every image, images in order of appearance."""
    image_grid_thw: torch.Tensor | None = None
    """[N, 3] patch grid (t, h, w) of each image."""
    image_index: torch.Tensor | None = None
    """[slots] which image fills each image slot, slots in (row, position) order; None: image i
    fills slot i. Rows that share an image (the G rollouts of a prompt) then share its pixels and
    its vision-tower pass."""

    def to(self, device) -> ModelInputs:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return replace(self, **moved)


@dataclass
class PolicyMicroBatch:
    """One micro-batch of rollouts for the policy update, aligned for next-token prediction.

    Column t of every [B, S] tensor is about the token predicted at position t, i.e.
    input_ids[:, t + 1]: targets[:, t] is that token, response_mask[:, t] is 1 when it belongs to
    a response, and the log-probs are of it. Both image views share everything but the pixels.
    """

    input_ids: torch.Tensor
    """[B, S] prompt + response token ids, right-padded."""
    position_ids: torch.Tensor
    """[3, B, S] multimodal rotary positions ([B, S] for a 1D-rope text model)."""
    targets: torch.Tensor
    """[B, S] the next token at each position (global vocabulary ids)."""
    response_mask: torch.Tensor
    """[B, S] 1.0 where targets[:, t] is a response token that counts in the loss."""
    advantages: torch.Tensor
    """[B] per sequence or [B, S] per token."""
    pixel_values: torch.Tensor | None = None
    """[P, C*T*p*p] patches of this micro-batch's images (original view)."""
    masked_pixel_values: torch.Tensor | None = None
    """[P, C*T*p*p] the same patches after PAPO masking (same grid, same token ids)."""
    image_grid_thw: torch.Tensor | None = None
    """[N, 3] patch grid of each image (shared by both views)."""
    image_index: torch.Tensor | None = None
    """[slots] which of the N images fills each image slot ((row, position) order); None: one
    image per slot. assemble_policy_rows stores each prompt's images once for its G rows."""
    old_logp: torch.Tensor | None = None
    """[B, S] log-probs under the rollout (pre-update) policy, original view."""
    masked_logp: torch.Tensor | None = None
    """[B, S] log-probs of the masked view under the pre-update policy (masked_grad=false)."""
    masked_entropy: torch.Tensor | None = None
    """[B, S] full-vocabulary entropy of the masked view (entropy_estimator=full, masked_grad=false)."""
    ref_logp: torch.Tensor | None = None
    """[B, S] log-probs under the frozen reference model."""

    def to(self, device, fields: tuple[str, ...] | None = None, non_blocking: bool = False) -> PolicyMicroBatch:
        """A copy with `fields` (default: all) on `device`; the other fields stay where they are."""
        names = self.__dict__ if fields is None else fields
        moved = {k: getattr(self, k).to(device, non_blocking=non_blocking) for k in names
                 if isinstance(getattr(self, k), torch.Tensor)}
        return replace(self, **moved)

    def to_host(self, device) -> PolicyMicroBatch:
        """A host copy, page-locked when `device` is a CUDA device (so the forward step's copies
        to the device can be non_blocking); plain host memory otherwise."""
        moved = {k: to_host(v, device) for k, v in self.__dict__.items() if isinstance(v, torch.Tensor)}
        return replace(self, **moved)


MODEL_FIELDS = ("input_ids", "position_ids")
"""What the language model reads on every pipeline stage (the rotary positions are per layer)."""
PIXEL_FIELDS = ("pixel_values", "masked_pixel_values", "image_grid_thw", "image_index")
"""What only the vision tower reads: the chunk with pre_process (pipeline stage 0, virtual chunk 0)."""
LOSS_FIELDS = ("targets", "response_mask", "advantages", "old_logp", "masked_logp", "masked_entropy", "ref_logp")
"""What only the loss reads: the last pipeline stage."""


def to_host(tensor: torch.Tensor, device) -> torch.Tensor:
    """`tensor` on the host, pinned when `device` is CUDA and CUDA is up (see PolicyMicroBatch.to_host)."""
    pin = torch.device(device).type == "cuda" and torch.cuda.is_available()
    if tensor.device.type == "cpu" and (not pin or tensor.is_pinned()):
        return tensor
    if not pin:
        return tensor.cpu()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor)


@dataclass
class RolloutPrompt:
    """One prompt to answer: its token ids and its images (already processed)."""

    input_ids: torch.Tensor
    """[L] prompt token ids, image placeholders included."""
    pixel_values: torch.Tensor | None = None
    """[P, C*T*p*p] patches of the prompt's images."""
    image_grid_thw: torch.Tensor | None = None
    """[N, 3] patch grid of each image."""


@dataclass
class RolloutBatch:
    """Responses to a list of prompts, G per prompt, grouped: rows [g*G, (g+1)*G) answer prompt g."""

    prompt_index: torch.Tensor
    """[R] which prompt each row answers."""
    response_ids: torch.Tensor
    """[R, T] sampled token ids, right-padded with pad_id."""
    response_mask: torch.Tensor
    """[R, T] 1.0 on generated tokens (the stop token included), 0.0 on padding."""
    logprobs: torch.Tensor
    """[R, T] log-prob of each sampled token under logits / temperature (0 on padding)."""
    lengths: torch.Tensor
    """[R] number of generated tokens."""
    finish_reason: list[str]
    """Per row: 'eos' (a stop token), 'stop' (a stop string) or 'length' (max_new_tokens)."""
