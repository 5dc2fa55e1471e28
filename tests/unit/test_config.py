import dataclasses

import pytest
import yaml

from papo_mega.config import Config, field_doc, load_config, save_config
from papo_mega.errors import ConfigError, LayoutError

RECIPE = "examples/tiny_lm.yaml"


def test_recipe_loads_and_overrides_apply_with_types():
    cfg = load_config(RECIPE, ["parallel.tp_size=2", "train.lr=1e-4", "parallel.vpp_size=null", "model.tie_embeddings=true"])
    assert cfg.parallel.tp_size == 2 and isinstance(cfg.parallel.tp_size, int)
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.parallel.vpp_size is None
    assert cfg.model.tie_embeddings is True
    assert cfg.model.hidden_size == yaml.safe_load(open(RECIPE))["model"]["hidden_size"]


def test_int_is_accepted_for_float_fields():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.hiden_size=8", "unknown config key 'model.hiden_size'; did you mean 'model.hidden_size'?"),
        ("modle.hidden_size=8", "unknown config key 'modle'; did you mean 'model'?"),
        ("parallel.tp_size=two", "parallel.tp_size='two' should be of type int"),
        ("model.tie_embeddings=3", "model.tie_embeddings=3 should be of type bool"),
        ("train.steps", "override 'train.steps' is not of the form section.key=value"),
        ("model.hidden_size=66", "model.hidden_size=66 is not divisible by model.num_attention_heads=4"),
        ("train.global_batch_size=7", "train.global_batch_size=7 is not a multiple of train.micro_batch_size=4"),
        ("model.precision=fp16", "model.precision='fp16' is not one of fp32, bf16"),
    ],
)
def test_bad_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(RECIPE, [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize(
    "overrides,world,message",
    [
        (["parallel.tp_size=4"], 2, "world size 2 is not divisible by tp*pp*cp"),
        (["parallel.tp_size=8"], 8, "4 attention heads are not divisible by tp_size=8"),
        (["parallel.pp_size=3"], 3, "4 layers are not divisible by pp_size*vpp_size = 3"),
        (["parallel.tp_size=2", "model.vocab_size=65", "model.vocab_pad_multiple=5"], 2,
         "padded vocab size 65 is not divisible by tp_size=2"),
        (["train.global_batch_size=12"], 2, "train.global_batch_size=12 is not a multiple of micro_batch_size*dp"),
    ],
)
def test_impossible_layouts_are_rejected(overrides, world, message):
    with pytest.raises((ConfigError, LayoutError)) as err:
        load_config(RECIPE, overrides).check(world)
    assert message in str(err.value)


def test_every_field_is_documented():
    import papo_mega.config as config_module

    assert field_doc(Config, "preset").strip()
    sections = [f.type for f in dataclasses.fields(Config) if f.type.endswith("Config")]
    assert len(sections) >= 5
    for section in sections:
        cls = getattr(config_module, section)
        for f in dataclasses.fields(cls):
            assert field_doc(cls, f.name).strip(), f"{cls.__name__}.{f.name} has no doc"


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(RECIPE, ["parallel.pp_size=2", "train.steps=3"])
    path = save_config(cfg, tmp_path / "run")
    again = load_config(path)
    assert again == cfg


@pytest.mark.parametrize("name", ["tiny", "qwen2.5-vl-3b", "qwen2.5-vl-7b", "qwen2.5-vl-32b", "qwen2.5-vl-72b"])
def test_presets_load_and_are_consistent(name):
    cfg = load_config(None, [f"preset={name}"])
    assert cfg.vision.enabled
    head_dim = cfg.model.hidden_size // cfg.model.num_attention_heads
    assert sum(cfg.model.mrope_section) * 2 == head_dim


def test_recipe_values_win_over_the_preset():
    cfg = load_config(None, ["preset=qwen2.5-vl-7b", "model.num_layers=2"])
    assert (cfg.model.num_layers, cfg.model.hidden_size) == (2, 3584)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown model preset 'qwen9'; choose one of: tiny"):
        load_config(None, ["preset=qwen9"])


def test_fp8_bf16_layers_reach_the_transformer_config():
    from types import SimpleNamespace

    import torch

    from papo_mega.distributed.layout import ParallelLayout
    from papo_mega.models.gpt import build_transformer_config

    groups = SimpleNamespace(layout=ParallelLayout(), device=torch.device("cpu"))
    fp8 = load_config(None, ["model.precision=fp8", "model.fp8_recipe=tensorwise", "model.fp8_bf16_layers_start=1",
                             "model.fp8_bf16_layers_end=2"]).model
    config = build_transformer_config(fp8, groups)
    assert (config.fp8, config.fp8_recipe, config.first_last_layers_bf16) == ("hybrid", "tensorwise", True)
    assert (config.num_layers_at_start_in_bf16, config.num_layers_at_end_in_bf16) == (1, 2)
    # Without fp8 the counts are inert: no fp8 autocast, nothing kept "out of" it.
    bf16 = load_config(None, ["model.precision=bf16", "model.fp8_bf16_layers_start=1"]).model
    config = build_transformer_config(bf16, groups)
    assert config.fp8 is None and not config.first_last_layers_bf16


@pytest.mark.parametrize("overrides, message", [
    (["model.precision=fp8", "model.fp8_bf16_layers_start=1"],
     "model.fp8_recipe=delayed cannot keep layers in bf16 (megatron-core); use fp8_recipe=tensorwise"),
    (["model.fp8_bf16_layers_end=-1"], "must be >= 0 and add up to at most num_layers=4"),
    (["model.fp8_bf16_layers_start=3", "model.fp8_bf16_layers_end=2"], "add up to at most num_layers=4"),
])
def test_fp8_bf16_layer_options_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def test_fp8_bf16_layers_fit_one_pipeline_stage():
    cfg = load_config(None, ["model.precision=fp8", "model.fp8_recipe=tensorwise", "model.fp8_bf16_layers_start=2",
                             "parallel.pp_size=4", "train.global_batch_size=4", "train.micro_batch_size=1"])
    with pytest.raises(ConfigError, match="may not exceed the 1 layers of one pipeline stage"):
        cfg.check(4)
    cfg.parallel.pp_size = 2
    cfg.check(2)


@pytest.mark.parametrize("recipe, expected", [("papo_g_72b.yaml", 73.4e9), ("papo_g_32b.yaml", 33.4e9)])
def test_large_recipes_load_and_count_the_published_parameters(recipe, expected):
    from pathlib import Path

    from papo_mega.dry_run import total_params

    cfg = load_config(Path(__file__).resolve().parents[2] / "examples" / recipe)
    assert cfg.model.precision == "fp8" and cfg.algo.name == "papo_g"
    cfg.check(cfg.parallel.tp_size * cfg.parallel.pp_size)
    cfg.check_algorithm(1)
    assert abs(total_params(cfg) - expected) < 0.1e9


def test_duplicate_yaml_keys_are_errors_naming_both_lines(tmp_path):
    """Finding 16.4: PyYAML keeps the last of two `train:` sections; the first one's lr was lost."""
    recipe = tmp_path / "dup.yaml"
    recipe.write_text("train:\n  lr: 0.5\nmodel:\n  num_layers: 2\ntrain:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"'train' appears twice.*lines 1 and 5"):
        load_config(recipe)
    nested = tmp_path / "nested.yaml"
    nested.write_text("train:\n  lr: 0.5\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="'lr' appears twice"):
        load_config(nested)


@pytest.mark.parametrize("override,message", [
    ("train.lr=-0.001", "train.lr=-0.001 must be > 0"),
    ("train.lr=0", "train.lr=0.0 must be > 0"),
    ("train.seed=-1", "train.seed=-1 must be >= 0"),
    ("train.grad_clip=-1", "train.grad_clip=-1.0 must be >= 0"),
    ("sft.lr=-1", "sft.lr=-1.0 must be > 0"),
])
def test_values_that_must_be_positive_fail_where_the_config_is_read(override, message):
    """Finding 16.14: the dry run passed a negative lr or seed that the run then failed on in torch."""
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(None, [override])


def test_explicit_keys_are_the_recipe_and_overrides_not_defaults(tmp_path):
    from papo_mega.config import explicit_keys

    recipe = tmp_path / "r.yaml"
    recipe.write_text("preset: tiny\ntrain:\n  lr: 0.01\n")
    cfg = load_config(recipe, ["rollout.n=3"])
    keys = explicit_keys(cfg)
    assert {"train.lr", "rollout.n", "preset"} <= keys
    assert "rollout.max_new_tokens" not in keys and "model.hidden_size" not in keys  # default / preset fill
    assert explicit_keys(load_config(None)) == frozenset()


def test_run_tracker_and_samples_every_are_checked_where_the_config_is_read():
    with pytest.raises(ConfigError, match="run.tracker='wandbb' is not one of"):
        load_config(None, ["run.tracker=wandbb"])
    with pytest.raises(ConfigError, match="run.samples_every must be >= 0"):
        load_config(None, ["run.samples_every=-1"])
    assert load_config(None, ["run.tracker=wandb"]).run.tracker == "wandb"
