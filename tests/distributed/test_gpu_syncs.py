"""Host syncs on the GPU path, counted on CPU (issue 15, lesser items).

papo_mega.distributed.device_check counts reads of a device tensor's values on the host
(`tolist`, `item`, `bool`/`int`/`float`): on a GPU each waits for all queued kernels, so one inside a
per-layer or per-parameter loop serialises the host with the GPU that often.

* The vision tower's packed attention reads its segment lengths as Python ints in every layer
  (models/packed_attention.py, `attention_mask.tolist()` and the length check). The lengths were
  computed from the device copy of the packing: two syncs per layer (8 at depth 4, counted before
  the fix); they are now computed on the host before the packing moves: none, at any depth.
* The update's non-finite gradient check did `bool(torch.isfinite(grad).all())` per parameter (one
  sync each); train.nonfinite_grad_flag reduces on the device and the trainer reads the flag once,
  after the all-reduce.
"""

from tests.distributed import host_batch_workers
from tests.distributed.harness import run_distributed


def test_vision_tower_forward_does_not_sync_per_layer():
    syncs = run_distributed(host_batch_workers.vision_tower_host_syncs, 1, args=((2, 4),))[0]
    assert syncs == {2: 0, 4: 0}


def test_nonfinite_grad_check_is_one_device_reduction():
    out = run_distributed(host_batch_workers.grad_check_host_syncs, 1)[0]
    assert out["params"] > 10
    assert out["syncs"] == 0 and out["flag_device"] == "device"
    assert (out["finite_flag"], out["inf_flag"]) == (0.0, 1.0)
