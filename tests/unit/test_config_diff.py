"""papo_mega/config_diff.py: which differences between a checkpoint's config and a resuming run's
config are refused (issue 16.3), and the one-line description printed for them."""

from papo_mega.config import config_to_dict, load_config
from papo_mega.config_diff import BENIGN_SFT, BENIGN_TRAIN, config_diff, describe, refused


def _diff(*overrides: str):
    return config_diff(config_to_dict(load_config(None, ["preset=tiny"])),
                       config_to_dict(load_config(None, ["preset=tiny", *overrides])))


def test_same_config_has_no_difference():
    assert _diff() == []


def test_algorithm_learning_rate_model_and_data_changes_are_refused():
    diff = _diff("algo.name=grpo", "loss.prcp_coef=0", "train.lr=0.5", "model.ffn_hidden_size=256",
                 "data.train_shards=other", "rollout.n=16")
    keys = [key for key, _, _ in refused(diff, BENIGN_TRAIN)]
    assert keys == ["algo.name", "data.train_shards", "loss.prcp_coef", "model.ffn_hidden_size", "rollout.n",
                    "train.lr"]
    before = load_config(None, ["preset=tiny"])
    text = describe(diff)
    assert f"algo.name {before.algo.name!r} -> 'grpo'" in text and f"train.lr {before.train.lr!r} -> 0.5" in text


def test_length_saving_logging_and_layout_changes_are_benign():
    diff = _diff("train.steps=99", "checkpoint.keep_last=9", "run.tensorboard=false", "algo.eval_every=3",
                 "parallel.tp_size=2", "train.log_every=5", "sft.lr=0.5")
    assert len(diff) == 7 and refused(diff, BENIGN_TRAIN) == []


def test_sft_ignores_the_rl_sections_but_not_its_own_learning_rate():
    diff = _diff("algo.name=grpo", "loss.prcp_coef=0", "rollout.n=16", "sft.steps=500", "sft.lr=0.5")
    assert [key for key, _, _ in refused(diff, BENIGN_SFT)] == ["sft.lr"]


def test_keys_on_one_side_only_are_shown_not_refused():
    saved = config_to_dict(load_config(None, []))
    current = {**saved, "train": {**saved["train"], "new_knob": 1}}
    diff = config_diff(saved, current)
    assert [key for key, _, _ in diff] == ["train.new_knob"] and refused(diff, BENIGN_TRAIN) == []
