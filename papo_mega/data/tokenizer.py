"""One small tokenizer interface over HF `tokenizers` (Qwen2 tokenizer.json) and `sentencepiece`.

    tok = load_tokenizer(cfg.data.tokenizer, cfg.model)   # '' -> the tiny one (tiny-layout models only)
    ids = tok.encode("How many shapes?")                  # plain text, no special tokens added
    tok.decode(ids), tok.image_token_id, tok.eos_id, ...

Marker strings (`<|im_start|>`, `<|image_pad|>`, ...) inside text encode to their ids with both
back ends, so `encode(full_chat_text)` equals the ids the prompt builder assembles.

Tiny sentencepiece id layout (fits the `tiny` preset's vocabulary of 256):

    0 <pad>   1 <unk>   2 <|im_start|>   3 <|im_end|> (eos)   4 <think>   5 </think>   6 "\\n"
    7..249    pieces learnt from the synthetic suite's text (at most 250 pieces in the model)
    250 <|image_pad|>   251 <|video_pad|>   252 <|vision_start|>   253 <|vision_end|>
    254, 255  unused

Ids 250-253 are not in the sentencepiece model: this wrapper maps them (their ids come from the
model config). Characters never seen in the synthetic text encode to <unk>.
"""

from __future__ import annotations

import functools
import io
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

from papo_mega.errors import PapoError

VISION_MARKERS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
"""In the order of the vision ids (image, video, vision_start, vision_end)."""
TINY_VISION_IDS = (250, 251, 252, 253)
TINY_MODEL_NAME = "tiny_spm.model"
_TINY_SYMBOLS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "\n"]
# Qwen2 chat markers by role; Qwen2.5-VL-Instruct ends a turn with <|im_end|> and pads with <|endoftext|>.
_QWEN_TOKENS = {"pad_id": "<|endoftext|>", "eos_id": "<|im_end|>", "im_start_id": "<|im_start|>",
                "im_end_id": "<|im_end|>", "image_token_id": VISION_MARKERS[0], "video_token_id": VISION_MARKERS[1],
                "vision_start_id": VISION_MARKERS[2], "vision_end_id": VISION_MARKERS[3]}


class Tokenizer(ABC):
    """Text <-> ids without adding any special tokens, plus the ids of the chat and vision markers."""

    def __init__(self, vocab_size: int, *, pad_id: int, eos_id: int, im_start_id: int, im_end_id: int,
                 image_token_id: int, video_token_id: int, vision_start_id: int, vision_end_id: int) -> None:
        self.vocab_size = vocab_size
        """Every id is below this."""
        self.pad_id, self.eos_id = pad_id, eos_id
        self.im_start_id, self.im_end_id = im_start_id, im_end_id
        self.image_token_id, self.video_token_id = image_token_id, video_token_id
        self.vision_start_id, self.vision_end_id = vision_start_id, vision_end_id

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids that plain user text must never produce (they would break the chat or image layout)."""
        return frozenset({self.pad_id, self.eos_id, self.im_start_id, self.im_end_id, self.image_token_id,
                          self.video_token_id, self.vision_start_id, self.vision_end_id})

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...


class HFTokenizer(Tokenizer):
    """A Qwen2-style tokenizer.json read with HF `tokenizers`."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as RawTokenizer

        self._tok = RawTokenizer.from_file(str(path))
        missing = [t for t in _QWEN_TOKENS.values() if self._tok.token_to_id(t) is None]
        if missing:
            raise PapoError(f"{path} lacks the Qwen2 chat/vision tokens {sorted(set(missing))}; "
                            f"use the tokenizer.json of a Qwen2.5-VL checkpoint")
        ids = {role: self._tok.token_to_id(token) for role, token in _QWEN_TOKENS.items()}
        super().__init__(self._tok.get_vocab_size(with_added_tokens=True), **ids)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model with the tiny layout; the four vision ids live above its pieces."""

    def __init__(self, model: str | Path | bytes, vision_ids: Sequence[int] = TINY_VISION_IDS) -> None:
        import sentencepiece as spm

        self._sp = (spm.SentencePieceProcessor(model_proto=model) if isinstance(model, bytes)
                    else spm.SentencePieceProcessor(model_file=str(model)))
        size = self._sp.get_piece_size()
        if min(vision_ids) < size:
            raise PapoError(f"vision token ids {list(vision_ids)} collide with the sentencepiece model's {size} "
                            f"pieces; set model.image_token_id etc. to ids >= {size}")
        im_start, im_end = (self._sp.piece_to_id(p) for p in _TINY_SYMBOLS[:2])
        if self._sp.pad_id() < 0 or self._sp.unk_id() in (im_start, im_end):
            raise PapoError("the sentencepiece model needs a pad id and the pieces <|im_start|> and <|im_end|>; "
                            "build it with build_tiny_tokenizer")
        self._marker_to_id = dict(zip(VISION_MARKERS, vision_ids))
        self._id_to_marker = {i: m for m, i in self._marker_to_id.items()}
        self._split = re.compile("(" + "|".join(re.escape(m) for m in VISION_MARKERS) + ")")
        super().__init__(max(vision_ids) + 1, pad_id=self._sp.pad_id(), eos_id=im_end, im_start_id=im_start,
                         im_end_id=im_end, image_token_id=vision_ids[0], video_token_id=vision_ids[1],
                         vision_start_id=vision_ids[2], vision_end_id=vision_ids[3])

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in self._split.split(text):
            if part in self._marker_to_id:
                ids.append(self._marker_to_id[part])
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids; ids the sentencepiece model does not have (the model's vocabulary is padded
        past it, and a sampling model can emit them) decode to nothing rather than raising."""
        pieces, run = [], []
        size = self._sp.get_piece_size()
        for i in ids:
            if i in self._id_to_marker:
                pieces += [self._sp.decode(run), self._id_to_marker[i]]
                run = []
            elif 0 <= int(i) < size:
                run.append(int(i))
        return "".join(pieces) + self._sp.decode(run)


def tiny_corpus(seed: int = 0) -> list[str]:
    """Text the tiny tokenizer learns from: every synthetic question form, answers, the chat layout."""
    from papo_mega.data.prompts import DEFAULT_SYSTEM, PAPO_SUFFIX
    from papo_mega.data.synthetic import generate

    # The hard preset uses every colour and grid cell, so its questions hold every question word.
    samples = list(generate("train", 1000, seed=seed, difficulty="hard"))
    lines = [f"{s.question} {PAPO_SUFFIX}" for s in samples]
    lines += [f"<think> The answer is {s.answer}. </think> \\boxed{{{s.answer}}}" for s in samples]
    lines += [f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n",
              "<|im_end|>\n<|im_start|>assistant\n"] * 50
    return lines


@functools.cache  # load_tokenizer('') in several places of one process trains once
def train_tiny_sentencepiece(seed: int = 0) -> bytes:
    """The serialised tiny sentencepiece model (deterministic for a seed; well under a second)."""
    import sentencepiece as spm

    writer = io.BytesIO()
    # identity normalisation, no dummy prefix, kept whitespace: decode(encode(text)) == text exactly.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus(seed)), model_writer=writer, model_type="bpe",
        vocab_size=TINY_VISION_IDS[0], hard_vocab_limit=False, pad_id=0, unk_id=1, bos_id=-1, eos_id=-1,
        user_defined_symbols=_TINY_SYMBOLS, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, split_digits=True, character_coverage=1.0, num_threads=1, minloglevel=2)
    return writer.getvalue()


def build_tiny_tokenizer(out_dir: str | Path, seed: int = 0) -> Path:
    """Train the tiny sentencepiece model into out_dir; returns the *.model path."""
    path = Path(out_dir) / TINY_MODEL_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(train_tiny_sentencepiece(seed))
    return path


HF_TOKENIZER = "tokenizer.json"
HF_TOKENIZER_FILES = (HF_TOKENIZER, "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                      "added_tokens.json", "preprocessor_config.json", "chat_template.json", "chat_template.jinja",
                      "generation_config.json")
"""The tokenizer and preprocessor files of a Hugging Face model folder, copied by conversion both ways."""


def copy_hf_tokenizer_files(src_dir: str | Path, dst_dir: str | Path) -> list[str]:
    """Copy whichever HF_TOKENIZER_FILES exist in src_dir into dst_dir; returns their names."""
    import shutil

    names = [n for n in HF_TOKENIZER_FILES if (Path(src_dir) / n).is_file()]
    if names:
        Path(dst_dir).mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(Path(src_dir) / name, Path(dst_dir) / name)
    return names


def store_tokenizer(spec: str, model_cfg, dst_dir: str | Path) -> str | None:
    """Write the tokenizer data.tokenizer=spec names into dst_dir as files; returns the name to load
    (tokenizer.json or *.model), or None when spec names none (the tiny one, on a model without its layout)."""
    import shutil

    dst = Path(dst_dir)
    if not spec:
        if not fits_tiny_tokenizer(model_cfg):
            return None
        build_tiny_tokenizer(dst)
        return TINY_MODEL_NAME
    path = _tokenizer_path(spec)
    if path.suffix == ".model":
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dst / path.name)
        return path.name
    copy_hf_tokenizer_files(path.parent, dst)
    if path.name != HF_TOKENIZER:  # a tokenizer.json of another name still loads under its own
        shutil.copyfile(path, dst / HF_TOKENIZER)
    return HF_TOKENIZER


def fits_tiny_tokenizer(model_cfg) -> bool:
    """Whether the model has the tiny tokenizer's id layout (its vision ids); a Qwen2.5-VL model does not."""
    vision_ids = (model_cfg.image_token_id, model_cfg.video_token_id, model_cfg.vision_start_token_id,
                  model_cfg.vision_end_token_id)
    return vision_ids == TINY_VISION_IDS


def _tokenizer_path(spec: str) -> Path:
    path = Path(spec) / HF_TOKENIZER if Path(spec).is_dir() else Path(spec)
    if not path.is_file():
        raise PapoError(f"data.tokenizer={spec!r}: {path} does not exist; point data.tokenizer at the model's "
                        f"tokenizer.json (or a directory holding one) or a sentencepiece *.model file")
    if path.suffix not in (".model", ".json"):
        raise PapoError(f"data.tokenizer={spec!r} is neither a tokenizer.json nor a sentencepiece *.model")
    return path


def load_tokenizer(spec: str, model_cfg) -> Tokenizer:
    """The tokenizer named by data.tokenizer, checked against the model config.

    '' is the tiny toy tokenizer, and only for models with its id layout (the tiny preset): for a
    real model it would be a silent wrong answer, so that is an error naming the fix."""
    vision_ids = (model_cfg.image_token_id, model_cfg.video_token_id, model_cfg.vision_start_token_id,
                  model_cfg.vision_end_token_id)
    if not spec:
        if not fits_tiny_tokenizer(model_cfg):
            raise PapoError(f"no tokenizer for this model (image_token_id {model_cfg.image_token_id}, vocab_size "
                            f"{model_cfg.vocab_size}): the built-in toy tokenizer fits only the tiny preset; set "
                            f"data.tokenizer=PATH/tokenizer.json (the HF checkpoint's), or convert the model with "
                            f"tools/convert_hf_to_mcore.py, which stores its tokenizer in the model directory")
        tok: Tokenizer = SentencePieceTokenizer(train_tiny_sentencepiece(), vision_ids)
    else:
        path = _tokenizer_path(spec)
        tok = SentencePieceTokenizer(path, vision_ids) if path.suffix == ".model" else HFTokenizer(path)
    _check_against_model(tok, model_cfg, spec)
    return tok


def _check_against_model(tok: Tokenizer, model_cfg, spec: str) -> None:
    pairs = [("image_token_id", tok.image_token_id), ("video_token_id", tok.video_token_id),
             ("vision_start_token_id", tok.vision_start_id), ("vision_end_token_id", tok.vision_end_id)]
    for name, tok_id in pairs:
        if getattr(model_cfg, name) != tok_id:
            raise PapoError(f"data.tokenizer={spec!r} has {name} {tok_id} but model.{name}="
                            f"{getattr(model_cfg, name)}; set model.{name}={tok_id} or use the model's tokenizer")
    if tok.vocab_size > model_cfg.vocab_size:
        raise PapoError(f"data.tokenizer={spec!r} uses ids up to {tok.vocab_size - 1} but model.vocab_size="
                        f"{model_cfg.vocab_size}; use a tokenizer that fits the model (the tiny one for the "
                        f"tiny preset)")
