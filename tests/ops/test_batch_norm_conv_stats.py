"""conv2d_batch_stats (a bias-free Conv2d and the batch statistics of its output) on every backend, and the fused
BatchNorm training ops fed those statistics: the Triton kernel that reduces them in the convolution's epilogue
(TRITON_INTERPRET=1 on CPU) against F.conv2d and the reference statistics of the rounded output, determinism,
gradients against the reference backend, the composite backends, float64 gradcheck, opcheck, errors; speed against
cuDNN + a separate statistics pass, opcheck and torch.compile of the Triton op on the GPU."""
import pytest
import torch
import torch.nn.functional as F

import fastcnn
from fastcnn.ops import batch_norm as bn_ops
from fastcnn.ops import why_unavailable
from fastcnn.ops.batch_norm import conv2d_batch_stats, reference

from _tolerances import assert_close_to_oracle

needs_triton = pytest.mark.skipif(why_unavailable("triton", "cpu") is not None,
                                  reason=f"Triton cannot run on CPU here: {why_unavailable('triton', 'cpu')}")

# (C_in, C_out, kernel, stride, padding, groups) on a 2 x C_in x 7 x 5 input. Under the interpreter the first case
# spans two M tiles of 64 pixels, the last one partial.
CASES = {
    "k3p1s1": (3, 5, 3, 1, 1, 1),
    "k3p1s2": (3, 5, 3, 2, 1, 1),
    "grouped": (4, 6, 3, 1, 1, 2),
    "1x1": (3, 5, 1, 1, 0, 1),
}
FORMATS = [pytest.param(False, id="nchw"), pytest.param(True, id="nhwc")]


def _inputs(case, dtype, channels_last, requires_grad=False):
    c_in, c_out, k, stride, padding, groups = CASES[case]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(2, c_in, 7, 5) + 3).to(dtype).contiguous(memory_format=fmt)  # |mean| > std in the output
    w = (torch.randn(c_out, c_in // groups, k, k) / k).to(dtype)
    return x.requires_grad_(requires_grad), w.requires_grad_(requires_grad), dict(stride=stride, padding=padding,
                                                                                    groups=groups)


def _check_against_stock(x, w, args, y, mean, var):
    stock = F.conv2d(x.detach(), w.detach(), None, **args)
    assert y.shape == stock.shape and y.stride() == stock.stride() and y.dtype == x.dtype
    assert_close_to_oracle(y.detach(), stock, F.conv2d(x.detach().double(), w.detach().double(), None, **args), "y")
    # The statistics are those of the rounded y, as a separate statistics pass over y would see them.
    for name, r, e, o in zip(("mean", "var"), (mean, var), reference.batch_norm_stats(y.detach()),
                             reference.batch_norm_stats(y.detach().double())):
        assert r.dtype == reference.accumulation_dtype(x.dtype) and not r.requires_grad
        assert_close_to_oracle(r, e, o, name)


@needs_triton
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("channels_last", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_matches_stock_and_is_deterministic(case, channels_last, dtype):
    x, w, args = _inputs(case, dtype, channels_last)
    with fastcnn.use_backend("triton"):
        y, mean, var = conv2d_batch_stats(x, w, **args)
        again = conv2d_batch_stats(x, w, **args)
    _check_against_stock(x, w, args, y, mean, var)
    for first, second in zip((y, mean, var), again):
        assert torch.equal(first, second), "two runs must give the same bits"


@needs_triton
@pytest.mark.parametrize("case", ["k3p1s2", "grouped"])
@pytest.mark.parametrize("channels_last", FORMATS)
def test_triton_gradients_match_reference(case, channels_last):
    x, w, args = _inputs(case, torch.float32, channels_last, requires_grad=True)
    grad_y = torch.randn_like(F.conv2d(x.detach(), w.detach(), None, **args))
    grads = {}
    for backend, dtype in (("triton", torch.float32), ("reference", torch.float32), ("reference", torch.float64)):
        xi, wi = (t.detach().to(dtype).requires_grad_() for t in (x, w))
        with fastcnn.use_backend(backend):
            y, mean, var = conv2d_batch_stats(xi, wi, **args)
        assert not (mean.requires_grad or var.requires_grad), "the statistics are not differentiable"
        y.backward(grad_y.to(dtype))
        grads[backend, dtype] = (xi.grad, wi.grad)
    for i, name in enumerate(("grad_input", "grad_weight")):
        assert_close_to_oracle(grads["triton", torch.float32][i], grads["reference", torch.float32][i],
                               grads["reference", torch.float64][i], name)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("channels_last", FORMATS)
def test_composite_backends(backend, channels_last):
    if why_unavailable(backend, "cpu") is not None:
        pytest.skip(why_unavailable(backend, "cpu"))
    for dtype in (torch.float32, torch.float64):
        x, w, args = _inputs("grouped", dtype, channels_last)
        with fastcnn.use_backend(backend):
            y, mean, var = conv2d_batch_stats(x, w, **args)
        _check_against_stock(x, w, args, y, mean, var)
    x, w, args = _inputs("k3p1s2", torch.float64, channels_last, requires_grad=True)
    with fastcnn.use_backend(backend):
        assert torch.autograd.gradcheck(lambda a, b: conv2d_batch_stats(a, b, **args)[0], (x[:1, :, :4], w),
                                        fast_mode=True)


def _bn_params(channels, dtype):
    return torch.rand(channels, dtype=dtype) + 0.5, torch.randn(channels, dtype=dtype)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "cpu"])
def test_training_ops_take_the_statistics(backend):
    """batch_norm_add_relu / batch_norm_relu_conv2d(_stats) given y's statistics match the reference (which
    recomputes them and differentiates through them): values, output statistics and every gradient."""
    if why_unavailable(backend, "cpu") is not None:
        pytest.skip(why_unavailable(backend, "cpu"))
    x, w, args = _inputs("k3p1s1", torch.float32, True)
    conv2 = (torch.randn(5, 5, 3, 3) / 3).requires_grad_()
    gamma, beta = (t.requires_grad_() for t in _bn_params(5, torch.float32))

    def block(backend_name, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, gamma, beta, conv2)]
        xi, g, b, c2 = leaves
        with fastcnn.use_backend(backend_name):
            y, mean, var = conv2d_batch_stats(xi, w.to(dtype), **args)
            z, mean1, var1, z_mean, z_var = bn_ops.batch_norm_relu_conv2d_stats(y, g, b, 1e-5, c2, padding=1,
                                                                                stats=(mean, var))
            out = bn_ops.batch_norm_add_relu(z, g, b, 1e-5, xi[:, :1].expand_as(z), stats=(z_mean, z_var))[0]
        assert not (z_mean.requires_grad or z_var.requires_grad)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=dtype).reshape(out.shape))
        return [out, mean1, var1, z_mean, z_var] + [t.grad for t in leaves]

    names = ("out", "mean", "var", "out_mean", "out_var", "grad_x", "grad_gamma", "grad_beta", "grad_conv")
    for name, r, e, o in zip(names, block(backend, torch.float32), block("reference", torch.float32),
                             block("reference", torch.float64)):
        assert_close_to_oracle(r.detach(), e.detach(), o.detach(), name)


@pytest.mark.skipif(why_unavailable("cpu", "cpu") is not None, reason="fastcnn._C is not built")
def test_opcheck_training_op_with_statistics():
    y = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    mean, var = reference.batch_norm_stats(y.detach())
    gamma, beta = (t.requires_grad_() for t in _bn_params(3, torch.float64))
    conv = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.fastcnn.batch_norm_relu_conv2d_stats.default,
                          (y, gamma, beta, conv, [1, 1], [1, 1], [1, 1], 1, 1e-5, mean, var))


def test_errors_name_the_argument():
    x, w, args = _inputs("k3p1s1", torch.float32, False)
    with pytest.raises(ValueError, match="weight"):
        conv2d_batch_stats(x, w[:, :2], **args)
    with pytest.raises(ValueError, match="empty output"):
        conv2d_batch_stats(x[:0], w, **args)
    with pytest.raises(ValueError, match="mean must have shape"):
        bn_ops.batch_norm_add_relu(x, None, None, 1e-5, stats=(torch.zeros(2), torch.ones(3)))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_triton_matches_stock_opcheck_and_compile(dtype):
    x = torch.randn(4, 32, 17, 13, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(48, 32, 3, 3, device="cuda", dtype=dtype) / 10
    op = torch.ops.fastcnn.conv2d_batch_stats_triton.default
    y, mean, var = op(x, w, [1, 1], [1, 1], [1, 1], 1)
    _check_against_stock(x, w, dict(padding=1), y, mean, var)
    torch.library.opcheck(op, (x, w.requires_grad_(), [2, 2], [1, 1], [1, 1], 1))
    compiled = torch.compile(lambda a, b: op(a, b, [1, 1], [1, 1], [1, 1], 1), fullgraph=True)
    assert all(torch.equal(r, e) for r, e in zip(compiled(x, w), (y, mean, var)))


@pytest.mark.cuda
def test_gpu_fused_statistics_not_slower_than_cudnn_plus_separate_pass():
    """The fused epilogue against cuDNN's convolution followed by fastcnn's Triton statistics pass (ResNet layer2
    3x3 shape, bf16 channels_last); recorded, and guarded against pathological slowness (2x)."""
    from triton.testing import do_bench

    from fastcnn.ops.batch_norm.register_triton import KERNELS
    x = torch.randn(32, 128, 28, 28, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w = torch.randn(128, 128, 3, 3, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    op = torch.ops.fastcnn.conv2d_batch_stats_triton.default
    fused = do_bench(lambda: op(x, w, [1, 1], [1, 1], [1, 1], 1))
    separate = do_bench(lambda: KERNELS.stats(F.conv2d(x, w, None, 1, 1)))
    print(f"conv+stats fused {fused:.3f} ms, cuDNN + separate stats {separate:.3f} ms")
    assert fused < 2 * separate
