"""A model directory is self-describing (issue 16, findings 1, 2, 12 and 14's model directory case).

A tiny model is SFT-trained with a non-default image size, a non-default tokenizer (sentencepiece
of another seed) and non-default rollout settings; then:
- `papo-mega eval` without --config gives the same tables as with the recipe (the reference);
- the run's last training checkpoint (checkpoints/step_N, the same weights as the model directory)
  evaluates to the same tables and exports to the same HF tensors, with the tokenizer;
- a papo_model.json that disagrees with the weights is one line, exit 2;
- conversion copies tokenizer and preprocessor files HF -> model directory -> HF.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from papo_mega.data.shard_writer import write_shards
from papo_mega.data.synthetic import generate, to_shard_samples
from papo_mega.data.tokenizer import build_tiny_tokenizer
from tests.distributed.harness import run_distributed
from tests.distributed.hf_fixtures import make_tiny_hf
from tests.distributed.sft_workers import sft_job

REPO = Path(__file__).resolve().parents[2]
# Settings that differ from the defaults and change answers: 84-px images (9 image tokens, not the
# synthetic 112 px's 16), another sentencepiece vocabulary, greedy decoding, 20 new tokens.
RECIPE = {"preset": "tiny",
          "data": {"min_pixels": 7056, "max_pixels": 7056, "max_prompt_len": 400},
          "rollout": {"temperature": 0.0, "max_new_tokens": 20},
          "reward": {"format_weight": 0.2, "accuracy_weight": 0.8}}
EVAL_ARGS = ("--k", "1", "--max-samples", "8", "--batch-prompts", "8")


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "papo_mega.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def _tool(name, *args, timeout=600):
    return subprocess.run([sys.executable, str(REPO / "tools" / f"{name}.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def _one_line_error(proc) -> str:
    assert proc.returncode == 2, (proc.stdout[-1500:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def _flat(tree: dict, prefix: str = "") -> list[str]:
    return [item for key, value in tree.items()
            for item in (_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}={value}"])]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(root, recipe path, model directory, run directory) of a briefly SFT-trained tiny model."""
    import yaml

    root = tmp_path_factory.mktemp("selfdescribing")
    tasks = ["count", "color_at"]
    write_shards(to_shard_samples(generate("train", 96, seed=1, tasks=tasks)), root / "train", 48)
    write_shards(to_shard_samples(generate("test", 8, seed=2, tasks=tasks)), root / "test", 8)
    tokenizer = build_tiny_tokenizer(root / "tok", seed=3)
    recipe = {**RECIPE, "data": {**RECIPE["data"], "tokenizer": str(tokenizer)}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = root / "run" / "model"
    # 60 steps at lr 0.01 learn the answer format (format rate > 0), so tables can tell settings apart.
    overrides = [*_flat(recipe), f"data.train_shards={root / 'train'}", f"sft.out={out}",
                 f"run.run_dir={root / 'run'}", "train.seed=7", "sft.steps=60", "sft.lr=0.01",
                 "sft.micro_batch_size=4", "sft.global_batch_size=8", "data.shuffle_buffer=16",
                 "checkpoint.save_every=0", "run.tensorboard=false"]
    run_distributed(sft_job, 1, args=(overrides,), timeout_s=600)
    return root, root / "recipe.yaml", out, root / "run"


def _eval(ckpt, data, out, *extra):
    proc = _cli("eval", "--ckpt", str(ckpt), "--data", str(data), *EVAL_ARGS, "--out", str(out), *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "eval.json").read_text()), proc.stdout


@pytest.fixture(scope="module")
def with_recipe(trained):
    """The reference: eval with the recipe the model was trained with."""
    root, recipe, model, _ = trained
    result, _ = _eval(model, root / "test", root / "eval_recipe", "--config", str(recipe))
    assert result["format_rate"]["original"] > 0, result  # the model answers: settings change the tables
    return result


def test_eval_without_config_matches_eval_with_the_recipe(trained, with_recipe):
    root, _, model, _ = trained
    result, stdout = _eval(model, root / "test", root / "eval_bare")
    assert result == with_recipe
    assert "data.max_pixels=7056" in stdout and "tiny_spm.model" in stdout  # the one line on what was stored
    assert (model / "tokenizer" / "tiny_spm.model").read_bytes() == (root / "tok" / "tiny_spm.model").read_bytes()


def test_explicit_override_wins_and_is_printed(trained, tmp_path):
    root, _, model, _ = trained
    _, stdout = _eval(model, root / "test", tmp_path, "rollout.max_new_tokens=3")
    assert "explicit values kept: rollout.max_new_tokens=3 (stored 20)" in stdout


def _last_checkpoint(run_dir: Path) -> Path:
    steps = sorted((run_dir / "sft_run" / "checkpoints").glob("step_*"))
    assert steps, f"no training checkpoint under {run_dir}"
    return steps[-1]


def test_intermediate_checkpoint_evaluates_like_the_model_directory(trained, with_recipe, tmp_path):
    """checkpoints/step_N of the last step holds the model directory's weights: the same tables."""
    root, _, _, run_dir = trained
    result, _ = _eval(_last_checkpoint(run_dir), root / "test", tmp_path)
    assert result == with_recipe


def test_intermediate_checkpoint_exports_like_the_model_directory(trained, tmp_path):
    root, _, model, run_dir = trained
    for name, source in (("from_dir", model), ("from_step", _last_checkpoint(run_dir))):
        proc = _tool("convert_mcore_to_hf", "--ckpt", str(source), "--out", str(tmp_path / name))
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_file(tmp_path / "from_dir" / "model.safetensors"), load_file(tmp_path / "from_step" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("from_dir", "from_step"):  # the exported folder carries the model's tokenizer
        assert (tmp_path / name / "tiny_spm.model").read_bytes() == (root / "tok" / "tiny_spm.model").read_bytes()


@pytest.mark.parametrize("edit", [("num_layers", 2), ("ffn_hidden_size", 96)], ids=["fewer_layers", "other_width"])
def test_metadata_that_disagrees_with_the_weights_is_one_line(trained, tmp_path, edit):
    root, _, model, _ = trained
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    meta = json.loads((broken / "papo_model.json").read_text())
    meta["model"][edit[0]] = edit[1]
    (broken / "papo_model.json").write_text(json.dumps(meta))
    line = _one_line_error(_cli("eval", "--ckpt", str(broken), "--data", str(root / "test"), *EVAL_ARGS,
                                "--out", str(tmp_path / "out")))
    assert str(broken) in line and "disagree" in line


def test_conversion_carries_tokenizer_files_both_ways(tmp_path):
    hf = make_tiny_hf(tmp_path / "hf", "tied_gqa")
    extras = {"tokenizer.json": '{"model": {}}', "tokenizer_config.json": '{"model_max_length": 99}',
              "preprocessor_config.json": '{"max_pixels": 12845056}', "chat_template.jinja": "{{ messages }}"}
    for name, text in extras.items():
        (hf / name).write_text(text)
    proc = _tool("convert_hf_to_mcore", "--hf", str(hf), "--out", str(tmp_path / "ckpt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((tmp_path / "ckpt" / "papo_model.json").read_text())
    assert meta["tokenizer"] == "tokenizer/tokenizer.json"
    proc = _tool("convert_mcore_to_hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, text in extras.items():
        assert (tmp_path / "ckpt" / "tokenizer" / name).read_text() == text, name
        assert (tmp_path / "back" / name).read_text() == text, name


def interrupted_second_save(out: str) -> float:
    """Save a model directory, then fail a second save (other weights) after its shards are written;
    returns the largest difference between the first weights and what loads from `out`."""
    import papo_mega.model_dir as model_dir
    from papo_mega.config import load_config
    from papo_mega.distributed import init_distributed
    from papo_mega.distributed.sharding import named_local_params
    from papo_mega.models.qwen_vl import build_model_chunks

    cfg = load_config(None, ["preset=tiny"])
    groups = init_distributed({}, seed=1)
    first = build_model_chunks(cfg.model, cfg.vision, groups, seed=5)
    model_dir.save_model_dir(first, out, cfg.model, cfg.vision, groups, cfg=cfg)
    writes = model_dir.save_model

    def crash_after_writing(chunks, directory):
        writes(chunks, directory)
        raise OSError("simulated crash after the shards were written")

    model_dir.save_model = crash_after_writing
    try:
        model_dir.save_model_dir(build_model_chunks(cfg.model, cfg.vision, groups, seed=6), out, cfg.model,
                                 cfg.vision, groups, cfg=cfg)
    except OSError:
        pass
    finally:
        model_dir.save_model = writes
    loaded = model_dir.load_model_dir(out, groups)[0]
    ours = dict(named_local_params(first[0]))
    return max((p - ours[n]).abs().max().item() for n, p in named_local_params(loaded[0]))


def test_an_interrupted_save_leaves_the_previous_model_directory_whole(tmp_path):
    assert run_distributed(interrupted_second_save, 1, args=(str(tmp_path / "final"),))[0] == 0.0
