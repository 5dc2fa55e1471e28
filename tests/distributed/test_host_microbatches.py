"""The step's policy micro-batches wait on the host; each moves to the device when its forward step
runs, and a pipeline stage receives only the fields it reads (issue 15, item 4).

Run under papo_mega.distributed.device_check.device_tagging (CUDA's same-device rule with
groups.device faked as cuda:0; see test_device_placement.py): micro-batches are host tensors, as
train.py's PolicyMicroBatch.to_host leaves them, and the hook before every forward step reads the
host-to-device bytes copied so far. Before the fix train.py copied every micro-batch of the step,
each with fp32 pixels of both views, to the device on every stage before the first forward, and
algo/policy.py read the micro-batch as it came: on host micro-batches the model's first op mixed a
host tensor with device weights (the emulated "Expected all tensors to be on the same device").

Per forward step, the no-grad log-prob pass ([original; masked] views) and the PAPO update:
* the first stage (the vision tower's, megatron's pre_process) moves its micro-batch's ids and
  pixels, and at most one micro-batch's worth (plus the vision packing's index tensors, made on
  the host by design: < 1% of the pixels);
* other stages move no pixels at all: ids and positions, plus the loss fields on the last stage;
* the log-probs the no-grad pass returns are kept on the host.

On the way it caught a device mix of its own on the GPU path: the vision tower's rotary frequencies
(models/vision.py compute_rotary_freqs) were made on the host and multiplied with device positions.
"""

import pytest

from tests.distributed import host_batch_workers
from tests.distributed.harness import run_distributed


@pytest.mark.parametrize("layout,world", [({}, 1), ({"pp_size": 2}, 2)], ids=["single", "pp2"])
def test_each_forward_step_moves_only_its_own_microbatch(layout, world):
    for rank in run_distributed(host_batch_workers.policy_bytes_per_forward_step, world, args=(layout,)):
        steps = rank["nograd_steps"] + rank["update_steps"]
        assert len(rank["nograd_steps"]) == len(rank["update_steps"]) == rank["count"] > 1
        assert rank["logprobs_on_host"]
        model, pixels, loss = rank["model"], rank["pixels"], rank["loss"]
        assert pixels > 100 * (model + loss)  # the images dominate: a stray pixel copy cannot hide
        if rank["first"]:
            assert all(step >= pixels for step in steps), steps  # its own micro-batch's images
            assert all(step <= model + pixels + loss + 0.01 * pixels for step in steps), steps
        else:
            assert all(step <= model + loss for step in steps), steps  # no pixels past stage 0
        assert rank["total"] <= 2 * rank["count"] * (model + pixels + loss) * 1.01
