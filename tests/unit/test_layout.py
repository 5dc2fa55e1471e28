import pytest

from papo_mega.distributed.layout import ParallelLayout, pad_vocab_size
from papo_mega.errors import LayoutError


def test_dp_is_derived():
    layout = ParallelLayout(tp_size=2, pp_size=2, world_size=8)
    assert layout.dp_size == 2
    assert layout.describe() == "tp2 pp2 dp2 (world 8)"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(tp_size=3, world_size=4), "world size 4 is not divisible by tp*pp*cp = 3*1*1 = 3"),
        (dict(vpp_size=2, world_size=2), "vpp_size=2 needs pp_size >= 2"),
        (dict(cp_size=2, world_size=2), "context parallelism is not supported yet"),
        (dict(tp_size=0, world_size=2), "tp_size=0 must be >= 1"),
    ],
)
def test_bad_layouts(kwargs, message):
    with pytest.raises(LayoutError, match=message.replace("*", r"\*")):
        ParallelLayout(**kwargs)


def test_model_checks():
    layout = ParallelLayout(tp_size=4, pp_size=2, vpp_size=2, world_size=8)
    layout.check_model(num_layers=8, num_attention_heads=8, num_query_groups=4, vocab_size=256)
    with pytest.raises(LayoutError, match="2 KV heads are not divisible by tp_size=4"):
        layout.check_model(num_layers=8, num_attention_heads=8, num_query_groups=2, vocab_size=256)
    with pytest.raises(LayoutError, match="6 layers are not divisible by pp_size\\*vpp_size = 4"):
        layout.check_model(num_layers=6, num_attention_heads=8, num_query_groups=4, vocab_size=256)


def test_vocab_padding():
    assert pad_vocab_size(151936, tp_size=8) == 152576  # next multiple of 128*8
    assert pad_vocab_size(128, tp_size=1) == 128
    assert pad_vocab_size(129, tp_size=2, divisible_by=1) == 130
