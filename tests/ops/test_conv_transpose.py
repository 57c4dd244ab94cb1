"""The fused ConvTranspose2d + bias + activation on every backend available here, against stock PyTorch."""
import pytest
import torch
from _transpose_cases import CASES, assert_exactly_stock, case_id, fused, integer_inputs, stock

import fastcnn
from fastcnn.ops.conv_transpose.reference import conv_transpose2d_by_phases

from _blocks import backends_here, forward_backward
from _tolerances import assert_close_to_oracle

BACKENDS = backends_here("cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _dtypes(backend):
    # The Triton interpreter is slow and its bf16 tl.dot is broken (ENVIRONMENT.md): float32 here; its float16
    # forward and backward are checked on random values (below and in test_conv_transpose_triton_bwd.py).
    return [torch.float32] if backend == "triton" else DTYPES + [torch.float64]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_matches_stock_exactly(backend, case, channels_last):
    kernel, stride, padding, output_padding, dilation, groups = case
    args = ((stride, stride), (padding, padding), (output_padding, output_padding), groups, (dilation, dilation))
    for dtype in _dtypes(backend):
        for activation in ("relu", None):
            x, w, b = integer_inputs(2, 2 * groups, 3 * groups, (5, 7), (kernel, kernel), groups, dtype,
                                     channels_last)
            assert_exactly_stock(backend, x, w, b, args + (activation,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rectangular_kernels_and_no_bias(backend):
    x, w, _ = integer_inputs(1, 3, 4, (6, 5), (4, 2))
    assert_exactly_stock(backend, x, w, None, ((2, 2), (1, 0), (1, 0), 1, (1, 1), "relu"))
    x, w, _ = integer_inputs(2, 3, 2, (3, 4), (2, 3))
    assert_exactly_stock(backend, x, w, None, ((2, 3), (0, 1), (0, 2), 1, (1, 1), None))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel,stride,padding", [(2, 2, 0), (4, 2, 1)])
def test_random_values_within_twice_stock_error(backend, dtype, kernel, stride, padding):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter's bf16 tl.dot is broken; checked on the GPU")
    x, w, b = torch.randn(2, 6, 7, 5), torch.randn(6, 5, kernel, kernel) / 3, torch.randn(5)
    args = ((stride,) * 2, (padding,) * 2, (0, 0), 1, (1, 1), "relu")
    oracle, grad_out, oracle_grads = forward_backward(lambda *t: stock(*t, *args), (x.double(), w.double(),
                                                                                     b.double()))
    low = [t.to(dtype) for t in (x, w, b)]
    stock_out, _, stock_grads = forward_backward(lambda *t: stock(*t, *args), low, grad_out.to(dtype))
    with fastcnn.use_backend(backend):
        out, _, grads = forward_backward(lambda *t: fused(*t, *args), low, grad_out.to(dtype))
    assert_close_to_oracle(out, stock_out, oracle, "out")
    for name, got, ref, oracle_grad in zip(("input", "weight", "bias"), grads, stock_grads, oracle_grads):
        assert_close_to_oracle(got, ref, oracle_grad, f"grad {name}")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])  # float64: not Triton
@pytest.mark.parametrize("case", CASES[:4], ids=case_id)
def test_gradcheck_float64(backend, case):
    kernel, stride, padding, output_padding, dilation, groups = case
    x = torch.randn(1, 2 * groups, 4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2 * groups, 2, kernel, kernel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2 * groups, dtype=torch.float64, requires_grad=True)
    with fastcnn.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda *t: fused(*t, stride, padding, output_padding, groups, dilation, "relu"), (x, w, b))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_phase_decomposition_equals_stock(case):
    """The documented phase formulation (the kernels' math) reproduces F.conv_transpose2d exactly."""
    kernel, stride, padding, output_padding, dilation, groups = case
    x, w, b = integer_inputs(2, 2 * groups, 3 * groups, (5, 4), (kernel, kernel), groups)
    args = ((stride,) * 2, (padding,) * 2, (output_padding,) * 2, groups, (dilation,) * 2, "relu")
    torch.testing.assert_close(conv_transpose2d_by_phases(x, w, b, *args), stock(x, w, b, *args), atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_and_gradients_only_where_needed(backend):
    x, w, b = integer_inputs(1, 2, 3, (4, 4), (2, 2))
    x[0, 1, 2, 2] = float("nan")
    args = ((2, 2), (0, 0), (0, 0), 1, (1, 1), "relu")
    with fastcnn.use_backend(backend):
        out, grad_out, grads = forward_backward(lambda *t: fused(*t, *args), (x, w, b))
    expected, _, expected_grads = forward_backward(lambda *t: stock(*t, *args), (x, w, b), grad_out)
    torch.testing.assert_close(out, expected, equal_nan=True, atol=0, rtol=0)
    for got, ref in zip(grads, expected_grads):
        torch.testing.assert_close(got, ref, equal_nan=True, atol=0, rtol=0)
    x, w, b = integer_inputs(1, 2, 3, (4, 4), (2, 2))
    w.requires_grad_()
    with fastcnn.use_backend(backend):
        fused(x, w, b, *args).sum().backward()
        assert x.grad is None and b.grad is None and w.grad is not None
        with torch.no_grad():
            assert not fused(x, w, b, *args).requires_grad


def test_unbatched_and_empty_batch():
    x, w, b = integer_inputs(1, 3, 4, (5, 5), (2, 2))
    torch.testing.assert_close(fastcnn.functional.conv_transpose2d(x[0], w, b, 2),
                               stock(x[0], w, b, 2, 0, 0, 1, 1, None), atol=0, rtol=0)
    assert fastcnn.functional.conv_transpose2d(x[:0], w, b, 2).shape == (0, 4, 10, 10)
