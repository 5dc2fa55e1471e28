"""A distributed checkpoint written at one layout loads at another with identical logits."""

import pytest
import torch

from tests.distributed.harness import run_distributed
from tests.distributed.workers import load_and_probe, save_after_training


@pytest.mark.parametrize(
    "name,save_layout,save_world,load_layout,load_world",
    [
        ("tp2_to_pp2", {"tp_size": 2}, 2, {"pp_size": 2}, 2),
        ("tp2pp2_to_tp1", {"tp_size": 2, "pp_size": 2}, 4, {}, 1),
    ],
)
def test_checkpoint_reshards(tmp_path, name, save_layout, save_world, load_layout, load_world):
    saved_logits = run_distributed(save_after_training, save_world, args=(save_layout, str(tmp_path)))[0]
    loaded_logits = run_distributed(load_and_probe, load_world, args=(load_layout, str(tmp_path)))[0]
    assert saved_logits is not None and loaded_logits is not None
    assert saved_logits.shape == loaded_logits.shape == (2, 12, 64)
    torch.testing.assert_close(loaded_logits, saved_logits, rtol=0, atol=1e-5)
