"""The fused Conv2d + bias + ReLU (+ pool) op on every backend available here, against stock PyTorch: exact on
small-integer data, random values against a float64 oracle, gradcheck, the saved code, bad input (a clear error naming
the argument, never a crash or a silent wrong answer), torch.library registration (opcheck, torch.compile) and
Hypothesis-drawn shapes. The Triton kernels called directly: test_conv_relu_pool_triton.py."""
import pytest
import torch
import torch.nn.functional as F

import fastcnn
from fastcnn import _extension
from fastcnn.ops.conv_relu_pool import reference

from _blocks import (
    LECTURE_CASES,
    POOL_CASES,
    assert_compiles_like_eager,
    backends_here,
    device_backends,
    forward_backward,
    integer_inputs,
    saved_bytes,
    stock,
)
from _hypothesis import given, st
from _tolerances import assert_close_to_oracle

DEVICE_BACKENDS = device_backends()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
POOLS = POOL_CASES + [("max", (3, 3), (2, 2))]
needs_cpp = pytest.mark.skipif(not _extension.LOADED, reason="fastcnn._C is not built")


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
@pytest.mark.parametrize("pool,pool_size,pool_stride", POOLS)
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
@pytest.mark.parametrize("pool,pool_size,pool_stride", POOLS)
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


# ---------------------------------------------------------------------------------------------------------------------
# bad input


def _bad_inputs():
    return torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(4)


@pytest.mark.parametrize("backend", backends_here("cpu"))
@pytest.mark.parametrize("mutate,error,match", [
    (lambda x, w, b: (x[:, :2], w, b), ValueError, "input has 2 channels"),
    (lambda x, w, b: (x[0, 0], w, b), ValueError, "input must be 4-D"),
    (lambda x, w, b: (x[None], w, b), ValueError, "input must be 4-D"),
    (lambda x, w, b: (x[..., :2, :2], w, b), ValueError, "smaller than the kernel"),
    (lambda x, w, b: (x[..., :3, :3], w, b), ValueError, "smaller than pool_size"),
    (lambda x, w, b: (x, w, b.double()), TypeError, "bias has dtype torch.float64"),
    (lambda x, w, b: (x, w.half(), b), TypeError, "weight has dtype torch.float16"),
    (lambda x, w, b: (x.long(), w, b), TypeError, "input must be float32"),
    (lambda x, w, b: (x, w, b.to("meta")), ValueError, "bias is on meta"),
    (lambda x, w, b: (x, w, b[:3]), ValueError, r"bias must have shape \(4,\)"),
    (lambda x, w, b: (x, w[..., 0], b), ValueError, "weight must be 4-D"),
    (lambda x, w, b: (x, "w", b), TypeError, "weight must be a Tensor"),
])
def test_bad_tensors(backend, mutate, error, match):
    x, w, b = mutate(*_bad_inputs())
    with fastcnn.use_backend(backend), pytest.raises(error, match=match):
        fastcnn.functional.conv2d_relu_pool(x, w, b)


@pytest.mark.parametrize("kwargs,match", [
    (dict(stride=0), "stride must be >= 1"),
    (dict(padding=-1), "padding must be >= 0"),
    (dict(dilation=(1, 2, 3)), "dilation must be an int or a pair"),
    (dict(groups=2), "weight of shape"),
    (dict(pool="min"), "pool must be one of"),
    (dict(pool_size=0), "pool_size must be >= 1"),
    (dict(pool="avg", pool_size=3), "at most 8 elements"),
    (dict(padding="full"), "padding must be an int, a pair, 'valid' or 'same'"),
    (dict(padding="same", stride=2), "not supported for strided"),
])
def test_bad_arguments(kwargs, match):
    x, w, b = _bad_inputs()
    with pytest.raises(ValueError, match=match):
        fastcnn.functional.conv2d_relu_pool(x, w, b, **kwargs)


def test_forcing_an_unavailable_backend_says_why():
    x, w, b = _bad_inputs()
    with fastcnn.use_backend("cuda"), pytest.raises(RuntimeError, match="cuda backend runs on CUDA tensors only"):
        fastcnn.functional.conv2d_relu_pool(x, w, b)
    with pytest.raises(ValueError, match="backend must be one of"):
        fastcnn.set_backend("cudnn")


def test_module_rejects_bad_pool_arguments():
    with pytest.raises(ValueError, match="pool must be 'max' or 'avg'"):
        fastcnn.nn.ConvReLUPool2d(3, 4, 3, pool="none")
    with pytest.raises(ValueError, match="pool_stride must be >= 1"):
        fastcnn.nn.ConvReLUPool2d(3, 4, 3, pool_stride=0)


# ---------------------------------------------------------------------------------------------------------------------
# torch.library registration: opcheck (schema, fake kernels, autograd registration, aot_dispatch) and
# torch.compile(fullgraph=True). On a GPU-less machine this covers the C++ CPU ops; the Triton ops are checked this way
# on the GPU (the interpreter touches fake tensors' data, so it cannot run under fake mode).


def _devices():
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@needs_cpp
@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("pool,pool_size,pool_stride", POOLS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_opcheck_cpp_ops(device, pool, pool_size, pool_stride, channels_last):
    x, w, b = (t.to(device) for t in integer_inputs(2, 4, 6, (9, 8), (3, 3), groups=2,
                                                            channels_last=channels_last))
    args = ([1, 1], [1, 1], [1, 1], 2, pool, list(pool_size), list(pool_stride))
    torch.library.opcheck(torch.ops.fastcnn.conv2d_relu_pool,
                          (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), *args))
    out, code = torch.ops.fastcnn.conv2d_relu_pool(x.detach(), w.detach(), b.detach(), *args)
    grad = torch.randn_like(out)
    torch.library.opcheck(torch.ops.fastcnn.conv2d_relu_pool_backward,
                          (grad, out, code, x.detach(), w.detach(), *args, [True, True, True]))
    conv = torch.nn.functional.conv2d(x.detach(), w.detach(), None, 1, 1, 1, 2)
    torch.library.opcheck(torch.ops.fastcnn.bias_relu_pool,
                          (conv.requires_grad_(), b.detach().requires_grad_(), pool, list(pool_size),
                           list(pool_stride)))
    torch.library.opcheck(torch.ops.fastcnn.bias_relu_pool_backward,
                          (grad, out, code, list(conv.shape[2:]), pool, list(pool_size), list(pool_stride), True))


@pytest.mark.cuda
@pytest.mark.parametrize("pool,pool_size,pool_stride", POOLS)
def test_opcheck_triton_op(pool, pool_size, pool_stride):
    x, w, b = (t.cuda().requires_grad_() for t in integer_inputs(2, 4, 6, (9, 8), (3, 3), groups=2))
    op = fastcnn.ops.conv_relu_pool.register_triton.conv2d_relu_pool_triton
    torch.library.opcheck(op, (x, w, b, [1, 1], [1, 1], [1, 1], 2, pool, list(pool_size), list(pool_stride)))


def _compile_backends():
    backends = []
    if _extension.LOADED:
        backends += ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
    return backends + ["reference", pytest.param("triton", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("backend", _compile_backends())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_module_under_torch_compile_fullgraph(backend, channels_last):
    device = "cuda" if backend in ("cuda", "triton") else "cpu"
    block = fastcnn.nn.ConvReLUPool2d(3, 8, 3, padding=1).to(device)
    x = torch.randn(2, 3, 12, 10, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert_compiles_like_eager(block, x, backend)


# ---------------------------------------------------------------------------------------------------------------------
# Hypothesis-drawn shapes, on integer data so the comparison with stock PyTorch is exact

HYPOTHESIS_BACKENDS = [b for b in backends_here("cpu") if b != "triton"]  # the interpreter: too slow for many examples


@given(data=st.data())
def test_random_shapes_match_stock_exactly(data):
    """Hypothesis-drawn shapes: odd and prime sizes, groups, dilation, strides, 1x1 kernels, batch 1."""
    groups = data.draw(st.sampled_from([1, 2, 3]), "groups")
    c_in = groups * data.draw(st.integers(1, 4), "c_in per group")
    c_out = groups * data.draw(st.integers(1, 4), "c_out per group")
    kernel = data.draw(st.tuples(st.sampled_from([1, 2, 3, 5]), st.sampled_from([1, 2, 3])), "kernel")
    stride = data.draw(st.tuples(st.integers(1, 3), st.integers(1, 3)), "stride")
    padding = data.draw(st.tuples(st.integers(0, 2), st.integers(0, 2)), "padding")
    dilation = data.draw(st.tuples(st.integers(1, 2), st.integers(1, 2)), "dilation")
    pool, pool_size, pool_stride = data.draw(st.sampled_from(POOLS), "pool")
    min_size = [dilation[i] * (kernel[i] - 1) + 1 - 2 * padding[i] + stride[i] * (pool_size[i] - 1) for i in (0, 1)]
    size = tuple(data.draw(st.integers(max(1, min_size[i]), 17), f"size{i}") for i in (0, 1))
    batch = data.draw(st.sampled_from([1, 2, 3]), "batch")
    dtype = data.draw(st.sampled_from(DTYPES), "dtype")
    channels_last = data.draw(st.booleans(), "channels_last")
    backend = data.draw(st.sampled_from(HYPOTHESIS_BACKENDS), "backend")
    x, w, b = integer_inputs(batch, c_in, c_out, size, kernel, groups, dtype, channels_last,
                             bias=data.draw(st.booleans(), "bias"))
    assert_exactly_stock(backend, x, w, b, stride, padding, dilation, groups, pool, pool_size, pool_stride)


@needs_cpp
@pytest.mark.stock_routes
def test_small_cpu_calls_route_to_stock_unless_fastcnn_is_asked_for():
    """Below SMALL_OUTPUT convolution-output elements (N * C_out * H * W) the CPU route table runs stock PyTorch
    (measured faster there) - counted at the output, so a first layer (3 channels in, 16 out) is large; a forced
    backend or skip_stock_routes() runs fastcnn's kernel; larger calls run it by default."""
    from fastcnn.ops.conv_relu_pool import SMALL_OUTPUT, runs_stock

    w = torch.randn(8, 8, 3, 3)
    small, large = torch.randn(1, 8, 8, 8), torch.randn(1, 8, 128, 128)
    first_layer, w_first = torch.randn(2, 3, 64, 64), torch.randn(16, 3, 3, 3)
    conv = ((1, 1), (1, 1), (1, 1), 1)  # stride, padding, dilation, groups
    assert small.numel() < first_layer.numel() < SMALL_OUTPUT <= 2 * 16 * 64 * 64
    assert runs_stock(small, w, "relu-pool", *conv)
    assert not runs_stock(large, w, "relu-pool", *conv) and not runs_stock(first_layer, w_first, "relu-pool", *conv)
    assert runs_stock(small.double(), w.double(), "relu-pool", *conv)  # any dtype: the cost is per call
    assert not runs_stock(small.numpy(), w, "relu-pool", *conv)  # not a tensor: the op's checks name the argument
    with fastcnn.ops.skip_stock_routes():
        assert not runs_stock(small, w, "relu-pool", *conv)
    with fastcnn.use_backend("cpu"):
        assert not runs_stock(small, w, "relu-pool", *conv)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the op routes on the cast dtype
        assert not runs_stock(small, w, "relu-pool", *conv)


@needs_cpp
@pytest.mark.stock_routes
def test_cpu_conv_relu_without_pool_routes_to_stock():
    """With no pool to fuse, the CPU route table runs stock (measured faster at every size) unless the convolution
    is fastcnn's Winograd; with a pool, fastcnn's kernel; skip_stock_routes() runs fastcnn's kernel for both."""
    from fastcnn.ops._dispatch import route
    from fastcnn.ops.conv_relu_pool import ROUTES

    x = torch.randn(1, 8, 128, 128)
    assert route(ROUTES, x, mode="relu") == "reference"
    assert route(ROUTES, x, mode="relu-pool") == "cpu"
    assert route(ROUTES, x, mode="relu", size="winograd") == "cpu"  # a convolution faster than stock's
    with fastcnn.ops.skip_stock_routes():
        assert route(ROUTES, x, mode="relu") == "cpu"


@needs_cpp
@pytest.mark.stock_routes
def test_nchw_conv_relu_runs_fastcnns_where_autograd_records_it_and_the_weight_gradient_is_winograds():
    """Without a pool an NCHW call runs fastcnn's op only where autograd records it (mode "relu-train"), its
    weight gradient is Winograd's (size "winograd" whatever the layout) and its output has at least
    WEIGHT_GRAD_WIN_OUTPUT elements; inference, thin and smaller layers run stock. The ConvReLU2d module follows the
    same route, remembered per mode, and gives stock's gradients."""
    from fastcnn.ops.conv_relu_pool import WEIGHT_GRAD_WIN_OUTPUT, route_mode, runs_stock

    x, weight, bias = torch.randn(2, 128, 40, 40), torch.randn(128, 128, 3, 3) * 0.03, torch.randn(128)
    thin_x, thin_w = torch.randn(2, 16, 32, 32), torch.randn(32, 16, 3, 3)
    small_x = torch.randn(2, 128, 28, 28)  # Winograd's weight gradient, but fewer output elements
    assert small_x.numel() < WEIGHT_GRAD_WIN_OUTPUT <= x.numel()
    conv = ((1, 1), (1, 1), (1, 1), 1)
    assert route_mode("max", x, weight, bias) == "relu-pool" and route_mode("none", x, weight, bias) == "relu"
    weight.requires_grad_()
    assert route_mode("none", x, weight, bias) == "relu-train"
    assert not runs_stock(x, weight, "relu-train", *conv) and runs_stock(x, weight, "relu", *conv)
    assert runs_stock(thin_x, thin_w, "relu-train", *conv) and runs_stock(small_x, weight, "relu-train", *conv)
    with torch.no_grad():
        assert route_mode("none", x, weight, bias) == "relu"

    layer = fastcnn.nn.ConvReLU2d(128, 128, 3, padding=1)
    stock = torch.nn.Sequential(torch.nn.Conv2d(128, 128, 3, padding=1), torch.nn.ReLU())
    stock[0].load_state_dict(layer.state_dict())
    x.requires_grad_()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.no_grad():
            layer(x)
        out = layer(x)
    assert sum(e.name == "fastcnn::conv2d_relu_pool" for e in prof.events()) == 1  # the recorded call only
    assert len(layer.__dict__["_stock_route_memo"]) == 2  # one answer per mode
    grad_out = torch.randn(out.shape, dtype=torch.float64)
    out.backward(grad_out.float())
    expected = torch.autograd.grad(stock(x), (x, stock[0].weight), grad_out.float())
    x64 = x.detach().double().requires_grad_()
    oracle = torch.autograd.grad(stock.double()(x64), (x64, stock[0].weight), grad_out)
    for name, got, ref, exact in zip(("input", "weight"), (x.grad, layer.weight.grad), expected, oracle):
        assert_close_to_oracle(got, ref, exact, f"grad {name}")
