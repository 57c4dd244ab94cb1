"""The fused Conv2d + bias + ReLU + pool Triton kernels against the plain-PyTorch oracle, under the Triton interpreter.

The kernels are called directly on CPU tensors under Triton's interpreter, which tests/conftest.py turns on for
GPU-less machines (scripts/gpu_check.sh runs this file with TRITON_INTERPRET=1 on the GPU machine). Interpreted vs
compiled is fixed when Triton is imported, so this module never flips it itself. Shapes are tiny and odd: the
interpreter runs every program in numpy.
"""
import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("interpreter tests: run with TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastcnn.ops.conv_relu_pool.reference import bias_relu_pool, bias_relu_pool_backward, conv2d_relu_pool  # noqa: E402
from fastcnn.triton_kernels import conv_relu_pool as kernels  # noqa: E402

# (N, Cin, Cout, H, W, kernel, stride, padding, dilation, groups, pool, pool_size, pool_stride)
CASES = {
    "none_k3p0": (1, 3, 5, 7, 9, 3, 1, 0, 1, 1, "none", 1, 1),
    "max2s2_k3p1": (2, 4, 6, 8, 7, 3, 1, 1, 1, 1, "max", 2, 2),
    "avg2s2_k3p2": (1, 5, 7, 7, 6, 3, 1, 2, 1, 1, "avg", 2, 2),
    "max3s2_k4p2": (1, 3, 5, 7, 6, 4, 1, 2, 1, 1, "max", 3, 2),
    "avg2s1_k3s2p1": (1, 4, 5, 11, 9, 3, 2, 1, 1, 1, "avg", 2, 1),
    "max3s1_dil2": (1, 3, 4, 7, 8, 3, 1, 2, 2, 1, "max", 3, 1),
    "none_groups2_s2": (1, 4, 6, 9, 7, 3, 2, 1, 1, 2, "none", 1, 1),
    "avg2s1_groups2": (1, 6, 4, 7, 7, 3, 1, 1, 1, 2, "avg", 2, 1),
    "max2s2_k1": (2, 20, 17, 7, 5, 1, 1, 0, 1, 1, "max", 2, 2),
}


def _make(case, dtype=torch.float32, channels_last=False, bias=True):
    n, cin, cout, h, w, k, st, pad, dil, groups, pool, ps, pst = case
    x = torch.randn(n, cin, h, w)
    weight = torch.randn(cout, cin // groups, k, k) / (cin // groups * k * k) ** 0.5
    b = torch.randn(cout) * 0.5 if bias else None
    if channels_last:
        x, weight = x.to(memory_format=torch.channels_last), weight.to(memory_format=torch.channels_last)
    args = ((st, st), (pad, pad), (dil, dil), groups, pool, (ps, ps), (pst, pst))
    return x.to(dtype), weight.to(dtype), None if b is None else b.to(dtype), args


def _forward(x, weight, b, args):
    ref = conv2d_relu_pool(x.float(), weight.float(), None if b is None else b.float(), *args)
    fmt = torch.channels_last if x.dim() == 4 and not x.is_contiguous() else torch.contiguous_format
    out = torch.empty(ref.shape, dtype=x.dtype).contiguous(memory_format=fmt)
    code = torch.empty(ref.shape if args[4] != "none" else (0,), dtype=torch.uint8)
    if args[4] != "none":
        code = code.contiguous(memory_format=fmt)
    kernels.conv2d_relu_pool_forward(x, weight, b, *args, out, code)
    return out, code


def _backward(grad, out, code, x, weight, args, need=(True, True, True)):
    gx, gw, gb = torch.empty_like(x), torch.empty_like(weight), weight.new_empty(weight.shape[0])
    gx, gw, gb = (t if keep else None for t, keep in zip((gx, gw, gb), need))
    kernels.conv2d_relu_pool_backward(grad, out, code, x, weight, *args, gx, gw, gb)
    return gx, gw, gb


def _close(actual, expected, rel):
    """Max error at most ``rel`` of the reference's largest magnitude (scale-free, as fla's err ratio)."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rel, atol=rel * max(scale, 1e-6))


def _reference_grads(grad, x, weight, b, args):
    leaves = [t.detach().double().requires_grad_() for t in (x, weight) + ((b,) if b is not None else ())]
    y = conv2d_relu_pool(leaves[0], leaves[1], leaves[2] if b is not None else None, *args)
    return torch.autograd.grad(y, leaves, grad.double())


def _check_fp32(case, channels_last=False, bias=True):
    x, weight, b, args = _make(case, channels_last=channels_last, bias=bias)
    out, code = _forward(x, weight, b, args)
    _close(out, conv2d_relu_pool(x, weight, b, *args), 1e-4)
    if args[4] != "none":
        stride, padding, dilation, groups = args[:4]
        _, ref_code = bias_relu_pool(F.conv2d(x, weight, None, stride, padding, dilation, groups), b, *args[4:])
        assert torch.equal(code, ref_code)
    grad = torch.randn_like(out)
    if channels_last:
        grad = grad.contiguous(memory_format=torch.channels_last)
    got = _backward(grad, out, code, x, weight, args, need=(True, True, bias))
    for g, r in zip(got, _reference_grads(grad, x, weight, b, args)):
        _close(g, r, 1e-4)


@pytest.mark.parametrize("name", list(CASES))
def test_fp32_forward_backward(name):
    _check_fp32(CASES[name])


@pytest.mark.parametrize("name", ["max2s2_k3p1", "avg2s1_groups2", "none_k3p0"])
def test_channels_last(name):
    _check_fp32(CASES[name], channels_last=True)


def test_bias_none_and_skipped_grads():
    _check_fp32(CASES["max2s2_k3p1"], bias=False)
    x, weight, b, args = _make(CASES["avg2s2_k3p2"])
    out, code = _forward(x, weight, b, args)
    grad = torch.randn(out.shape[1], 1, 1).expand(out.shape)  # strides (0, 1, 0, 0): addressed through strides
    gx, gw, gb = _backward(grad, out, code, x, weight, args, need=(False, True, False))
    assert gx is None and gb is None
    _close(gw, _reference_grads(grad, x, weight, b, args)[1], 1e-4)


def test_split_reductions(monkeypatch):
    """Force one reduction step per split so the deterministic two-pass wgrad/dbias path runs with many splits."""
    real = kernels.split_count
    monkeypatch.setattr(kernels, "split_count", lambda tiles, iters: real(tiles, iters, 10**9, 1))
    _check_fp32((2, 3, 5, 7, 9, 1, 1, 0, 1, 1, "none", 1, 1))
    _check_fp32((2, 4, 3, 9, 10, 1, 1, 0, 1, 1, "max", 2, 2))


@pytest.mark.parametrize("name", ["max2s2_k3p1", "avg2s1_k3s2p1", "none_groups2_s2"])
def test_fp16(name):
    """fp16 against a float64 oracle fed the kernel's own (out, code), so near-ties at fp16 rounding can't flip it."""
    x, weight, b, args = _make(CASES[name], dtype=torch.float16)
    out, code = _forward(x, weight, b, args)
    _close(out, conv2d_relu_pool(x.double(), weight.double(), b.double(), *args), 1e-2)
    grad = torch.randn_like(out)
    stride, padding, dilation, groups, pool, ps, pst = args
    conv = F.conv2d(x.double(), weight.double(), None, stride, padding, dilation, groups)
    grad_conv = bias_relu_pool_backward(grad.double(), out.double(), code, conv.shape[2:], pool, ps, pst)
    expected = (torch.nn.grad.conv2d_input(x.shape, weight.double(), grad_conv, stride, padding, dilation, groups),
                torch.nn.grad.conv2d_weight(x.double(), weight.shape, grad_conv, stride, padding, dilation, groups),
                grad_conv.sum((0, 2, 3)))
    for g, r in zip(_backward(grad, out, code, x, weight, args), expected):
        assert g.dtype == torch.float16
        _close(g, r, 1e-2)


@pytest.mark.parametrize("name", ["max2s2_k3p1", "none_groups2_s2"])
def test_bf16_forward(name):
    x, weight, b, args = _make(CASES[name], dtype=torch.bfloat16)
    out, _ = _forward(x, weight, b, args)
    assert out.dtype == torch.bfloat16
    _close(out, conv2d_relu_pool(x.double(), weight.double(), b.double(), *args), 2e-2)


@pytest.mark.parametrize("name", ["max2s2_k3p1", "max3s1_dil2"])
def test_max_propagates_nan(name):
    x, weight, b, args = _make(CASES[name])
    x[0, 0, 2, 3] = float("nan")
    x[0, -1, 5, 1] = float("nan")
    out, code = _forward(x, weight, b, args)
    stride, padding, dilation, groups = args[:4]
    ref_out, ref_code = bias_relu_pool(F.conv2d(x, weight, None, stride, padding, dilation, groups), b, *args[4:])
    assert out.isnan().any()
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4, equal_nan=True)
    assert torch.equal(code, ref_code)
