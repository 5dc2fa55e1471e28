"""Every parallel layout computes what one process computes: same loss, same full gradients,
same weights after training. The reference is a single-process run of the same model and batch."""

import pytest

from tests.distributed.harness import assert_tensors_close, run_distributed
from tests.distributed.workers import loss_and_grads, train_weights

# fp32: only the order of additions differs between layouts.
LOSS_TOL = 1e-5
GRAD_TOL = 1e-6
WEIGHT_TOL = 5e-5  # after 3 AdamW steps: 0.5% of one lr=1e-2 step (Adam amplifies rounding of tiny grads)

LAYOUTS = {
    "tp2": ({"tp_size": 2}, 2),
    "pp2_1f1b": ({"pp_size": 2}, 2),
    "pp2_vpp2": ({"pp_size": 2, "vpp_size": 2}, 2),
    "tp2_pp2": ({"tp_size": 2, "pp_size": 2}, 4),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, single_process_grads):
    layout, world = LAYOUTS[name]
    out = run_distributed(loss_and_grads, world, args=(layout,))[0]
    assert out["loss"] == pytest.approx(single_process_grads["loss"], abs=LOSS_TOL)
    assert_tensors_close(out["grads"], single_process_grads["grads"], GRAD_TOL, f"{name} gradients")


def test_tied_embeddings_across_pipeline_stages():
    """Tied input/output embeddings live on two stages; their gradients must be summed."""
    tied = {"tie_embeddings": True}
    ref = run_distributed(loss_and_grads, 1, args=({}, tied))[0]
    out = run_distributed(loss_and_grads, 2, args=({"pp_size": 2}, tied))[0]
    assert out["loss"] == pytest.approx(ref["loss"], abs=LOSS_TOL)
    assert_tensors_close(out["grads"], ref["grads"], GRAD_TOL, "tied pp2 gradients")


@pytest.mark.parametrize(
    "name,layout,world",
    [("dp2_distopt", {}, 2), ("dp2_pp2_distopt", {"pp_size": 2}, 4)],
)
def test_data_parallel_training_matches_single_process(name, layout, world, single_process_training):
    """DDP + DistributedOptimizer: 3 steps give the same losses and weights as one process."""
    out = run_distributed(train_weights, world, args=(layout, 3, True))[0]
    assert out["losses"] == pytest.approx(single_process_training["losses"], abs=LOSS_TOL)
    assert out["replica_max_diff"] == 0.0, "data-parallel replicas drifted apart"
    assert_tensors_close(out["weights"], single_process_training["weights"], WEIGHT_TOL, f"{name} weights")


@pytest.fixture(scope="module")
def single_process_vlm():
    from tests.distributed.workers import vlm_loss_and_grads

    return run_distributed(vlm_loss_and_grads, 1, args=({},))[0]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_vision_language_model_layouts_match_single_process(name, single_process_vlm):
    """Qwen2.5-VL (vision tower on the first stage, mrope LLM) trains identically at every layout."""
    from tests.distributed.workers import vlm_loss_and_grads

    layout, world = LAYOUTS[name]
    out = run_distributed(vlm_loss_and_grads, world, args=(layout,))[0]
    assert out["loss"] == pytest.approx(single_process_vlm["loss"], abs=LOSS_TOL)
    assert any(n.startswith("vision.") for n in out["grads"]), "vision tower gradients missing"
    assert_tensors_close(out["grads"], single_process_vlm["grads"], GRAD_TOL, f"VLM {name} gradients")
