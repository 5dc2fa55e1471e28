"""The Qwen2.5-VL model as megatron-core pipeline chunks.

A chunk is the language model's share of layers (`GPTModel`) plus, on the first pipeline stage
only, the vision tower. On that stage the token embeddings of image placeholders are replaced by
the vision tower's outputs before the first decoder layer. With vision disabled the chunk is a
plain decoder LM (the foundation's smoke model).

    chunks = build_model_chunks(cfg.model, cfg.vision, groups, seed)
    out = chunk(input_ids, position_ids, labels=..., pixel_values=..., image_grid_thw=...)

position_ids are [B, S] for 1D rope, [3, B, S] for multimodal rope (`compute_mrope_position_ids`).
Returns per-token loss [B, S] with labels, else logits [B, S, V_local] (this TP rank's vocab
shard; padded vocab columns hold a large negative value, so softmax gives them no mass).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule

from papo_mega.config import ModelConfig, VisionConfig
from papo_mega.distributed.runtime import ParallelGroups
from papo_mega.models.gpt import build_language_model, build_transformer_config
from papo_mega.models.init import apply_layout_invariant_init


class QwenVLChunk(MegatronModule):
    """One pipeline chunk: [vision tower +] language-model layers [+ output layer]."""

    def __init__(self, model: ModelConfig, lm, vision, groups: ParallelGroups):
        super().__init__(config=lm.config)
        self.lm = lm
        self.vision = vision
        self.image_token_id = model.image_token_id
        self.vocab_size = model.vocab_size
        self.tp_rank = groups.tp_rank
        self.pre_process, self.post_process = lm.pre_process, lm.post_process

    # megatron's schedules and grad finalisation look these up on the chunk they are given.
    @property
    def model_type(self):
        return self.lm.model_type

    @property
    def decoder(self):
        return self.lm.decoder

    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.lm.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        return self.lm.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor) -> None:
        self.lm.set_input_tensor(input_tensor)

    def _embed(self, input_ids, pixel_values, image_grid_thw, image_index=None) -> torch.Tensor:
        """Token embeddings [S, B, H] with image placeholders replaced by vision embeddings.

        image_index [slots]: which image fills each image slot (rows sharing an image run the
        tower once for it); None: the images fill the slots in order."""
        embeddings = self.lm.embedding(input_ids=input_ids, position_ids=None)
        if pixel_values is None:
            return embeddings
        image_embeds = self.vision(pixel_values, image_grid_thw).to(embeddings.dtype)
        if image_index is not None:
            merge = self.vision.vision_cfg.spatial_merge_size
            per_image = torch.split(image_embeds, (image_grid_thw.prod(-1) // merge**2).tolist())
            image_embeds = torch.cat([per_image[i] for i in image_index.tolist()])
        placeholder = input_ids.transpose(0, 1) == self.image_token_id  # [S, B]
        # Images fill placeholders in (batch, position) order, as in Qwen2.5-VL.
        batch_major = embeddings.transpose(0, 1).clone()
        mask = placeholder.transpose(0, 1)
        if int(mask.sum()) != image_embeds.shape[0]:
            raise ValueError(
                f"{int(mask.sum())} image placeholder tokens but {image_embeds.shape[0]} image embeddings"
            )
        batch_major[mask] = image_embeds
        return batch_major.transpose(0, 1).contiguous()

    def _mask_padded_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        local = logits.shape[-1]
        start = self.tp_rank * local
        if start + local <= self.vocab_size:
            return logits
        columns = torch.arange(start, start + local, device=logits.device)
        return logits.masked_fill(columns >= self.vocab_size, torch.finfo(logits.dtype).min)

    def forward(self, input_ids, position_ids, attention_mask=None, labels=None,
                pixel_values=None, image_grid_thw=None, inference_context=None, image_index=None):
        decoder_input = (self._embed(input_ids, pixel_values, image_grid_thw, image_index)
                         if self.pre_process else None)
        if inference_context is not None:
            # KV-cached generation: megatron keeps the cache in the context and returns the last
            # position's logits gathered over TP, [B, 1, padded vocab] (the caller drops padding).
            return self.lm(input_ids, position_ids, attention_mask, decoder_input=decoder_input,
                           inference_context=inference_context, runtime_gather_output=True)
        if labels is not None and self.lm.vocab_size == self.vocab_size:
            # No padded columns to mask: megatron's loss on its own [s, b, v] logits saves a full
            # transpose copy of the logits (forward and backward).
            return self.lm(input_ids, position_ids, attention_mask, decoder_input=decoder_input, labels=labels)
        output = self.lm(input_ids, position_ids, attention_mask, decoder_input=decoder_input)
        if not self.post_process:
            return output
        logits = self._mask_padded_vocab(output)  # [B, S, V_local]
        if labels is None:
            return logits
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        return vocab_parallel_cross_entropy(logits.float(), labels)


def build_model_chunks(model: ModelConfig, vision_cfg: VisionConfig | None, groups: ParallelGroups,
                       seed: int = 1234, initialise: bool = True) -> list[QwenVLChunk]:
    """This rank's chunks, one per virtual pipeline stage; the same weights at every layout.

    initialise=False skips the layout-invariant init (its full-size draws) when every weight is
    about to be loaded anyway (conversion, checkpoint loading). On CUDA the installed Transformer
    Engine / megatron-core are checked first (papo_mega/gpu_env.py): a wrong or missing TE is one
    line naming the fix, not an AttributeError deep inside the build.
    """
    if groups.device.type == "cuda":
        from papo_mega.gpu_env import check_gpu_environment

        check_gpu_environment(model.precision, model.fp8_recipe, warn=groups.rank == 0)
    groups.layout.check_model(
        num_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        vocab_size=model.padded_vocab_size,
    )
    config = build_transformer_config(model, groups)
    chunks = []
    for index in range(groups.layout.virtual_chunks):
        vp_stage = index if groups.layout.vpp_size else None
        lm = build_language_model(model, config, groups, vp_stage)
        vision = None
        if lm.pre_process and vision_cfg is not None and vision_cfg.enabled:
            from papo_mega.models.vision import QwenVisionTower

            vision = QwenVisionTower(vision_cfg, model.hidden_size, groups, model.precision).to(groups.device)
        chunks.append(QwenVLChunk(model, lm, vision, groups))
    if initialise:
        apply_layout_invariant_init(chunks, groups, seed, model.init_std, model.num_layers)
    return chunks
