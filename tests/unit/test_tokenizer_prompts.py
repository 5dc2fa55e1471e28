"""Tokenizers (tiny sentencepiece, HF tokenizer.json) and the Qwen2.5-VL chat prompt ids."""

import time

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from papo_mega.config import ModelConfig
from papo_mega.data.prompts import PAPO_SUFFIX, PromptTooLong, build_prompt_ids, image_token_count
from papo_mega.data.synthetic import generate
from papo_mega.data.tokenizer import (
    build_tiny_tokenizer,
    load_tokenizer,
    tiny_corpus,
    train_tiny_sentencepiece,
)
from papo_mega.errors import PapoError
from papo_mega.models.presets import preset_tree

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
TEXTS = ["How many shapes are in the image?", "<think> red is left </think> \\boxed{12}",
         "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>Which?  two  spaces<|im_end|>\n"]


@pytest.fixture(scope="module")
def tiny_cfg() -> ModelConfig:
    return ModelConfig(**preset_tree("tiny")["model"])


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory, tiny_cfg):
    path = build_tiny_tokenizer(tmp_path_factory.mktemp("spm"), seed=0)
    return load_tokenizer(str(path), tiny_cfg)


@pytest.fixture(scope="module")
def hf_setup(tmp_path_factory):
    """A tiny byte-level BPE tokenizer.json with Qwen2's special tokens (ids 0..6), trained here."""
    tok = RawTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=QWEN_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(tiny_corpus(seed=0)[:500], trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    cfg = ModelConfig(vocab_size=512, image_token_id=5, video_token_id=6, vision_start_token_id=3,
                      vision_end_token_id=4)
    return path, cfg


@pytest.fixture(scope="module")
def hf_tok(hf_setup):
    path, cfg = hf_setup
    return load_tokenizer(str(path), cfg)


def _rendered(question: str, image_tokens: list[int], system: str = "You are a helpful assistant.") -> str:
    """The chat text Qwen2.5-VL's template renders, written out independently of prompts.py."""
    vision = "".join("<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>" for n in image_tokens)
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return (f"{head}<|im_start|>user\n{vision}{question} {PAPO_SUFFIX}<|im_end|>\n"
            f"<|im_start|>assistant\n")


def test_tiny_tokenizer_id_layout(spm_tok):
    t = spm_tok
    assert (t.pad_id, t.im_start_id, t.im_end_id, t.eos_id) == (0, 2, 3, 3)
    assert (t.image_token_id, t.video_token_id, t.vision_start_id, t.vision_end_id) == (250, 251, 252, 253)
    assert t.encode("<think>") == [4] and t.encode("</think>") == [5] and t.encode("\n") == [6]
    ids = [i for text in tiny_corpus(seed=0)[::50] for i in t.encode(text)]
    assert max(ids) < 250 and 1 not in ids  # every corpus character is known
    assert t.vocab_size <= 256


def test_tiny_tokenizer_is_deterministic_and_fast(tmp_path, spm_tok):
    start = time.perf_counter()
    model = train_tiny_sentencepiece.__wrapped__(seed=0)  # uncached: a fresh training
    assert time.perf_counter() - start < 5.0
    assert model == build_tiny_tokenizer(tmp_path, seed=0).read_bytes()


@pytest.mark.parametrize("which", ["spm_tok", "hf_tok"])
def test_round_trip(which, request):
    tok = request.getfixturevalue(which)
    texts = TEXTS + [s.question + " " + s.answer for s in generate("train", 20, seed=5, difficulty="hard")]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|image_pad|>") == [tok.image_token_id]
    assert tok.encode("<|vision_start|>x<|vision_end|>")[::2] == [tok.vision_start_id, tok.vision_end_id]


def test_unknown_characters_are_unk_in_the_tiny_tokenizer(spm_tok):
    assert spm_tok.encode("é") == [1]


@pytest.mark.parametrize("which", ["spm_tok", "hf_tok"])
def test_prompt_matches_rendered_chat_text(which, request):
    tok = request.getfixturevalue(which)
    grids = [(1, 8, 8), (1, 4, 6)]
    ids = build_prompt_ids("  What colour is the shape in the centre? ", grids, tok)
    assert ids == tok.encode(_rendered("What colour is the shape in the centre?", [16, 6]))
    assert ids.count(tok.image_token_id) == 22 and ids.count(tok.vision_start_id) == 2
    assert ids[-len(tok.encode("assistant\n")) - 1] == tok.im_start_id
    no_system = build_prompt_ids("Hi?", [(2, 4, 4)], tok, system="")
    assert no_system == tok.encode(_rendered("Hi?", [8], system=""))


def test_image_token_count():
    assert image_token_count((1, 8, 8)) == 16
    assert image_token_count((2, 6, 10), merge_size=2) == 30
    assert image_token_count((1, 9, 9), merge_size=3) == 9
    with pytest.raises(PapoError, match="merge size"):
        image_token_count((1, 7, 8))


def test_prompt_length_limit(spm_tok):
    ids = build_prompt_ids("How many shapes are in the image?", [(1, 8, 8)], spm_tok)
    assert build_prompt_ids("How many shapes are in the image?", [(1, 8, 8)], spm_tok, max_len=len(ids)) == ids
    with pytest.raises(PromptTooLong, match="data.max_prompt_len") as err:
        build_prompt_ids("How many shapes are in the image?", [(1, 8, 8)], spm_tok, max_len=len(ids) - 1)
    assert (err.value.length, err.value.max_len) == (len(ids), len(ids) - 1)


def test_marker_in_question_is_refused(spm_tok, hf_tok):
    for tok in (spm_tok, hf_tok):
        with pytest.raises(PapoError, match="marker"):
            build_prompt_ids("look <|image_pad|> here", [(1, 2, 2)], tok)


def test_hf_special_ids(hf_tok):
    t = hf_tok
    assert (t.pad_id, t.im_start_id, t.im_end_id, t.eos_id) == (0, 1, 2, 2)
    assert (t.vision_start_id, t.vision_end_id, t.image_token_id, t.video_token_id) == (3, 4, 5, 6)


def test_load_tokenizer_errors(tmp_path, hf_setup, tiny_cfg):
    path, cfg = hf_setup
    assert load_tokenizer(str(path.parent), cfg).image_token_id == 5  # a directory holding tokenizer.json
    with pytest.raises(PapoError, match="model.image_token_id"):
        load_tokenizer(str(path), tiny_cfg)
    with pytest.raises(PapoError, match="model.vocab_size"):
        load_tokenizer(str(path), ModelConfig(vocab_size=64, image_token_id=5, video_token_id=6,
                                              vision_start_token_id=3, vision_end_token_id=4))
    with pytest.raises(PapoError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.json"), cfg)
    (tmp_path / "vocab.txt").write_text("x")
    with pytest.raises(PapoError, match="neither"):
        load_tokenizer(str(tmp_path / "vocab.txt"), cfg)
    plain = RawTokenizer(models.BPE())
    plain.save(str(tmp_path / "plain.json"))
    with pytest.raises(PapoError, match="lacks the Qwen2"):
        load_tokenizer(str(tmp_path / "plain.json"), cfg)
    with pytest.raises(PapoError, match="vocab_size"):
        load_tokenizer("", ModelConfig(image_token_id=250, video_token_id=251, vision_start_token_id=252,
                                       vision_end_token_id=253))


def test_empty_spec_builds_the_tiny_tokenizer(spm_tok, tiny_cfg):
    tok = load_tokenizer("", tiny_cfg)
    assert all(tok.encode(t) == spm_tok.encode(t) for t in TEXTS)
