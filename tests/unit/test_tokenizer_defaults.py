"""The toy tokenizer is never a silent default with a real model (issue 16.2): data.tokenizer=''
on a Qwen-sized model is a one-line error naming the fix, the missing-file error does not point
back at '', tokenizers are stored as files, and the shipped recipes take theirs from the model."""

import pytest

from papo_mega.config import ModelConfig, load_config, shipped_recipes
from papo_mega.data.tokenizer import (
    HF_TOKENIZER_FILES,
    build_tiny_tokenizer,
    load_tokenizer,
    store_tokenizer,
    train_tiny_sentencepiece,
)
from papo_mega.errors import PapoError
from papo_mega.models.presets import preset_tree


@pytest.mark.parametrize("preset", ["qwen2.5-vl-3b", "qwen2.5-vl-7b"])
def test_toy_tokenizer_with_a_real_model_is_an_error_naming_the_fix(preset):
    with pytest.raises(PapoError) as err:
        load_tokenizer("", ModelConfig(**preset_tree(preset)["model"]))
    message = str(err.value)
    assert "data.tokenizer=PATH/tokenizer.json" in message and "convert_hf_to_mcore.py" in message
    assert "\n" not in message


def test_toy_tokenizer_still_serves_the_tiny_layout():
    tiny = ModelConfig(**preset_tree("tiny")["model"])
    assert load_tokenizer("", tiny).image_token_id == tiny.image_token_id
    # a larger vocabulary with the tiny ids (the planner's memory tests) is still the tiny layout
    assert load_tokenizer("", ModelConfig(**{**preset_tree("tiny")["model"], "vocab_size": 65536})).vocab_size == 254


def test_missing_tokenizer_does_not_suggest_the_toy_one(tmp_path):
    with pytest.raises(PapoError) as err:
        load_tokenizer(str(tmp_path / "nowhere.json"), ModelConfig(**preset_tree("tiny")["model"]))
    assert "does not exist" in str(err.value) and "''" not in str(err.value)


def test_store_tokenizer_writes_files_that_load_the_same(tmp_path):
    tiny = ModelConfig(**preset_tree("tiny")["model"])
    name = store_tokenizer("", tiny, tmp_path / "a")
    assert (tmp_path / "a" / name).read_bytes() == train_tiny_sentencepiece()
    other = build_tiny_tokenizer(tmp_path / "src", seed=3)
    name = store_tokenizer(str(other), tiny, tmp_path / "b")
    assert (tmp_path / "b" / name).read_bytes() == other.read_bytes()
    text = "<think> The answer is 7. </think> \\boxed{7}"
    assert load_tokenizer(str(tmp_path / "b" / name), tiny).encode(text) == load_tokenizer(str(other), tiny).encode(text)
    assert store_tokenizer("", ModelConfig(**preset_tree("qwen2.5-vl-3b")["model"]), tmp_path / "c") is None


def test_store_hf_tokenizer_copies_its_companions(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    for name in (*HF_TOKENIZER_FILES[:3], "preprocessor_config.json", "model.safetensors"):
        (src / name).write_text(name)
    assert store_tokenizer(str(src), ModelConfig(), tmp_path / "out") == "tokenizer.json"
    copied = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert copied == sorted({*HF_TOKENIZER_FILES[:3], "preprocessor_config.json"})  # not the weights


@pytest.mark.parametrize("recipe", shipped_recipes())
def test_recipes_take_the_tokenizer_from_the_model_they_start_from(recipe):
    """A recipe with a real preset leaves data.tokenizer '' (the init_from model directory's, which
    convert_hf_to_mcore.py stores) instead of a ckpt/*-hf path nothing creates."""
    cfg = load_config(recipe, [])
    if cfg.vision.enabled and cfg.model.image_token_id != preset_tree("tiny")["model"]["image_token_id"]:
        assert cfg.data.tokenizer == "" and cfg.algo.init_from, (recipe, cfg.data.tokenizer)
