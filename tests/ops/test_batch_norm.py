"""The fused BatchNorm ops against stock PyTorch: values and gradients (float64 oracle, 2x stock's error), both
memory formats, odd sizes, gradcheck (the triton backend's too; its other tests are in test_batch_norm_triton.py),
opcheck, determinism and argument errors; the CPU kernels of the backward pieces (fastcnn::batch_norm_backward_reduce
/ _elemt) against the reference; and batch_norm_relu_pool (training-mode BatchNorm + ReLU + pool on a conv output)
with the epilogue's per-channel scale. The convolution with the batch statistics in its epilogue:
test_batch_norm_conv_stats.py."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from _batch_norm_cases import bn_inputs, compare_with_stock

import fastcnn
from fastcnn import _extension
from fastcnn.ops import batch_norm as ops
from fastcnn.ops.batch_norm import batch_norm_relu_pool, reference
from fastcnn.ops.batch_norm.reference import batch_norm_relu_pool as stock_relu_pool

from _blocks import backends_here
from _tolerances import assert_close_to_oracle

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


# ---------------------------------------------------------------------------------------------------------------------
# The CPU kernels of the BatchNorm backward pieces (fastcnn::batch_norm_backward_reduce / _elemt) against the
# plain-PyTorch reference: channel counts that leave vector tails (3, 5, 17), both layouts, uint8 mask and tensor
# gates, every optional argument, channel slices read in place, and sums that do not depend on the thread count.

needs_backward_ops = pytest.mark.skipif(
    not (_extension.LOADED and hasattr(torch.ops.fastcnn, "batch_norm_backward_reduce")),
    reason="fastcnn._C with the BatchNorm ops is not built")

SHAPE = (3, None, 11, 13)  # 429 pixels: two NHWC chunks of 256 rows; planes of 143 = 17 * 8 + 7 values


def _fmt(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


def _backward_inputs(channels, channels_last, gate_kind, dtype, shape=SHAPE):
    """float64 (grad_out, gate, x, mean, a, b, d); the gate a uint8 mask or a tensor with zeros and a NaN."""
    shape = (shape[0], channels, *shape[2:])
    grad_out, x = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64) * 2 + 0.5
    if gate_kind == "mask":
        gate = (torch.rand(shape) > 0.4).to(torch.uint8)
    else:
        gate = torch.randn(shape, dtype=torch.float64).relu()
        gate.view(-1)[::7] = float("nan")  # NaN passes the gradient, as ReLU's backward does
    mean, a, b, d = torch.randn(4, channels, dtype=torch.float64)
    fmt = _fmt(channels_last)
    return [t.contiguous(memory_format=fmt) for t in (grad_out, gate, x)] + [mean, a, b, d]


def _in_dtype(tensors, dtype):
    """Full-size tensors in dtype (a uint8 mask stays), per-channel ones in the accumulation dtype; anything else
    (None, want_dz) unchanged."""
    acc = reference.accumulation_dtype(dtype)

    def convert(t):
        if not isinstance(t, torch.Tensor) or t.dtype == torch.uint8:
            return t
        return t.to(dtype if t.dim() == 4 else acc)

    return [convert(t) for t in tensors]


def _check_against_reference(op_name, args, dtype):
    """The CPU op on args in dtype; the reference in dtype is 'stock' and the reference in float64 the oracle."""
    low = _in_dtype(args, dtype)
    result = getattr(torch.ops.fastcnn, op_name)(*low)
    stock = getattr(reference, op_name)(*low)
    oracle = getattr(reference, op_name)(*args)
    for name, r, s, o in zip(("first", "second"), result, stock, oracle):
        assert r.dtype == s.dtype, f"{op_name} {name}: dtype {r.dtype} != {s.dtype}"
        if r.dim() == 4:
            assert r.is_contiguous(memory_format=reference.memory_format_of(low[2])), f"{op_name} {name}: layout"
        assert_close_to_oracle(r, s, o, f"{op_name} {name}")


@needs_backward_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("gate_kind", ["mask", "tensor"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("channels", [3, 5, 17])
def test_reduce_and_elemt_match_reference(channels, channels_last, gate_kind, dtype):
    grad_out, gate, x, mean, a, b, d = _backward_inputs(channels, channels_last, gate_kind, dtype)
    for with_mean in (True, False):
        _check_against_reference("batch_norm_backward_reduce", [grad_out, gate, x, mean if with_mean else None],
                                 dtype)
    for with_mean, with_b, with_d, want_dz in itertools.product((True, False), repeat=4):
        args = [grad_out, gate, x, mean if with_mean else None, a, b if with_b else None, d if with_d else None,
                want_dz]
        _check_against_reference("batch_norm_backward_elemt", args, dtype)


def _both_ops(grad_out, gate, x, mean, a, b, d):
    return (*torch.ops.fastcnn.batch_norm_backward_reduce(grad_out, gate, x, mean),
            *torch.ops.fastcnn.batch_norm_backward_elemt(grad_out, gate, x, mean, a, b, d, True))


@needs_backward_ops
@pytest.mark.parametrize("gate_kind", ["mask", "tensor"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_channel_slices_give_the_dense_result(channels_last, gate_kind):
    """grad_out and gate as channel slices of larger tensors (read in place), and other strides (copied), give
    exactly what their dense copies give."""
    grad_out, gate, x, mean, a, b, d = _in_dtype(_backward_inputs(5, channels_last, gate_kind, torch.float32),
                                                 torch.float32)
    dense = _both_ops(grad_out, gate, x, mean, a, b, d)

    def sliced(t):
        big = torch.zeros((t.shape[0], 12, *t.shape[2:]), dtype=t.dtype).contiguous(memory_format=_fmt(channels_last))
        big.narrow(1, 4, t.shape[1]).copy_(t)
        return big.narrow(1, 4, t.shape[1])

    def other_layout(t):
        return t.contiguous(memory_format=_fmt(not channels_last))

    def every_other_pixel(t):
        wide = torch.zeros((*t.shape[:3], 2 * t.shape[3]), dtype=t.dtype).contiguous(
            memory_format=_fmt(channels_last))
        wide[..., ::2].copy_(t)
        return wide[..., ::2]

    for view in (sliced, other_layout, every_other_pixel):
        results = _both_ops(view(grad_out), view(gate), x, mean, a, b, d)
        for r, e in zip(results, dense):
            assert torch.equal(r, e), view.__name__


@needs_backward_ops
@pytest.mark.parametrize("gate_kind", ["mask", "tensor"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_sums_do_not_depend_on_the_thread_count(channels_last, gate_kind):
    grad_out, gate, x, mean, a, b, d = _in_dtype(_backward_inputs(17, channels_last, gate_kind, torch.float32,
                                                         (4, None, 37, 41)), torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _both_ops(grad_out, gate, x, mean, a, b, d)
        torch.set_num_threads(max(2, threads))
        many = _both_ops(grad_out, gate, x, mean, a, b, d)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(p, q) for p, q in zip(one, many))


@needs_backward_ops
@pytest.mark.parametrize("call, message", [
    (lambda g, x: torch.ops.fastcnn.batch_norm_backward_reduce(g[:, :2], (g > 0).byte(), x, None),
     "grad_out must match"),
    (lambda g, x: torch.ops.fastcnn.batch_norm_backward_reduce(g, (g > 0).int(), x, None), "gate must be a uint8"),
    (lambda g, x: torch.ops.fastcnn.batch_norm_backward_elemt(g, g, x, torch.zeros(2), torch.ones(3), None, None,
                                                              False), "mean must have shape"),
])
def test_backward_pieces_bad_arguments_are_named(call, message):
    with pytest.raises(RuntimeError, match=message):
        call(torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5))


# ---------------------------------------------------------------------------------------------------------------------
# batch_norm_relu_pool (training-mode BatchNorm + ReLU + pool on a conv output): every backend here, dtypes, memory
# formats, odd sizes, pools; the conv bias's zero gradient; float64 gradcheck, opcheck and argument errors. One
# intra-op thread each (tiny tensors).

POOLS = [("max", (2, 2), (2, 2)), ("avg", (2, 2), (2, 2)), ("max", (3, 3), (2, 2)), ("none", (1, 1), (1, 1))]
EPS = 1e-5


one_thread = pytest.mark.usefixtures("one_intra_op_thread")


def _pool_inputs(dtype, channels_last, size=(7, 13), channels=5):
    y = (torch.randn(3, channels, *size) * 2 + 0.5).to(dtype)  # offset: the mean is not ~0
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
    weight, bias, y_bias = torch.rand(channels) + 0.5, torch.randn(channels), torch.randn(channels)
    return y, y_bias.to(dtype), weight.to(dtype), bias.to(dtype)  # as in a model converted to dtype


def _run(fn, tensors, grad_out=None):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out, mean, var = fn(*leaves)
    if grad_out is None:
        grad_out = torch.randn(out.shape, dtype=torch.float64)
    out.backward(grad_out.to(out.dtype))
    return (out.detach(), mean, var, *[t.grad for t in leaves]), grad_out


@one_thread
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("pool", POOLS, ids=lambda p: f"{p[0]}{p[1][0]}s{p[2][0]}")
def test_relu_pool_matches_stock(backend, dtype, channels_last, pool):
    tensors = _pool_inputs(dtype, channels_last)
    oracle, grad_out = _run(lambda *t: stock_relu_pool(t[0], t[1], t[2], t[3], EPS, *pool),
                            [t.double() for t in tensors])
    expected, _ = _run(lambda *t: stock_relu_pool(t[0], t[1], t[2], t[3], EPS, *pool), tensors, grad_out)
    with fastcnn.use_backend(backend):
        result, _ = _run(lambda *t: batch_norm_relu_pool(t[0], t[1], t[2], t[3], EPS, *pool), tensors, grad_out)
    assert result[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    names = ["out", "mean", "var", "grad y", "grad y_bias", "grad weight", "grad bias"]
    for name, ours, theirs, exact in zip(names, result, expected, oracle):
        if name == "grad y_bias":  # analytically zero: stock's is its rounding residue
            assert_close_to_oracle(ours, theirs, torch.zeros_like(exact), name)
        else:
            assert_close_to_oracle(ours, theirs.to(ours.dtype), exact, name)


@one_thread
@pytest.mark.parametrize("backend", BACKENDS)
def test_relu_pool_gradcheck_float64(backend):
    y, _, weight, bias = (t.double() for t in _pool_inputs(torch.float64, True, size=(5, 6), channels=3))
    for pool in POOLS[:2]:
        with fastcnn.use_backend(backend):
            assert torch.autograd.gradcheck(lambda *t: batch_norm_relu_pool(*t, None, EPS, *pool)[0],
                                            [t.requires_grad_() for t in (y, weight, bias)])


@one_thread
@pytest.mark.skipif("cpu" not in BACKENDS, reason="fastcnn._C is not built here")
def test_relu_pool_opcheck():
    op = torch.ops.fastcnn.batch_norm_relu_pool.default
    for channels_last, pool in ((False, POOLS[0]), (True, POOLS[1]), (True, POOLS[3])):
        y, y_bias, weight, bias = _pool_inputs(torch.float64, channels_last, size=(4, 6), channels=3)
        args = (y.requires_grad_(), y_bias.requires_grad_(), weight.double().requires_grad_(),
                bias.double().requires_grad_(), EPS, pool[0], list(pool[1]), list(pool[2]))
        torch.library.opcheck(op, args)


@one_thread
@pytest.mark.parametrize("call, error, message", [
    (lambda: batch_norm_relu_pool(torch.randn(3, 4, 5), None, None, None, EPS), ValueError, "expected 4D input"),
    (lambda: batch_norm_relu_pool(torch.randn(1, 4, 1, 1), None, None, None, EPS), ValueError,
     "more than 1 value per channel"),
    (lambda: batch_norm_relu_pool(torch.randn(2, 4, 3, 3), None, torch.ones(3), None, EPS), ValueError,
     r"weight must have shape \(4,\)"),
    (lambda: batch_norm_relu_pool(torch.randn(2, 4, 3, 3), torch.ones(5), None, None, EPS), ValueError,
     r"y_bias must have shape \(4,\)"),
    (lambda: batch_norm_relu_pool(torch.randn(2, 4, 3, 3), None, None, None, EPS, "max", 0), ValueError,
     "pool_size must be >= 1"),
])
def test_relu_pool_bad_arguments_are_named(call, error, message):
    with pytest.raises(error, match=message):
        call()


# --- the epilogue's per-channel scale: fastcnn::bias_relu_pool(conv, bias, ..., scale) = pool(relu(conv * s + b)) ---

def _stock_scaled_epilogue(conv, bias, scale, pool, pool_size, pool_stride):
    """Stock ops: BatchNorm's affine map in the accumulation dtype, one rounding, ReLU, pool."""
    acc = torch.float64 if conv.dtype == torch.float64 else torch.float32
    z = torch.relu((conv.to(acc) * scale.to(acc).view(1, -1, 1, 1) + bias.to(acc).view(1, -1, 1, 1)).to(conv.dtype))
    if pool == "max":
        return torch.nn.functional.max_pool2d(z, pool_size, pool_stride)
    return torch.nn.functional.avg_pool2d(z, pool_size, pool_stride) if pool == "avg" else z


@one_thread
@pytest.mark.skipif("cpu" not in BACKENDS, reason="fastcnn._C is not built here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("pool", POOLS, ids=lambda p: f"{p[0]}{p[1][0]}s{p[2][0]}")
def test_scaled_epilogue_matches_stock(dtype, channels_last, pool):
    conv, _, scale, bias = _pool_inputs(dtype, channels_last)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale, bias = scale.to(acc), bias.to(acc)  # BatchNorm's scale and shift, in the accumulation dtype
    args = [t.detach().requires_grad_() for t in (conv, bias, scale)]
    out, _code = torch.ops.fastcnn.bias_relu_pool(args[0], args[1], pool[0], list(pool[1]), list(pool[2]),
                                                  args[2])
    grad_out = torch.randn(out.shape, dtype=torch.float64)
    out.backward(grad_out.to(dtype))
    results = [out.detach()] + [t.grad for t in args]

    def stock_run(tensors):
        leaves = [t.detach().requires_grad_() for t in tensors]
        expected = _stock_scaled_epilogue(*leaves, *pool)
        expected.backward(grad_out.to(expected.dtype))
        return [expected.detach()] + [t.grad for t in leaves]

    stock, oracle = stock_run([conv, bias, scale]), stock_run([conv.double(), bias.double(), scale.double()])
    for name, ours, theirs, exact in zip(["out", "grad conv", "grad bias", "grad scale"], results, stock, oracle):
        assert_close_to_oracle(ours, theirs.to(ours.dtype), exact, name)


@one_thread
@pytest.mark.skipif("cpu" not in BACKENDS, reason="fastcnn._C is not built here")
def test_scaled_epilogue_gradcheck_and_opcheck():
    conv, _, scale, bias = (t.double() for t in _pool_inputs(torch.float64, True, size=(4, 6), channels=3))
    for pool in POOLS[:2]:
        args = [t.detach().requires_grad_() for t in (conv, bias, scale)]
        assert torch.autograd.gradcheck(
            lambda c, b, s: torch.ops.fastcnn.bias_relu_pool(c, b, pool[0], list(pool[1]), list(pool[2]), s)[0], args)
        torch.library.opcheck(torch.ops.fastcnn.bias_relu_pool.default,
                              (*args[:2], pool[0], list(pool[1]), list(pool[2]), args[2]))
    with pytest.raises(RuntimeError, match="scale must have the convolution's dtype"):
        torch.ops.fastcnn.bias_relu_pool(conv.float(), None, "max", [2, 2], [2, 2], scale.half())
