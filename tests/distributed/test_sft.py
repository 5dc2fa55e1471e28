"""`run_sft`: the loss falls, the model directory loads and answers in the PAPO format, the loss
curve is the same at TP2 / PP2 / DP2 as on one process, and bad shard paths are one-line errors."""

import pytest

from papo_mega.config import load_config
from papo_mega.data.shard_writer import write_shards
from papo_mega.data.synthetic import generate, to_shard_samples
from papo_mega.errors import PapoError
from papo_mega.sft import run_sft
from tests.distributed.harness import run_distributed
from tests.distributed.sft_workers import greedy_scores, sft_job

SEED = 7


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_data")
    tasks = ["count", "color_at"]
    write_shards(to_shard_samples(generate("train", 96, seed=1, tasks=tasks)), root / "train", 40)
    write_shards(to_shard_samples(generate("test", 12, seed=1, tasks=tasks)), root / "test", 12)
    return root


def _overrides(shards, out, steps: int, layout: tuple[str, ...] = ()) -> list[str]:
    return [f"data.train_shards={shards / 'train'}", f"sft.out={out}", f"run.run_dir={out.parent}",
            f"train.seed={SEED}", f"sft.steps={steps}", "sft.micro_batch_size=4", "sft.global_batch_size=8",
            "data.shuffle_buffer=16", *layout]


def test_sft_lowers_the_loss_and_learns_the_answer_format(shards, tmp_path):
    # 80 steps of 8 samples at lr 0.01 learn the template (about 15 s); 30 steps are not enough.
    steps = 80
    result = run_distributed(sft_job, 1, args=(_overrides(shards, tmp_path / "sft", steps, ("sft.lr=0.01",)),),
                             timeout_s=240)[0]
    losses = [row["loss"] for row in result["log"]]
    assert len(losses) == steps
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:3]) / 3, losses
    # The written model directory loads (greedy_scores builds or loads, then generates greedily).
    before = run_distributed(greedy_scores, 1, args=(None, str(shards / "test"), 12, SEED))[0]
    after = run_distributed(greedy_scores, 1, args=(result["out"], str(shards / "test"), 12, SEED))[0]
    assert after["format"] > before["format"], (before, after)
    assert after["format"] >= 0.75, after


LAYOUT_STEPS = 3


@pytest.fixture(scope="module")
def single_process_curve(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_one") / "sft"
    return run_distributed(sft_job, 1, args=(_overrides(shards, out, LAYOUT_STEPS),), timeout_s=240)[0]["log"]


@pytest.mark.parametrize("layout", [("parallel.tp_size=2",), ("parallel.pp_size=2",), ()],
                         ids=["tp2", "pp2", "dp2"])
def test_sft_loss_curve_is_the_same_at_every_layout(shards, single_process_curve, tmp_path, layout):
    split = run_distributed(sft_job, 2, args=(_overrides(shards, tmp_path / "sft", LAYOUT_STEPS, layout),),
                            timeout_s=240)[0]
    for a, b in zip(single_process_curve, split["log"], strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (single_process_curve, split["log"])


@pytest.mark.parametrize("where", ["unset", "missing", "empty"])
def test_bad_train_shards_is_one_line_error(tmp_path, where):
    path = {"unset": "", "missing": str(tmp_path / "nowhere"), "empty": str(tmp_path)}[where]
    if where == "empty":
        (tmp_path / "manifest.json").write_text('{"shards": []}')
    with pytest.raises(PapoError) as err:
        run_sft(load_config(None, ["preset=tiny", f"data.train_shards={path}"]))
    message = str(err.value)
    assert "data.train_shards" in message and "\n" not in message
