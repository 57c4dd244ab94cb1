"""The fused Conv2d + bias + ReLU (+ pool) op on every backend available here, against stock PyTorch."""
import pytest
import torch
import torch.nn.functional as F

import fastcnn
from fastcnn.ops.conv_relu_pool import reference

from _blocks import (
    LECTURE_CASES,
    POOL_CASES,
    backends_here,
    device_backends,
    forward_backward,
    integer_inputs,
    saved_bytes,
    stock,
)
from _tolerances import assert_close_to_oracle

DEVICE_BACKENDS = device_backends()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run_fused(backend, x, w, b, stride, padding, dilation, groups, pool, pool_size, pool_stride):
    with fastcnn.use_backend(backend):
        return forward_backward(
            lambda x, w, b: fastcnn.functional.conv2d_relu_pool(x, w, b, stride, padding, dilation, groups, pool,
                                                                pool_size, pool_stride), (x, w, b))


def assert_exactly_stock(backend, x, w, b, stride, padding, dilation, groups, pool, pool_size, pool_stride):
    out, grad_out, grads = run_fused(backend, x, w, b, stride, padding, dilation, groups, pool, pool_size,
                                     pool_stride)
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    expected = stock(*leaves, stride, padding, dilation, groups, pool, pool_size, pool_stride)
    expected.backward(grad_out)
    torch.testing.assert_close(out, expected.detach(), atol=0, rtol=0)
    assert out.is_contiguous(memory_format=reference.memory_format_of(x))
    for name, got, leaf in zip(("input", "weight", "bias"), grads, leaves):
        if leaf is not None:
            torch.testing.assert_close(got, leaf.grad, atol=0, rtol=0, msg=lambda m: f"grad {name}: {m}")


def _dtype_cases(device, backend):
    # Triton's interpreter is slow (fp32 and fp16 there); float64 only where the backend runs it (CPU).
    if device == "cpu" and backend == "triton":
        return [torch.float32, torch.float16]
    return DTYPES + ([torch.float64] if device == "cpu" else [])


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("case", LECTURE_CASES, ids=lambda c: "s%dk%dp%d" % c)
@pytest.mark.parametrize("pool,pool_size,pool_stride", POOL_CASES, ids=lambda p: str(p))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_lecture_cases_match_stock_exactly(device, backend, case, pool, pool_size, pool_stride, channels_last):
    stride, kernel, padding = case
    for dtype in _dtype_cases(device, backend):
        x, w, b = integer_inputs(2, 3, 5, (9, 11), (kernel, kernel), dtype=dtype, channels_last=channels_last,
                                 device=device)
        assert_exactly_stock(backend, x, w, b, (stride, stride), (padding, padding), (1, 1), 1, pool, pool_size,
                             pool_stride)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("pool,pool_size,pool_stride", [("max", (3, 3), (2, 2)), ("max", (3, 2), (1, 2)),
                                                         ("avg", (2, 2), (1, 1)), ("avg", (2, 4), (2, 3))])
def test_general_and_overlapping_pools_match_stock_exactly(device, backend, pool, pool_size, pool_stride):
    x, w, b = integer_inputs(2, 4, 6, (13, 12), (3, 3), device=device)
    assert_exactly_stock(backend, x, w, b, (1, 1), (1, 1), (1, 1), 1, pool, pool_size, pool_stride)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pool", ["max", "avg", "none"])
def test_random_values_within_twice_stock_error(device, backend, dtype, pool):
    """Continuous random data: forward and gradients against a float64 oracle, fp32 tight, fp16/bf16 by the 2x
    rule. The low-precision gradients are compared for avg/none only: a near-tie in a max window may legitimately
    route the gradient to a different element than the float64 oracle does (the exact tests cover max ties)."""
    x, w, b = (t.to(device) for t in (torch.randn(2, 6, 13, 11), torch.randn(7, 6, 3, 3) / 4, torch.randn(7)))
    args = ((1, 1), (1, 1), (1, 1), 1, pool, (2, 2), (2, 2))
    oracle, grad_out, oracle_grads = forward_backward(lambda *t: stock(*t, *args),
                                                      (x.double(), w.double(), b.double()))
    low = [t.to(dtype) for t in (x, w, b)]
    stock_out, _, stock_grads = forward_backward(lambda *t: stock(*t, *args), low, grad_out.to(dtype))
    with fastcnn.use_backend(backend):
        out, _, grads = forward_backward(lambda *t: fastcnn.functional.conv2d_relu_pool(*t, *args), low,
                                         grad_out.to(dtype))
    assert_close_to_oracle(out, stock_out, oracle, "out")
    if dtype == torch.float32 or pool != "max":
        for name, got, ref, oracle_grad in zip(("input", "weight", "bias"), grads, stock_grads, oracle_grads):
            assert_close_to_oracle(got, ref, oracle_grad, f"grad {name}")


@pytest.mark.parametrize("backend", [b for b in backends_here("cpu") if b != "triton"])  # float64: not Triton
@pytest.mark.parametrize("pool,pool_size,pool_stride", POOL_CASES + [("max", (3, 3), (2, 2))])
def test_gradcheck_float64(backend, pool, pool_size, pool_stride):
    x = torch.randn(1, 4, 7, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    with fastcnn.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda x, w, b: fastcnn.functional.conv2d_relu_pool(x, w, b, 1, 1, 1, 2, pool, pool_size, pool_stride),
            (x, w, b))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_nan_propagates_like_stock(device, backend):
    """NaN wins its max window (the last NaN, as PyTorch picks), and its gradient flows like stock's."""
    x, w, b = integer_inputs(1, 2, 3, (8, 8), (1, 1), device=device)
    x[0, 0, 2, 3] = float("nan")
    x[0, 1, 5, 5] = float("nan")
    for pool in ("max", "avg", "none"):
        args = ((1, 1), (0, 0), (1, 1), 1, pool, (2, 2), (2, 2))
        expected, grad_out, expected_grads = forward_backward(lambda *t: stock(*t, *args), (x, w, b))
        with fastcnn.use_backend(backend):
            out, _, grads = forward_backward(lambda *t: fastcnn.functional.conv2d_relu_pool(*t, *args), (x, w, b),
                                             grad_out)
        torch.testing.assert_close(out, expected, equal_nan=True, atol=0, rtol=0)
        for got, ref in zip(grads, expected_grads):
            torch.testing.assert_close(got, ref, equal_nan=True, atol=0, rtol=0)


COMPILED = [p for p in DEVICE_BACKENDS if p.values[1] != "reference"]


@pytest.mark.parametrize("device,backend", COMPILED)
@pytest.mark.parametrize("pool,pool_size,pool_stride", POOL_CASES + [("max", (3, 3), (2, 2))])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_code_is_the_documented_encoding(device, backend, pool, pool_size, pool_stride, channels_last):
    x, w, b = integer_inputs(2, 3, 4, (9, 10), (3, 3), channels_last=channels_last, device=device)
    op = (fastcnn.ops.conv_relu_pool.register_triton.conv2d_relu_pool_triton if backend == "triton"
          else torch.ops.fastcnn.conv2d_relu_pool)
    out, code = op(x, w, b, [1, 1], [1, 1], [1, 1], 1, pool, list(pool_size), list(pool_stride))
    ref_out, ref_code = reference.bias_relu_pool(F.conv2d(x, w, None, 1, 1), b, pool, pool_size, pool_stride)
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)
    assert code.dtype == torch.uint8 and code.shape == ref_code.shape and torch.equal(code, ref_code)
    assert code.stride() == ref_code.stride()


@pytest.mark.parametrize("device,backend", COMPILED)
@pytest.mark.parametrize("pool", ["max", "avg"])
def test_saves_pooled_output_and_one_byte_code_only(device, backend, pool):
    x, w, b = (t.requires_grad_() for t in integer_inputs(2, 3, 8, (16, 16), (3, 3), device=device))
    args = (1, 1, 1, 1, pool, 2, 2)
    with fastcnn.use_backend(backend):
        fused = saved_bytes(lambda: fastcnn.functional.conv2d_relu_pool(x, w, b, *args))
    pooled = 2 * 8 * 8 * 8
    inputs = x.numel() * 4 + w.numel() * 4
    assert fused == inputs + pooled * 4 + pooled  # input, weight, pooled fp32 output, uint8 code
    assert saved_bytes(lambda: stock(x, w, b, *args)) > fused


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_gradients_only_for_what_needs_them(device, backend):
    x, w, b = integer_inputs(1, 3, 4, (8, 8), (3, 3), device=device)
    w.requires_grad_()
    with fastcnn.use_backend(backend):
        fastcnn.functional.conv2d_relu_pool(x, w, b).sum().backward()
    assert x.grad is None and b.grad is None and w.grad is not None
    with torch.no_grad(), fastcnn.use_backend(backend):
        assert not fastcnn.functional.conv2d_relu_pool(x, w, b).requires_grad


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_empty_batch_gives_empty_result(device, backend):
    x, w, b = integer_inputs(0, 3, 4, (8, 8), (3, 3), device=device)
    with fastcnn.use_backend(backend):
        out = fastcnn.functional.conv2d_relu_pool(x, w, b)
    assert out.shape == (0, 4, 3, 3)


def test_unbatched_input_like_conv2d():
    x, w, b = integer_inputs(1, 3, 4, (8, 8), (3, 3))
    out = fastcnn.functional.conv2d_relu_pool(x[0], w, b, padding="same")
    torch.testing.assert_close(out, stock(x[0], w, b, 1, "same", 1, 1, "max", 2, 2), atol=0, rtol=0)
