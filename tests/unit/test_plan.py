"""`papo-mega plan`: memory terms, layout enumeration, fits / no-fit answers and one-line errors."""

import pytest

from papo_mega.config import ModelConfig, load_config
from papo_mega.errors import ConfigError, PapoError
from papo_mega.plan import (
    DEVICES,
    GB,
    Layout,
    candidate_layouts,
    estimate_memory,
    layer_params,
    lm_workload,
    plan,
    require_fit,
    stage_params,
    vision_params,
)

SMALL = ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                    vocab_size=256)


def test_parameter_counts_by_hand():
    # qkv 64x(64+2*2*16)=8192 + bias 128, proj 4096, fc1 64x256 + fc2 128x64 = 24576; norms 128
    assert layer_params(SMALL, 1) == 8192 + 128 + 4096 + 24576 + 128
    assert layer_params(SMALL, 2) == (8192 + 128 + 4096 + 24576) // 2 + 128
    # untied: embedding and output 256x64 each, final norm 64
    assert stage_params(SMALL, None, 1, 1, 0) == 4 * layer_params(SMALL, 1) + 2 * 256 * 64 + 64
    assert stage_params(SMALL, None, 1, 2, 0) == 2 * layer_params(SMALL, 1) + 256 * 64
    qwen = load_config(None, ["preset=qwen2.5-vl-7b"])
    assert 0.66e9 < vision_params(qwen.vision, qwen.model.hidden_size, 1) < 0.69e9  # ~670M, as published
    total = stage_params(qwen.model, qwen.vision, 1, 1, 0)
    assert 8.2e9 < total < 8.4e9  # Qwen2.5-VL-7B: 8.29B parameters


def test_memory_terms_by_hand():
    work = lm_workload(seq_len=32, micro_batch_size=2, global_batch_size=8)
    params = stage_params(SMALL, None, 1, 1, 0)
    bf16 = ModelConfig(**{**SMALL.__dict__, "precision": "bf16"})
    e = estimate_memory(bf16, None, Layout(1, 1, 2), work, DEVICES["h100-80gb"])
    assert e.weights == params * 2 and e.grads == params * 4  # bf16 weights, fp32 main_grad
    assert e.optimizer == params * 12 / 2  # fp32 master + 2 moments, sharded over dp=2
    assert e.reference == 0 and e.kv_cache == 0
    # per token per layer: 4h + 2(h + 2kv) + h + 4f = 256 + 256 + 64 + 512 elements, bf16, 1 micro-batch in flight
    assert e.activations == 64 * 4 * (256 + 256 + 64 + 512) * 2 + 64 * 64 * 2
    assert e.logits == 64 * 256 * (2 + 8)
    fp32 = estimate_memory(SMALL, None, Layout(1, 1, 1), work, DEVICES["h100-80gb"], distributed_optimizer=False)
    assert fp32.optimizer == params * 8  # fp32 params are their own master copy


def test_layouts_are_exactly_the_valid_ones():
    valid, rejected = candidate_layouts(SMALL, None, 8)
    # heads 4 / groups 2 -> tp in {1, 2}; layers 4 -> pp in {1, 2, 4}; tp*pp divides 8
    expected = {(tp, pp) for tp in (1, 2) for pp in (1, 2, 4) if 8 % (tp * pp) == 0}
    assert {(lay.tp, lay.pp) for lay in valid} == expected
    assert all(lay.tp * lay.pp * lay.dp == 8 for lay in valid)
    assert "tp4 pp1 dp2" in rejected and "tp1 pp8 dp1" in rejected
    qwen = load_config(None, ["preset=qwen2.5-vl-72b"])
    valid, rejected = candidate_layouts(qwen.model, qwen.vision, 32)
    assert max(lay.tp for lay in valid) == 4  # the vision MLP (3420) does not split 8 ways
    assert "3420" in rejected["tp8 pp4 dp1"]


def test_72b_on_32_h100_names_fitting_layouts():
    result = plan("qwen2.5-vl-72b", 32, overrides=["model.precision=fp8"], recompute="full")
    fitting = require_fit(result)
    assert fitting and all(p.memory.total <= DEVICES["h100-80gb"].usable_bytes for p in fitting)


def test_72b_on_4_gpus_says_no_layout_fits():
    with pytest.raises(PapoError, match="no layout fits: .*needs at least"):
        require_fit(plan("qwen2.5-vl-72b", 4, overrides=["model.precision=bf16"]))


def test_bad_input_is_a_one_line_error():
    with pytest.raises(ConfigError, match="unknown model preset 'qwen9'"):
        plan("qwen9", 8)
    with pytest.raises(ConfigError, match="unknown GPU type 'tpu'"):
        plan("qwen2.5-vl-7b", 8, "tpu")
    with pytest.raises(ConfigError, match="a100-80gb has no fp8"):
        plan("qwen2.5-vl-7b", 8, "a100-80gb", overrides=["model.precision=fp8"])
    with pytest.raises(PapoError, match="no layout of .* splits over 5 GPUs"):
        require_fit(plan("qwen2.5-vl-7b", 5))


def test_cli_prints_table_and_exits_2_without_fit(capsys):
    from papo_mega.cli import main

    assert main(["plan", "--model", "tiny", "--gpus", "2"]) == 0
    assert "fits: best layouts" in capsys.readouterr().out
    assert main(["plan", "--model", "qwen2.5-vl-72b", "--gpus", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no layout fits" in err


def test_rollout_chunks_bound_the_kv_cache_and_cost_decode_time():
    """rollout.max_batch_rows = 1/8 of a rank's rows: 1/8 of the KV cache, and the decode reads the
    weights once per chunk, so the rollout estimate grows."""
    from papo_mega.plan import estimate_step_time, workload_from_config

    cfg = load_config(None, ["preset=qwen2.5-vl-7b", "algo.prompts_per_step=64", "rollout.n=8"])
    chunked_cfg = load_config(None, ["preset=qwen2.5-vl-7b", "algo.prompts_per_step=64", "rollout.n=8",
                                     "rollout.max_batch_rows=16"])  # 2 prompts of a rank's 16 per chunk
    layout, device = Layout(2, 1, 4), DEVICES["h100-80gb"]
    whole, chunked = workload_from_config(cfg), workload_from_config(chunked_cfg)
    e_whole = estimate_memory(cfg.model, cfg.vision, layout, whole, device)
    e_chunked = estimate_memory(cfg.model, cfg.vision, layout, chunked, device)
    assert e_chunked.kv_cache == pytest.approx(e_whole.kv_cache / 8)
    assert e_chunked.rollout_transient < e_whole.rollout_transient
    assert e_chunked.train_peak == e_whole.train_peak
    assert estimate_step_time(cfg.model, cfg.vision, layout, chunked, device)[0] > \
        estimate_step_time(cfg.model, cfg.vision, layout, whole, device)[0]


def test_no_fit_error_names_the_term_that_peaks():
    rollout_bound = ["model.precision=bf16", "algo.prompts_per_step=512", "rollout.n=16", "train.global_batch_size=64"]
    with pytest.raises(PapoError, match="rollout peaks .*rollout.max_batch_rows"):
        require_fit(plan("qwen2.5-vl-7b", 1, overrides=rollout_bound, recompute="full"))
    train_bound = ["model.precision=bf16", "algo.prompts_per_step=8", "train.micro_batch_size=64",
                   "train.global_batch_size=64"]
    with pytest.raises(PapoError, match="training peaks .*train.micro_batch_size"):
        require_fit(plan("qwen2.5-vl-7b", 1, overrides=train_bound))


@pytest.mark.parametrize("script", ["papo_3b.sh", "papo_7b.sh", "papo_32b.sh", "papo_72b.sh"])
def test_every_gpu_script_runs_a_layout_the_planner_says_fits(script):
    """The shipped Slurm scripts (GPU count from #SBATCH, recipe, precision and layout defaults)
    ask for a layout that fits H100 80GB by the planner, so a user's first job does not OOM."""
    import re
    import shlex
    from pathlib import Path

    from papo_mega.plan import plan_config

    text = (Path(__file__).resolve().parents[2] / "slurm" / script).read_text()
    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)", text, re.M).group(1))
    gpus = nodes * int(re.search(r"^#SBATCH --gpus-per-node=(\d+)", text, re.M).group(1))
    recipe = re.search(r"^RECIPE_DEFAULT=(\S+)", text, re.M).group(1)
    precision = re.search(r'^PRECISION="\$\{PRECISION-(\w*)\}"', text, re.M).group(1)
    layout = shlex.split(re.search(r'^LAYOUT="\$\{LAYOUT-([^}]*)\}"', text, re.M).group(1))
    overrides = layout + ([f"model.precision={precision}"] if precision else [])
    cfg = load_config(str(Path(__file__).resolve().parents[2] / recipe), overrides)
    result = plan_config(cfg, gpus, "h100-80gb")
    want = (cfg.parallel.tp_size, cfg.parallel.pp_size, cfg.parallel.vpp_size or 1)
    chosen = [p for p in result.layouts if (p.layout.tp, p.layout.pp, p.layout.vpp) == want]
    assert chosen, f"{script}: tp{cfg.parallel.tp_size} pp{cfg.parallel.pp_size} is no valid layout on {gpus} GPUs"
    assert chosen[0].fits, f"{script}: {chosen[0].layout} plans {chosen[0].memory.total / GB:.0f} GB per GPU"
    if script == "papo_72b.sh":  # issue 15: the 72B recipe and script follow the planner's best layout
        from papo_mega.plan import require_fit

        assert require_fit(result)[0].layout == chosen[0].layout, (require_fit(result)[0].layout, chosen[0].layout)
    # Cores per rank are asked for (Slurm's default is one core a task: 8 ranks, their NCCL/TE threads,
    # reward and loader workers on 8 cores), and fit a 128-core node.
    cpus = re.search(r"^#SBATCH --cpus-per-task=(\d+)", text, re.M)
    per_node = int(re.search(r"^#SBATCH --ntasks-per-node=(\d+)", text, re.M).group(1))
    assert cpus and 4 <= int(cpus.group(1)) and per_node * int(cpus.group(1)) <= 128, script


def test_interleaved_pipeline_holds_more_activations_and_shrinks_the_bubble():
    """vpp: megatron's interleaved warm-up, 2 (pp - s - 1) + (vpp - 1) pp + 1 chunk forwards of
    1/vpp of the stage each, against pp - s whole-stage forwards for plain 1F1B."""
    from papo_mega.plan import estimate_step_time, in_flight_microbatches

    assert in_flight_microbatches(Layout(1, 4, 1), 0, 16) == 4
    assert in_flight_microbatches(Layout(1, 4, 1), 3, 16) == 1
    assert in_flight_microbatches(Layout(1, 4, 1, vpp=2), 0, 16) == (6 + 4 + 1) / 2
    assert in_flight_microbatches(Layout(1, 4, 1, vpp=2), 3, 16) == (0 + 4 + 1) / 2
    assert in_flight_microbatches(Layout(1, 4, 1, vpp=2), 0, 2) == 2  # capped by the micro-batches there are
    work = lm_workload(seq_len=32, micro_batch_size=1, global_batch_size=8)
    plain = estimate_memory(SMALL, None, Layout(1, 2, 1), work, DEVICES["h100-80gb"])
    interleaved = estimate_memory(SMALL, None, Layout(1, 2, 1, vpp=2), work, DEVICES["h100-80gb"])
    assert interleaved.params == plain.params and interleaved.weights == plain.weights
    assert interleaved.activations == pytest.approx(plain.activations * (2 + 2 + 1) / 2 / 2)
    assert estimate_step_time(SMALL, None, Layout(1, 2, 1, vpp=2), work, DEVICES["h100-80gb"])[1] < \
        estimate_step_time(SMALL, None, Layout(1, 2, 1), work, DEVICES["h100-80gb"])[1]


def test_vpp_layouts_are_offered_where_layers_and_micro_batches_allow():
    work = lm_workload(seq_len=32, micro_batch_size=1, global_batch_size=8)
    valid, rejected = candidate_layouts(SMALL, None, 4, work, vpps=(1, 2))
    names = {str(layout) for layout in valid}
    assert "tp1 pp2 vpp2 dp2" in names and "tp1 pp4 dp1" in names and "tp1 pp1 dp4" in names
    assert "tp1 pp1 vpp2 dp4" not in names  # interleaving needs a pipeline
    assert "not divisible by pp_size*vpp_size = 8" in rejected["tp1 pp4 vpp2 dp1"]  # 4 layers, 8 chunks
    odd = lm_workload(seq_len=32, micro_batch_size=2, global_batch_size=6)  # 3 micro-batches at dp1
    valid, rejected = candidate_layouts(SMALL, None, 2, odd, vpps=(1, 2))
    assert "micro-batches (3) divisible by pp=2" in rejected["tp1 pp2 vpp2 dp1"]
    assert "tp1 pp2 dp1" in {str(layout) for layout in valid}


def test_plan_offers_vpp_variants_of_pipelined_layouts():
    from papo_mega.plan import plan_config

    cfg = load_config(None, ["preset=tiny", "train.micro_batch_size=1", "train.global_batch_size=8"])
    names = {str(p.layout) for p in plan_config(cfg, 4, "cpu").layouts}
    assert {"tp1 pp2 dp2", "tp1 pp2 vpp2 dp2", "tp1 pp4 dp1"} <= names


def test_masked_grad_doubles_rows_not_micro_batches():
    """loss.masked_grad puts both views of a micro-batch's responses through the gradient forward:
    twice the rows per micro-batch, the same number of micro-batches (train.py)."""
    from papo_mega.plan import workload_from_config

    base = ["preset=tiny", "train.micro_batch_size=2", "train.global_batch_size=16"]
    plain = workload_from_config(load_config(None, base))
    masked = workload_from_config(load_config(None, [*base, "loss.masked_grad=true"]))
    assert masked.micro_batch_rows == 2 * plain.micro_batch_rows == 4
    assert masked.microbatches(2) == plain.microbatches(2) == 4
    valid, rejected = candidate_layouts(SMALL, None, 16, masked)
    assert "does not split into dp=16" in rejected["tp1 pp1 dp16"]  # 16 responses, micro-batches of 2


def test_cli_plan_prints_no_warnings_of_missing_optional_packages():
    """A login node without Transformer Engine / Apex: the plan is the whole output (a fresh process,
    since megatron warns once, at import)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "papo_mega.cli", "plan", "--model", "qwen2.5-vl-3b", "--gpus", "8"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr


def test_rl_logits_term_is_the_chunked_log_probs_not_megatrons_cross_entropy():
    """The RL step keeps logits + their gradient (param dtype) and two fp32 chunk buffers
    (algo/logprobs.py); the LM step's megatron cross-entropy an fp32 copy and softmax besides."""
    from dataclasses import replace

    from papo_mega.algo.logprobs import CHUNK_BYTES
    from papo_mega.plan import logits_bytes

    lm = lm_workload(seq_len=1000, micro_batch_size=2, global_batch_size=8)
    vocab = 65536
    assert logits_bytes(lm, vocab, 2) == 2000 * vocab * (2 + 8)
    grpo = replace(lm, chunked_logprobs=True, nograd_rows=2)
    assert logits_bytes(grpo, vocab, 2) == 2000 * vocab * 2 * 2 + 2 * CHUNK_BYTES
    papo = replace(grpo, nograd_rows=4)  # both views in the no-grad forward: 2x the rows, logits only
    assert logits_bytes(papo, vocab, 2) == 4000 * vocab * 2 + 2 * CHUNK_BYTES
    tiny = replace(grpo, seq_len=2, micro_batch_rows=1, nograd_rows=1)  # buffers no larger than the logits
    assert logits_bytes(tiny, vocab, 4) == 2 * 2 * vocab * 4 + 2 * 2 * vocab * 4


# -- the terms a GPU adds (issue 15): each explicit, against physical memory -----------------------
GPU_TERMS = ["TE fp8 weights + transposes", "rollout: prompts on the device", "training: recompute working set",
             "training: micro-batch on the device", "allocator fragmentation (5%)", "CUDA context, cuBLAS/TE workspaces",
             "NCCL (3 communicators)"]


def test_72b_plan_prints_every_memory_term_against_physical_memory(capsys):
    from papo_mega.cli import main

    assert main(["plan", "--model", "qwen2.5-vl-72b", "--gpus", "32"]) == 0
    out = capsys.readouterr().out
    assert "memory per GPU of tp4 pp8 dp1, stage 0 (the busiest), GB:" in out
    lines = {line.strip().split("  ")[0]: line for line in out.splitlines() if line.startswith("  ")}
    for term in ["weights", "grads (fp32 main_grad)", "optimizer (Adam, fp32 master; /dp)", "reference model",
                 "rollout: KV cache", "rollout: prefill transient", "training: activations (8 in flight)",
                 "training: logits", "= rollout peak", "= training peak", "= total", *GPU_TERMS]:
        assert term in lines, f"no line for {term!r} in:\n{out}"
    for term in GPU_TERMS[4:] + GPU_TERMS[:1]:
        assert lines[term].endswith("assumed, to be measured on GPU (tools/gpu_check.py)"), lines[term]
    assert "85.52 GB physical (81559 MiB) x 95% usable = 81.24 GB: fits" in out


def test_each_gpu_type_plans_against_its_physical_memory():
    """nvidia-smi: H100 SXM 80GB 81559 MiB, H200 143771 MiB, A100 80GB 81920 MiB - not 80e9 bytes."""
    from papo_mega.plan import GPU_USABLE_FRACTION

    for name, mib in {"h100-80gb": 81559, "h200": 143771, "a100-80gb": 81920}.items():
        assert DEVICES[name].memory_bytes == mib * 2**20
        assert DEVICES[name].usable_bytes == mib * 2**20 * GPU_USABLE_FRACTION
    assert round(DEVICES["h100-80gb"].memory_bytes / GB, 2) == 85.52


def _vlm(*overrides):
    from papo_mega.plan import workload_from_config

    cfg = load_config(None, ["preset=qwen2.5-vl-7b", "model.num_layers=4", "algo.prompts_per_step=8", "rollout.n=2",
                             "train.global_batch_size=16", "train.micro_batch_size=1", *overrides])
    return cfg, workload_from_config(cfg)


def test_fp8_weight_cache_is_two_bytes_per_fp8_gemm_weight_and_zero_for_bf16():
    """megatron/core/extensions/transformer_engine.py TELinear.forward passes is_first_microbatch, so TE
    keeps each fp8 weight and its transpose between micro-batches; fp8_utils.is_first_last_bf16_layer
    numbers the bf16 layers globally. The embedding, output layer and vision tower are no TE fp8 GEMMs."""
    from papo_mega.models.param_shapes import fp8_gemm_params, layer_shapes

    bf16, bf16_work = _vlm("model.precision=bf16")
    assert estimate_memory(bf16.model, bf16.vision, Layout(2, 2, 2), bf16_work, DEVICES["h100-80gb"]).fp8_weight_cache == 0
    fp8, work = _vlm("model.precision=fp8", "model.fp8_recipe=tensorwise", "model.fp8_bf16_layers_start=1")
    gemm = sum(a * b for a, b in (s for s in layer_shapes(fp8.model, 2) if len(s) == 2))
    assert fp8_gemm_params(fp8.model, 2, 2, 0) == 1 * gemm  # layers 0-1 on stage 0, layer 0 in bf16
    assert fp8_gemm_params(fp8.model, 2, 2, 1) == 2 * gemm
    assert fp8_gemm_params(fp8.model, 2, 2, 0, virtual_chunks=2) == 1 * gemm  # layers 0 and 2
    e = estimate_memory(fp8.model, fp8.vision, Layout(2, 2, 2), work, DEVICES["h100-80gb"])
    assert e.fp8_weight_cache == 2 * fp8_gemm_params(fp8.model, 2, 2, e.stage)


def test_batch_pixels_count_on_the_first_stage_only():
    """After train.py's host-resident micro-batches: the first stage holds one micro-batch's ids and pixels
    (both views for the no-grad forward), the last its per-token loss inputs, nothing else of the batch."""
    from papo_mega.plan import LOSS_BYTES_PER_TOKEN
    from papo_mega.plan import _stage_memory as stage_memory

    cfg, work = _vlm("model.precision=bf16")
    first, last = (stage_memory(cfg.model, cfg.vision, Layout(1, 2, 4), work, DEVICES["h100-80gb"], s, True, "none")
                   for s in (0, 1))
    pixel_values = 2 * work.image_patches * 1176 * (4 + 2)  # [original; masked] rows, fp32 + bf16 copy
    assert work.nograd_rows == 2 and first.train_inputs == 2 * work.seq_len * 4 * 8 + pixel_values
    assert last.train_inputs == 2 * work.seq_len * LOSS_BYTES_PER_TOKEN
    assert first.rollout_inputs > 0 and last.rollout_inputs == 0


def test_gpu_only_terms_are_zero_on_the_calibrated_cpu_profile():
    """The CPU calibration (tests/distributed/test_plan_calibration.py) measured its own per-process overhead;
    the GPU terms must not change its predictions."""
    cfg, work = _vlm("model.precision=bf16")
    e = estimate_memory(cfg.model, cfg.vision, Layout(2, 2, 2), work, DEVICES["cpu"])
    assert (e.fp8_weight_cache, e.rollout_inputs, e.train_inputs, e.cuda_runtime, e.nccl, e.fragmentation) == (0,) * 6
    assert e.total == e.allocated == max(e.rollout_peak, e.train_peak)
    g = estimate_memory(cfg.model, cfg.vision, Layout(2, 2, 2), work, DEVICES["h100-80gb"])
    assert g.total == pytest.approx(g.allocated * 1.05 + g.cuda_runtime + g.nccl)


def test_full_recompute_keeps_one_layers_activations_during_its_backward():
    """gpt.py recompute_settings('full'): uniform, recompute_num_layers=1 - one layer re-runs at a time."""
    from papo_mega.plan import token_layer_activation

    work = lm_workload(seq_len=32, micro_batch_size=2, global_batch_size=8)
    none = estimate_memory(SMALL, None, Layout(1, 1, 1), work, DEVICES["h100-80gb"])
    full = estimate_memory(SMALL, None, Layout(1, 1, 1), work, DEVICES["h100-80gb"], recompute="full")
    assert none.recompute_working == 0
    assert full.recompute_working == 64 * token_layer_activation(SMALL, 1, "none") * 4


def test_nccl_counts_the_communicators_a_rank_uses():
    from papo_mega.plan import nccl_groups

    assert nccl_groups(SMALL, Layout(1, 1, 1), 0) == 0
    assert nccl_groups(SMALL, Layout(4, 8, 1), 0) == 3  # tp, pp, model-parallel (= world)
    assert nccl_groups(SMALL, Layout(2, 2, 2), 1) == 5  # + dp and the world group


def test_fp8_plans_token_counts_padded_to_16():
    """Under fp8 the token counts are padded to a multiple of 16 (train.py, for TE's fp8 GEMMs)."""
    _, bf16 = _vlm("model.precision=bf16", "data.max_prompt_len=1000", "rollout.max_new_tokens=25")
    _, fp8 = _vlm("model.precision=fp8", "data.max_prompt_len=1000", "rollout.max_new_tokens=25")
    assert (bf16.seq_len, bf16.prompt_len) == (1025, 1000) and (fp8.seq_len, fp8.prompt_len) == (1040, 1008)
