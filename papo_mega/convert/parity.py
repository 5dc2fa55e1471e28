"""Logits parity between transformers' Qwen2.5-VL and our megatron-core model at a layout.

The probe batch has two right-padded sequences of different lengths, each with text and one
image; the two images have different, non-square patch grids, so per-image and per-window
boundaries in the packed vision call, 3D positions and padding are all exercised.
"""

from __future__ import annotations

import torch

from papo_mega.config import ModelConfig, VisionConfig
from papo_mega.models.rope_index import compute_mrope_position_ids
from papo_mega.types import ModelInputs

# Settings that fix tensor shapes or token meanings: if the HF model and the checkpoint disagree
# on one, the probe batch built from the checkpoint's config does not fit the HF model (an
# IndexError deep in transformers), so they are compared first.
SHAPE_FIELDS = {
    "model": ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
              "vocab_size", "tie_embeddings", "image_token_id", "video_token_id", "vision_start_token_id",
              "vision_end_token_id"),
    "vision": ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
               "temporal_patch_size", "spatial_merge_size"),
}


def shape_differences(hf: tuple[ModelConfig, VisionConfig], ours: tuple[ModelConfig, VisionConfig]) -> list[str]:
    """'section.field HF a, checkpoint b' for every shape setting the two models disagree on."""
    out = []
    for section, theirs, mine in (("model", hf[0], ours[0]), ("vision", hf[1], ours[1])):
        for name in SHAPE_FIELDS[section]:
            a, b = getattr(theirs, name), getattr(mine, name)
            if a != b:
                out.append(f"{section}.{name} HF {a}, checkpoint {b}")
    return out


def build_probe_inputs(model: ModelConfig, vision: VisionConfig, seed: int = 0) -> ModelInputs:
    """Two sequences: [text, <start>, image A, <end>, text] and a shorter one with image B."""
    gen = torch.Generator().manual_seed(seed)
    merge = vision.spatial_merge_size
    grids = torch.tensor([[1, 2 * merge, 3 * merge], [1, 4 * merge, 2 * merge]])
    specials = {model.image_token_id, model.video_token_id, model.vision_start_token_id, model.vision_end_token_id}
    normal = torch.tensor([t for t in range(model.vocab_size) if t not in specials])

    def text(n: int) -> list[int]:
        return normal[torch.randint(0, len(normal), (n,), generator=gen)].tolist()

    rows = []
    for (t, h, w), (before, after) in zip(grids.tolist(), [(5, 4), (3, 2)]):
        image = [model.image_token_id] * (t * h * w // merge**2)
        rows.append(text(before) + [model.vision_start_token_id] + image + [model.vision_end_token_id] + text(after))
    length = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, : len(row)] = torch.tensor(row)
        attention_mask[b, : len(row)] = 1
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    pixel_values = torch.randn(int(grids.prod(dim=1).sum()), patch_dim, generator=gen)
    position_ids = compute_mrope_position_ids(input_ids, grids, model.image_token_id, merge, attention_mask)
    return ModelInputs(input_ids, position_ids, attention_mask, pixel_values, grids)


def hf_logits(hf_dir: str, inputs: ModelInputs, image_token_id: int) -> torch.Tensor:
    """transformers' logits [B, S, V] in fp32 (it computes its own 3D positions: an independent check).

    mm_token_type_ids (1 on image tokens) is what Qwen2.5-VL's processor hands the model; without
    it transformers 5 silently falls back to 1D positions.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        out = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                    pixel_values=inputs.pixel_values, image_grid_thw=inputs.image_grid_thw,
                    mm_token_type_ids=(inputs.input_ids == image_token_id).int())
    return out.logits.float()


def our_logits_rank(ckpt_dir: str, layout_sizes: dict, inputs: ModelInputs) -> torch.Tensor | None:
    """Per rank of a tp*pp job: load the checkpoint, run the probe, return logits on rank 0."""
    import torch.distributed as dist

    from papo_mega.distributed import init_distributed
    from papo_mega.model_dir import load_model_dir
    from papo_mega.models.forward import compute_full_logits

    groups = init_distributed(layout_sizes)
    chunks, _, model, _ = load_model_dir(ckpt_dir, groups, precision="fp32")
    logits = compute_full_logits(chunks, groups, inputs, model.vocab_size)
    return logits if dist.get_rank() == 0 else None


def max_abs_logit_diff(ours: torch.Tensor, theirs: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """Largest |difference| over real (non-padding) tokens."""
    real = attention_mask.bool()
    return (ours[real].double() - theirs[real].double()).abs().max().item()
