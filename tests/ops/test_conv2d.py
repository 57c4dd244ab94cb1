"""fastcnn.ops.conv2d, the bias-free convolution of the conv + BatchNorm blocks: Winograd (fastcnn::conv2d_winograd)
where its rule and route say, with the output and both gradients against a float64 oracle within the tolerance
table; F.conv2d itself, bit for bit, everywhere else (outside the rule, a forced backend other than cpu, autocast);
the op's opcheck, torch.compile and the gradients autograd leaves out."""
import pytest
import torch
import torch.nn.functional as F

import fastcnn
from fastcnn import _extension
from fastcnn.ops.conv2d import conv2d

from _blocks import forward_backward
from _tolerances import assert_close_to_oracle

pytestmark = pytest.mark.skipif(not _extension.LOADED, reason="fastcnn._C is not built")

# (N, C_in, C_out, H, W, padding): channels_last, each within the rule (>= 256 tiles, >= 64 channels, enough work).
ELIGIBLE = [(2, 64, 64, 33, 31, 1), (1, 96, 64, 45, 33, 0), (2, 64, 80, 25, 27, 2)]


def _inputs(n, c_in, c_out, h, w, channels_last=True, dtype=torch.float32):
    x = torch.randn(n, c_in, h, w, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randn(c_out, c_in, 3, 3, dtype=dtype) * (2 / (9 * c_in)) ** 0.5


def _winograd_calls(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.name == "fastcnn::winograd_conv3x3" for e in prof.events())


@pytest.mark.parametrize("case", ELIGIBLE, ids=lambda c: "x".join(map(str, c[:5])) + f"p{c[5]}")
def test_winograd_within_the_tolerance_table(case):
    *shape, padding = case
    x, weight = _inputs(*shape)
    out_shape = F.conv2d(x, weight, padding=padding).shape
    grad_out = torch.randn(out_shape, dtype=torch.float64)
    oracle, _, oracle_grads = forward_backward(lambda a, b: F.conv2d(a, b, padding=padding),
                                               (x.double(), weight.double()), grad_out)
    stock_out, _, stock_grads = forward_backward(lambda a, b: F.conv2d(a, b, padding=padding), (x, weight),
                                                 grad_out.float())

    def ours():
        return forward_backward(lambda a, b: conv2d(a, b, 1, padding), (x, weight), grad_out.float())

    assert _winograd_calls(ours) == 2  # the forward and the input gradient, by the default route
    out, _, grads = ours()
    assert_close_to_oracle(out, stock_out, oracle, "out")
    assert out.is_contiguous(memory_format=torch.channels_last)
    for name, got, ref, exact in zip(("input", "weight"), grads, stock_grads, oracle_grads):
        assert_close_to_oracle(got, ref, exact, f"grad {name}")
    assert grads[0].is_contiguous(memory_format=torch.channels_last)  # each gradient in its tensor's format


@pytest.mark.parametrize("wanted", ["input", "weight"])
def test_only_the_gradients_autograd_asks_for(wanted):
    x, weight = _inputs(2, 64, 64, 33, 31)
    x.requires_grad_(wanted == "input")
    weight.requires_grad_(wanted == "weight")
    conv2d(x, weight, 1, 1).sum().backward()
    expected_x, expected_w = x.detach().clone().requires_grad_(x.requires_grad), weight.detach().clone()
    expected_w.requires_grad_(weight.requires_grad)
    F.conv2d(expected_x, expected_w, padding=1).sum().backward()
    assert (x.grad is None) == (wanted != "input") and (weight.grad is None) == (wanted != "weight")
    got, expected = (x.grad, expected_x.grad) if wanted == "input" else (weight.grad, expected_w.grad)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# Outside the rule (NCHW, too few tiles, stride 2, float64, string padding) the call is F.conv2d's own.
OUTSIDE = [
    dict(shape=(2, 64, 64, 33, 31), channels_last=False, padding=1),
    dict(shape=(1, 256, 256, 14, 14), padding=1),  # 49 tiles
    dict(shape=(2, 64, 64, 33, 31), padding=1, stride=2),
    dict(shape=(2, 64, 64, 33, 31), padding=1, dtype=torch.float64),
    dict(shape=(2, 64, 64, 33, 31), padding="same"),
]


@pytest.mark.parametrize("case", OUTSIDE, ids=range(len(OUTSIDE)))
def test_outside_the_rule_is_f_conv2d_bit_for_bit(case):
    x, weight = _inputs(*case["shape"], case.get("channels_last", True), case.get("dtype", torch.float32))
    args = (case.get("stride", 1), case["padding"])
    assert _winograd_calls(lambda: conv2d(x, weight, *args)) == 0
    assert torch.equal(conv2d(x, weight, *args), F.conv2d(x, weight, None, *args))


def test_forced_reference_and_autocast_run_f_conv2d():
    x, weight = _inputs(2, 64, 64, 33, 31)
    with fastcnn.use_backend("reference"):
        assert _winograd_calls(lambda: conv2d(x, weight, 1, 1)) == 0
        assert torch.equal(conv2d(x, weight, 1, 1), F.conv2d(x, weight, padding=1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = conv2d(x, weight, 1, 1), F.conv2d(x, weight, padding=1)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)


@pytest.mark.parametrize("channels_last", [True, False], ids=["winograd", "aten"])
def test_opcheck(channels_last):
    x, weight = _inputs(1, 64, 64, 33, 31, channels_last)
    torch.library.opcheck(torch.ops.fastcnn.conv2d_winograd.default,
                          (x.requires_grad_(), weight.requires_grad_(), [1, 1]))
    grad_out = torch.randn(1, 64, 33, 31)
    grad_out = grad_out.contiguous(memory_format=torch.channels_last) if channels_last else grad_out
    torch.library.opcheck(torch.ops.fastcnn.conv2d_winograd_backward.default,
                          (grad_out, x.detach(), weight.detach(), [1, 1], [True, True]))


def test_torch_compile_fullgraph_matches_eager():
    x, weight = _inputs(2, 64, 64, 33, 31)
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: conv2d(a, b, 1, 1), fullgraph=True)
    out, _, grads = forward_backward(compiled, (x, weight), torch.ones(2, 64, 33, 31))
    expected, _, expected_grads = forward_backward(lambda a, b: conv2d(a, b, 1, 1), (x, weight),
                                                   torch.ones(2, 64, 33, 31))
    torch.testing.assert_close(out, expected)
    for got, ref in zip(grads, expected_grads):
        torch.testing.assert_close(got, ref)
