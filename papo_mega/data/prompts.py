"""The Qwen2.5-VL chat prompt as token ids, with the PAPO reasoning suffix.

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n<|vision_start|><|image_pad|> x N<|vision_end|>{question} {suffix}<|im_end|>\\n
    <|im_start|>assistant\\n

(one vision block per image, back to back; N = t*h*w / merge_size**2 from the image's grid_thw).
This is the text Qwen2.5-VL's chat template renders for one user turn, with its default system
prompt. Marker ids are inserted as ids and only the text between markers is encoded, exactly
where a tokenizer splits the rendered text, so the ids equal `tokenizer.encode(rendered_text)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from papo_mega.errors import PapoError

if TYPE_CHECKING:
    from papo_mega.data.tokenizer import Tokenizer

PAPO_SUFFIX = ("You first think through the reasoning process as an internal monologue, enclosed within "
               "<think> </think> tags. Then, provide your final answer enclosed within \\boxed{}.")
DEFAULT_SYSTEM = "You are a helpful assistant."
"""Qwen2.5-VL's chat template adds this system turn when a conversation has none."""


class PromptTooLong(PapoError):
    """A prompt over the length limit; `length` lets the caller skip and count, or fail."""

    def __init__(self, length: int, max_len: int) -> None:
        super().__init__(f"prompt has {length} tokens, more than the limit {max_len}; raise data.max_prompt_len "
                         f"or lower data.max_pixels (fewer image tokens)")
        self.length = length
        self.max_len = max_len


def image_token_count(grid_thw: Sequence[int], merge_size: int = 2) -> int:
    """Image placeholder tokens for one image: its patches after merge_size x merge_size merging."""
    t, h, w = (int(x) for x in grid_thw)
    if h % merge_size or w % merge_size:
        raise PapoError(f"image grid {t}x{h}x{w} is not divisible by the merge size {merge_size}; "
                        f"resize images to multiples of patch_size * merge_size pixels")
    return t * h * w // merge_size**2


def build_prompt_ids(question: str, grid_thws: Sequence[Sequence[int]], tokenizer: Tokenizer, merge_size: int = 2,
                     max_len: int | None = None, system: str | None = None, suffix: str = PAPO_SUFFIX) -> list[int]:
    """Prompt token ids ending with the assistant header; system=None uses Qwen's default, '' omits it.

    Raises PromptTooLong when longer than max_len, PapoError when the question's text encodes to a
    marker id (it would break the chat or image layout)."""
    system = DEFAULT_SYSTEM if system is None else system
    user_text = f"{question.strip()} {suffix}" if suffix else question.strip()
    start, end = tokenizer.im_start_id, tokenizer.im_end_id
    parts: list[str | int] = [start, f"system\n{system}", end, "\n"] if system else []
    parts += [start, "user\n"]
    for grid in grid_thws:
        parts += [tokenizer.vision_start_id, *[tokenizer.image_token_id] * image_token_count(grid, merge_size),
                  tokenizer.vision_end_id]
    parts += [user_text, end, "\n", start, "assistant\n"]
    ids = _encode_parts(parts, tokenizer)
    if max_len is not None and len(ids) > max_len:
        raise PromptTooLong(len(ids), max_len)
    return ids


def _encode_parts(parts: list[str | int], tokenizer: Tokenizer) -> list[int]:
    """Ids stay ids; each run of text between them is encoded as one piece, as a tokenizer splits it."""
    ids: list[int] = []
    text = ""
    for part in [*parts, None]:
        if isinstance(part, str):
            text += part
            continue
        if text:
            encoded = tokenizer.encode(text)
            if tokenizer.special_ids.intersection(encoded):
                raise PapoError(f"prompt text {text[:80]!r} contains a chat or vision marker; remove it")
            ids += encoded
            text = ""
        if part is not None:
            ids.append(part)
    return ids
