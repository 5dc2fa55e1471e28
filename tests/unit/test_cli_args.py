"""Command-line parsing: dotted overrides may follow the flags; anything else unknown is an error."""

import pytest

from papo_mega.cli import parse_args


def test_overrides_before_and_after_flags_are_all_kept():
    args = parse_args(["train", "r.yaml", "train.steps=3", "--resume", "auto", "rollout.n=2", "--dry-run",
                       "data.train_shards=/x"])
    assert args.config == "r.yaml" and args.resume == "auto" and args.dry_run
    assert args.overrides == ["train.steps=3", "rollout.n=2", "data.train_shards=/x"]


def test_unknown_flag_or_stray_word_exits_2(capsys):
    for argv in (["train", "r.yaml", "--bogus", "auto"], ["train", "r.yaml", "--dry-run", "steps"],
                 ["plot", "run", "a=1"]):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(argv)
        assert exit_info.value.code == 2
        assert "unrecognized arguments" in capsys.readouterr().err
