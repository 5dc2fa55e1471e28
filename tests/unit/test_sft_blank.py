"""sft.blank_fraction: a fixed, seeded share of SFT samples shows the blank view with the true answer."""

import pytest
import torch

from papo_mega.config import load_config
from papo_mega.data.prepare import prepare_prompt
from papo_mega.data.shards import ShardStream
from papo_mega.data.synthetic_shards import write_synthetic_shards
from papo_mega.data.tokenizer import load_tokenizer
from papo_mega.errors import ConfigError
from papo_mega.sft import make_example, shows_blank


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_blank")
    write_synthetic_shards(out, "train", 12, samples_per_shard=12, progress=False)
    return list(ShardStream(str(out), shuffle_buffer=0, epochs=1))


def test_the_share_is_the_fraction_and_fixed_by_seed_and_key():
    keys = [f"train/{i:06d}" for i in range(4000)]
    share = sum(shows_blank(k, 0, 0.25) for k in keys) / len(keys)
    assert abs(share - 0.25) < 0.03, share  # 4000 Bernoulli(0.25): sd 0.007
    assert [shows_blank(k, 0, 0.25) for k in keys] == [shows_blank(k, 0, 0.25) for k in keys]
    assert [shows_blank(k, 0, 0.25) for k in keys] != [shows_blank(k, 1, 0.25) for k in keys]  # the seed redraws
    assert not any(shows_blank(k, 0, 0.0) for k in keys)


def test_chosen_samples_carry_the_blank_view_and_the_true_answer(items):
    cfg = load_config(None, ["preset=tiny", "sft.blank_fraction=0.5", "train.seed=3"])
    plain = load_config(None, ["preset=tiny", "train.seed=3"])
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.model)
    chosen = 0
    for item in items:
        got, reference = make_example(item, tokenizer, cfg), make_example(item, tokenizer, plain)
        assert torch.equal(got.ids, reference.ids)  # same prompt, same (true) answer
        views = prepare_prompt(item, tokenizer, cfg.data, cfg.vision, 3, step=0, views=("blank",)).views
        if shows_blank(str(item["key"]), 3, 0.5):
            chosen += 1
            assert torch.equal(got.pixel_values, views["blank"])
            assert not torch.equal(got.pixel_values, reference.pixel_values)
        else:
            assert torch.equal(got.pixel_values, reference.pixel_values)
    assert 0 < chosen < len(items)


@pytest.mark.parametrize("bad", ["1.0", "-0.1"])
def test_a_fraction_outside_0_1_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="sft.blank_fraction"):
        load_config(None, ["preset=tiny", f"sft.blank_fraction={bad}"])
