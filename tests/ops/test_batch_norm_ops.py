"""The fused BatchNorm ops against stock PyTorch: values and gradients (float64 oracle, 2x stock's error), both
memory formats, odd sizes, gradcheck (the triton backend's too; its other tests are in test_batch_norm_triton.py),
opcheck, determinism and argument errors."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _batch_norm_cases import bn_inputs, compare_with_stock

import fastcnn
from fastcnn.ops import batch_norm as ops

from _blocks import backends_here

BACKENDS = [b for b in backends_here("cpu") if b != "triton"]
COMPILED = [b for b in BACKENDS if b != "reference"]
DTYPES = [torch.float32, torch.bfloat16]


def _stock_add_relu(y, weight, bias, residual):
    return torch.relu(F.batch_norm(y, None, None, weight, bias, True, 0.0, 1e-5) + residual)


def _stock_relu_conv(y, weight, bias, conv_weight):
    return F.conv2d(torch.relu(F.batch_norm(y, None, None, weight, bias, True, 0.0, 1e-5)), conv_weight, None, 2, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_batch_norm_add_relu_matches_stock(backend, dtype, channels_last):
    y, weight, bias = bn_inputs(dtype, channels_last)
    residual = torch.randn(y.shape, dtype=torch.float64).contiguous(memory_format=torch.channels_last
                                                                    if channels_last else torch.contiguous_format)

    def fused(y, weight, bias, residual):
        with fastcnn.use_backend(backend):
            out, mean, var = ops.batch_norm_add_relu(y, weight, bias, 1e-5, residual)
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        expected_mean, expected_var = y.detach().double().mean((0, 2, 3)), y.detach().double().var((0, 2, 3), False)
        torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(var.double(), expected_var, rtol=1e-5, atol=1e-5)
        return out

    compare_with_stock(fused, _stock_add_relu, [y, weight, bias, residual], dtype, y.shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_batch_norm_relu_conv2d_matches_stock(backend, dtype, channels_last):
    y, weight, bias = bn_inputs(dtype, channels_last)
    conv_weight = torch.randn(4, y.shape[1], 3, 3, dtype=torch.float64)

    def fused(y, weight, bias, conv_weight):
        with fastcnn.use_backend(backend):
            return ops.batch_norm_relu_conv2d(y, weight, bias, 1e-5, conv_weight, 2, 1)[0]

    out_shape = _stock_relu_conv(y.double(), weight, bias, conv_weight).shape
    compare_with_stock(fused, _stock_relu_conv, [y, weight, bias, conv_weight], dtype, out_shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_scale_shift_add_relu_matches_stock(backend, dtype, channels_last):
    y, scale, shift = bn_inputs(dtype, channels_last, (2, 5, 7, 3))
    residual = torch.randn(y.shape, dtype=torch.float64)

    def stock(y, scale, shift, residual):
        return torch.relu(y * scale.reshape(1, -1, 1, 1).to(y.dtype) + shift.reshape(1, -1, 1, 1).to(y.dtype)
                          + residual)

    def fused(*args):
        with fastcnn.use_backend(backend):
            return ops.scale_shift_add_relu(*args)

    compare_with_stock(fused, stock, [y, scale, shift, residual], dtype, y.shape)


@pytest.mark.parametrize("backend", COMPILED + [b for b in backends_here("cpu") if b == "triton"])
def test_gradcheck_float64(backend):
    y, weight, bias = bn_inputs(torch.float64, False, (2, 3, 3, 4))
    residual = torch.randn(y.shape, dtype=torch.float64)
    conv_weight = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    y, weight, bias, residual, conv_weight = [t.clone().requires_grad_() for t in (y, weight, bias, residual,
                                                                                    conv_weight)]
    with fastcnn.use_backend(backend):
        assert torch.autograd.gradcheck(lambda *a: ops.batch_norm_add_relu(*a[:3], 1e-5, a[3])[0],
                                        (y, weight, bias, residual), fast_mode=True)
        assert torch.autograd.gradcheck(lambda *a: ops.batch_norm_relu_conv2d(*a[:3], 1e-5, a[3], 1, 1)[0],
                                        (y, weight, bias, conv_weight), fast_mode=True)
        assert torch.autograd.gradcheck(ops.scale_shift_add_relu, (y, weight, bias, residual), fast_mode=True)


@pytest.mark.parametrize("backend", COMPILED)
def test_opcheck(backend):
    y, weight, bias = bn_inputs(torch.float32, True, (2, 3, 5, 4))
    residual, conv_weight = torch.randn(y.shape), torch.randn(2, 3, 3, 3)
    grad_y = [t.requires_grad_() for t in (y.clone(), weight.float(), bias.float(), residual)]
    gate = (torch.rand(y.shape) > 0.5).to(torch.uint8)
    torch.library.opcheck(torch.ops.fastcnn.scale_shift_add_relu.default, (*grad_y[:3], grad_y[3], True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    differentiable = [  # with torch.compile's AOT dispatch
        (torch.ops.fastcnn.batch_norm_add_relu.default, (*grad_y, 1e-5)),
        (torch.ops.fastcnn.batch_norm_relu_conv2d.default,
         (*grad_y[:3], conv_weight.requires_grad_(), [1, 1], [1, 1], [1, 1], 1, 1e-5)),
    ]
    for op, args in differentiable:
        torch.library.opcheck(op, args)
    # The pieces below are only called inside the ops above (no autograd of their own).
    pieces = [
        (torch.ops.fastcnn.batch_norm_stats.default, (y,)),
        (torch.ops.fastcnn.batch_norm_backward_reduce.default, (residual, gate, y, weight.float())),
        (torch.ops.fastcnn.batch_norm_backward_elemt.default,
         (residual, gate, y, weight.float(), bias.float(), weight.float(), None, True)),
    ]
    for op, args in pieces:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_statistics_are_deterministic_across_thread_counts(backend, channels_last):
    y, _, _ = bn_inputs(torch.float32, channels_last, (4, 16, 37, 41))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.fastcnn.batch_norm_stats(y)
        torch.set_num_threads(max(2, threads))
        many = torch.ops.fastcnn.batch_norm_stats(y)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


@pytest.mark.parametrize("call, message", [
    (lambda y: ops.batch_norm_add_relu(y[:, :, :1, :1], None, None, 1e-5), "more than 1 value per channel"),
    (lambda y: ops.batch_norm_add_relu(y[:, :, 0, 0], None, None, 1e-5), "4-D"),
    (lambda y: ops.scale_shift_add_relu(y, torch.ones(2), torch.zeros(3)), "scale must have shape"),
    (lambda y: ops.scale_shift_add_relu(y, None, torch.zeros(3), torch.zeros(1, 3, 2, 2)), "residual must have"),
])
def test_bad_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.randn(1, 3, 2, 3))
