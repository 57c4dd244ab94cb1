"""The Triton backward of the fused transposed convolution (input gradient as a strided convolution, weight gradient
with roles swapped, ReLU mask applied on load, deterministic grad_bias) against a float64 oracle and stock PyTorch.
Runs under Triton's interpreter on CPU (float32/float16: the interpreter's bf16 tl.dot is broken, ENVIRONMENT.md)."""
import pytest
import torch
from _conv_transpose_cases import CASES, case_args, case_id, fused, stock

import fastcnn
from fastcnn.ops import why_unavailable

from _blocks import forward_backward
from _tolerances import assert_close_to_oracle

pytestmark = pytest.mark.skipif(why_unavailable("triton", "cpu") is not None and not torch.cuda.is_available(),
                                reason="Triton cannot run here")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _random_inputs(case, size, c_in_g=3, c_out_g=2, batch=2, channels_last=False):
    kernel, groups = case[0], case[5]
    x = torch.randn(batch, c_in_g * groups, *size, device=DEVICE)
    w = torch.randn(c_in_g * groups, c_out_g, kernel, kernel, device=DEVICE) / kernel
    b = torch.randn(c_out_g * groups, device=DEVICE)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x, w, b


def _assert_within_twice_stock(tensors, args, dtype, grad_out=None):
    """Output and the three gradients of the Triton backend within 2x stock's error against float64 (tolerance
    table); ``grad_out`` defaults to random values, or may be any tensor (e.g. a broadcast one). Returns grad_out
    and the Triton backend's gradients."""
    if grad_out is None:
        grad_out = torch.randn_like(stock(*tensors, *args))
    oracle, _, oracle_grads = forward_backward(lambda *t: stock(*t, *args), [t.double() for t in tensors],
                                               grad_out.double())
    low = [t.to(dtype) for t in tensors]
    stock_out, _, stock_grads = forward_backward(lambda *t: stock(*t, *args), low, grad_out.to(dtype))
    with fastcnn.use_backend("triton"):
        out, _, grads = forward_backward(lambda *t: fused(*t, *args), low, grad_out.to(dtype))
    assert_close_to_oracle(out, stock_out, oracle, "out")
    for name, got, ref, oracle_grad in zip(("input", "weight", "bias"), grads, stock_grads, oracle_grads):
        assert_close_to_oracle(got, ref, oracle_grad, f"grad {name}")
    input_format = torch.contiguous_format if low[0].is_contiguous() else torch.channels_last
    assert grads[0].is_contiguous(memory_format=input_format)
    return grad_out, grads


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5]], ids=case_id)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("activation", ["relu", None])
def test_random_values_within_twice_stock_error(case, channels_last, activation):
    args = case_args(case, activation)
    for dtype in (torch.float32, torch.float16):
        _assert_within_twice_stock(_random_inputs(case, (5, 3), channels_last=channels_last), args, dtype)


def test_split_reductions_are_deterministic_and_right():
    """Enough pixels that the weight and bias gradients reduce in several splits; two runs agree bit for bit."""
    case = CASES[0]
    x, w, b = _random_inputs(case, (16, 17), c_in_g=2, c_out_g=3)
    args = case_args(case, "relu")
    grad_out, first = _assert_within_twice_stock((x, w, b), args, torch.float32)
    with fastcnn.use_backend("triton"):
        _, _, again = forward_backward(lambda *t: fused(*t, *args), (x, w, b), grad_out)
    for got, expected in zip(first, again):
        assert torch.equal(got, expected)


def test_broadcast_grad_out_and_mask_applied_on_load():
    """A stride-0 gradient (from .sum()) and an output with many exact zeros (the ReLU mask) and a NaN."""
    case = CASES[2]
    x, w, b = _random_inputs(case, (4, 5))
    b -= 1.0  # most outputs <= 0: the mask matters
    args = case_args(case, "relu")
    y = stock(x, w, b, *args)
    _assert_within_twice_stock((x, w, b), args, torch.float32, grad_out=torch.ones(()).expand(y.shape))


@pytest.mark.parametrize("output_mask", [[True, False, False], [False, True, False], [False, False, True]])
def test_backward_op_computes_only_the_requested_gradients(output_mask):
    case = CASES[1]
    x, w, b = _random_inputs(case, (3, 4))
    stride, padding, output_padding, groups, dilation, act = case_args(case, "relu")
    op = fastcnn.ops.conv_transpose.register_triton.conv_transpose2d_act_triton
    out = op(x, w, b, list(stride), list(padding), list(output_padding), groups, list(dilation), act)
    grad_out = torch.randn_like(out)
    grads = torch.ops.fastcnn.conv_transpose2d_act_triton_backward(
        grad_out, out, x, w, list(stride), list(padding), list(output_padding), groups, list(dilation), act,
        output_mask)
    _, _, expected = forward_backward(lambda *t: stock(*t, stride, padding, output_padding, groups, dilation, act),
                                      (x, w, b), grad_out)
    for wanted, got, ref in zip(output_mask, grads, expected):
        if wanted:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        else:
            assert got.numel() == 0
