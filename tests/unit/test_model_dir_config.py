"""config_from_model: a model directory's stored settings fill what the config leaves unset,
explicit keys win and are reported, shape keys that contradict the weights are refused, runtime
keys are honoured (issue 16.1 and 16.4's init_from half); training checkpoints read the same way."""

from dataclasses import asdict

import pytest
import yaml

from papo_mega.config import load_config
from papo_mega.convert.hf_to_mcore import write_metadata
from papo_mega.errors import PapoError
from papo_mega.model_dir import STORED_SETTINGS, config_from_model, read_model_source

STORED = {"data": {"min_pixels": 7056, "max_pixels": 7056, "max_prompt_len": 300},
          "rollout": {"temperature": 0.0, "max_new_tokens": 20, "stop": ["</answer>"]},
          "reward": {"format_weight": 0.3}}


@pytest.fixture
def model_dir(tmp_path):
    """papo_model.json of the tiny preset with stored settings and tokenizer (no weights: not read here)."""
    stored = load_config(None, ["preset=tiny", "model.max_seq_len=512"])
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tiny_spm.model").write_bytes(b"")
    write_metadata(tmp_path, {}, stored.model, stored.vision, "float32", settings=STORED,
                   tokenizer="tokenizer/tiny_spm.model")
    return tmp_path


def test_stored_settings_fill_the_unset_ones(model_dir):
    cfg, note = config_from_model(load_config(None, []), read_model_source(model_dir))
    for section, values in STORED.items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value, f"{section}.{key}"
    assert cfg.data.tokenizer == str(model_dir / "tokenizer" / "tiny_spm.model")
    assert cfg.model.max_seq_len == 512 and cfg.model.vocab_size == 256  # the stored architecture
    assert "data.max_pixels=7056" in note and "explicit values kept: none" in note and "\n" not in note


def test_explicit_keys_win_and_are_reported(model_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"max_pixels": 12544, "tokenizer": str(tmp_path / "t.model")}}))
    cfg, note = config_from_model(load_config(recipe, ["rollout.max_new_tokens=5"]), read_model_source(model_dir))
    assert cfg.data.max_pixels == 12544 and cfg.rollout.max_new_tokens == 5 and cfg.data.min_pixels == 7056
    assert cfg.data.tokenizer == str(tmp_path / "t.model")
    assert "data.max_pixels=12544 (stored 7056)" in note and "rollout.max_new_tokens=5 (stored 20)" in note


def test_explicit_runtime_model_keys_are_honoured(model_dir):
    cfg, note = config_from_model(load_config(None, ["model.max_seq_len=2048", "model.recompute=full"]),
                                  read_model_source(model_dir))
    assert cfg.model.max_seq_len == 2048 and cfg.model.recompute == "full" and "model.max_seq_len=2048" in note


@pytest.mark.parametrize("key", ["model.hidden_size=128", "model.num_layers=2", "vision.depth=3"])
def test_explicit_shape_keys_that_differ_are_refused(model_dir, key):
    with pytest.raises(PapoError) as err:
        config_from_model(load_config(None, ["model.num_attention_heads=4", key]), read_model_source(model_dir))
    assert key.split("=")[0] in str(err.value) and "\n" not in str(err.value)


def test_the_same_explicit_shape_key_is_accepted(model_dir):
    cfg, _ = config_from_model(load_config(None, ["model.hidden_size=64"]), read_model_source(model_dir))
    assert cfg.model.hidden_size == 64


def test_explicit_keys_survive_for_the_next_reader(model_dir):
    from papo_mega.config import explicit_keys

    cfg = load_config(None, ["rollout.max_new_tokens=5"])
    assert explicit_keys(config_from_model(cfg, read_model_source(model_dir))[0]) == explicit_keys(cfg)


def test_training_checkpoint_reads_its_config_yaml(tmp_path):
    run_cfg = load_config(None, ["preset=tiny", "data.max_pixels=7056", "data.min_pixels=7056",
                                 "rollout.max_new_tokens=9", "data.tokenizer=/somewhere/t.model"])
    step = tmp_path / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    (step / "checkpoint.json").write_text('{"complete": true}')
    (step / "config.yaml").write_text(yaml.safe_dump(asdict(run_cfg)))
    source = read_model_source(step)
    assert source.weights == step and source.tokenizer == "/somewhere/t.model"
    assert source.hf_config["vision_config"]["depth"] == run_cfg.vision.depth and source.hf_dtype == "float32"
    cfg, _ = config_from_model(load_config(None, []), source)
    for section, keys in STORED_SETTINGS.items():
        for key in keys:
            assert getattr(getattr(cfg, section), key) == getattr(getattr(run_cfg, section), key)
    with pytest.raises(PapoError, match="is a run directory; pass .*final"):
        read_model_source(tmp_path)


def test_not_a_model_is_one_line(tmp_path):
    with pytest.raises(PapoError) as err:
        read_model_source(tmp_path / "nowhere")
    assert "does not exist" in str(err.value) and "checkpoints/step_N" in str(err.value)
