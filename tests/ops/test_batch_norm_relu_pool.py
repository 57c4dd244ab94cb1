"""fastcnn.ops.batch_norm.batch_norm_relu_pool (training-mode BatchNorm + ReLU + pool on a conv output) against stock PyTorch:
every backend here, dtypes, memory formats, odd sizes, pools; the conv bias's zero gradient; float64 gradcheck,
opcheck and argument errors."""
import pytest
import torch

import fastcnn
from fastcnn.ops.batch_norm import batch_norm_relu_pool
from fastcnn.ops.batch_norm.reference import batch_norm_relu_pool as stock

from _blocks import backends_here
from _tolerances import assert_close_to_oracle

BACKENDS = [b for b in backends_here("cpu") if b != "triton"]
POOLS = [("max", (2, 2), (2, 2)), ("avg", (2, 2), (2, 2)), ("max", (3, 3), (2, 2)), ("none", (1, 1), (1, 1))]
EPS = 1e-5


@pytest.fixture(autouse=True)
def _threads(one_intra_op_thread):
    yield


def _inputs(dtype, channels_last, size=(7, 13), channels=5):
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("pool", POOLS, ids=lambda p: f"{p[0]}{p[1][0]}s{p[2][0]}")
def test_matches_stock(backend, dtype, channels_last, pool):
    tensors = _inputs(dtype, channels_last)
    oracle, grad_out = _run(lambda *t: stock(t[0], t[1], t[2], t[3], EPS, *pool),
                            [t.double() for t in tensors])
    reference, _ = _run(lambda *t: stock(t[0], t[1], t[2], t[3], EPS, *pool), tensors, grad_out)
    with fastcnn.use_backend(backend):
        result, _ = _run(lambda *t: batch_norm_relu_pool(t[0], t[1], t[2], t[3], EPS, *pool), tensors, grad_out)
    assert result[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    names = ["out", "mean", "var", "grad y", "grad y_bias", "grad weight", "grad bias"]
    for name, ours, theirs, exact in zip(names, result, reference, oracle):
        if name == "grad y_bias":  # analytically zero: stock's is its rounding residue
            assert_close_to_oracle(ours, theirs, torch.zeros_like(exact), name)
        else:
            assert_close_to_oracle(ours, theirs.to(ours.dtype), exact, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    y, _, weight, bias = (t.double() for t in _inputs(torch.float64, True, size=(5, 6), channels=3))
    for pool in POOLS[:2]:
        with fastcnn.use_backend(backend):
            assert torch.autograd.gradcheck(lambda *t: batch_norm_relu_pool(*t, None, EPS, *pool)[0],
                                            [t.requires_grad_() for t in (y, weight, bias)])


@pytest.mark.skipif("cpu" not in BACKENDS, reason="fastcnn._C is not built here")
def test_opcheck():
    op = torch.ops.fastcnn.batch_norm_relu_pool.default
    for channels_last, pool in ((False, POOLS[0]), (True, POOLS[1]), (True, POOLS[3])):
        y, y_bias, weight, bias = _inputs(torch.float64, channels_last, size=(4, 6), channels=3)
        args = (y.requires_grad_(), y_bias.requires_grad_(), weight.double().requires_grad_(),
                bias.double().requires_grad_(), EPS, pool[0], list(pool[1]), list(pool[2]))
        torch.library.opcheck(op, args)


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
def test_bad_arguments_are_named(call, error, message):
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


@pytest.mark.skipif("cpu" not in BACKENDS, reason="fastcnn._C is not built here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("pool", POOLS, ids=lambda p: f"{p[0]}{p[1][0]}s{p[2][0]}")
def test_scaled_epilogue_matches_stock(dtype, channels_last, pool):
    conv, _, scale, bias = _inputs(dtype, channels_last)
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


@pytest.mark.skipif("cpu" not in BACKENDS, reason="fastcnn._C is not built here")
def test_scaled_epilogue_gradcheck_and_opcheck():
    conv, _, scale, bias = (t.double() for t in _inputs(torch.float64, True, size=(4, 6), channels=3))
    for pool in POOLS[:2]:
        args = [t.detach().requires_grad_() for t in (conv, bias, scale)]
        assert torch.autograd.gradcheck(
            lambda c, b, s: torch.ops.fastcnn.bias_relu_pool(c, b, pool[0], list(pool[1]), list(pool[2]), s)[0], args)
        torch.library.opcheck(torch.ops.fastcnn.bias_relu_pool.default,
                              (*args[:2], pool[0], list(pool[1]), list(pool[2]), args[2]))
    with pytest.raises(RuntimeError, match="scale must have the convolution's dtype"):
        torch.ops.fastcnn.bias_relu_pool(conv.float(), None, "max", [2, 2], [2, 2], scale.half())
