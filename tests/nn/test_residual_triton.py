"""The fused BasicBlock / Bottleneck forced to the triton backend (its BatchNorm and fused-conv kernels; Triton's
interpreter on CPU) against torchvision's blocks with the same state_dict: train and eval, forward, backward and
running statistics, and the folded inference path."""
import copy

import pytest
import torch
from _residual_pairs import make_pair
from _block_parity import run
from torchvision.models import resnet as tv

import fastcnn
from fastcnn.ops import why_unavailable

from _tolerances import assert_close_to_oracle

pytestmark = pytest.mark.skipif(why_unavailable("triton", "cpu") is not None,
                                reason=f"Triton cannot run on CPU here: {why_unavailable('triton', 'cpu')}")

# (name, our class, torchvision class, constructor kwargs, input channels, input size, channels_last)
CASES = [
    ("basic-down", fastcnn.nn.BasicBlock, tv.BasicBlock, dict(inplanes=3, planes=5, stride=2), 3, (7, 6), False),
    ("bottleneck", fastcnn.nn.Bottleneck, tv.Bottleneck, dict(inplanes=8, planes=2), 8, (5, 3), True),
]


def _pair(case):
    _, ours, theirs, kwargs, channels, size, channels_last = case
    block, stock = make_pair(ours, theirs, kwargs)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return block, stock, torch.randn(2, channels, *size).contiguous(memory_format=fmt)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_triton_blocks_match_torchvision(case, train):
    block, stock, x = _pair(case)
    oracle = copy.deepcopy(stock).double().train(train)
    block, stock = block.train(train), stock.train(train)
    with torch.no_grad():
        grad_out = torch.randn_like(copy.deepcopy(stock).eval()(x))  # (a copy: running statistics stay untouched)
    with fastcnn.use_backend("triton"):
        out, grad_x, grads = run(block, x, grad_out)
    expected, exact = run(stock, x, grad_out), run(oracle, x.double(), grad_out.double())
    assert_close_to_oracle(out, expected[0], exact[0], "out")
    assert_close_to_oracle(grad_x, expected[1], exact[1], "grad_x")
    for name, grad in grads.items():
        assert_close_to_oracle(grad, expected[2][name], exact[2][name], name)
    for name, buffer in block.named_buffers():
        if buffer.is_floating_point():
            assert_close_to_oracle(buffer, stock.get_buffer(name), oracle.get_buffer(name), name)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_triton_folded_inference_matches_torchvision(case):
    block, stock, x = _pair(case)
    block, stock = block.eval(), stock.eval()
    with torch.no_grad():
        oracle = copy.deepcopy(stock).double()(x.double())
        with fastcnn.use_backend("triton"):
            out = block(x)
        assert_close_to_oracle(out, stock(x), oracle, "out")
