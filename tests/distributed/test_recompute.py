"""model.recompute (megatron's activation recomputation) changes memory, not the function: the
loss and every gradient equal those of a run without recomputation, at TP2 as well."""

import pytest
import torch

from tests.distributed.harness import run_distributed

MODEL = dict(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
             vocab_size=128, max_seq_len=64)


def loss_and_grads(recompute: str, layout: dict):
    from papo_mega.config import ModelConfig
    from papo_mega.distributed import init_distributed
    from papo_mega.lm_step import forward_backward, make_lm_batch, split_microbatches
    from papo_mega.models.qwen_vl import build_model_chunks
    from papo_mega.optim import attach_grad_finalisation, wrap_ddp

    groups = init_distributed(layout, seed=7)
    chunks = wrap_ddp(build_model_chunks(ModelConfig(**MODEL, recompute=recompute), None, groups, seed=7), groups,
                      use_distributed_optimizer=False)
    attach_grad_finalisation(chunks)
    batch = make_lm_batch(4, 32, MODEL["vocab_size"], 3, 0)
    loss = forward_backward(chunks, split_microbatches(batch, groups, 2), groups)
    grads = {n: p.main_grad.detach().clone() for c in chunks for n, p in c.named_parameters()}
    return {"loss": loss, "grads": grads}


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("tp", [1, 2])
def test_recomputation_gives_the_same_loss_and_gradients(mode, tp):
    layout = {"tp_size": tp}
    plain = run_distributed(loss_and_grads, tp, args=("none", layout), timeout_s=120)
    recomputed = run_distributed(loss_and_grads, tp, args=(mode, layout), timeout_s=120)
    for a, b in zip(plain, recomputed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grads"].keys() == b["grads"].keys()
        for name in a["grads"]:
            torch.testing.assert_close(b["grads"][name], a["grads"][name], rtol=1e-5, atol=1e-7, msg=name)
