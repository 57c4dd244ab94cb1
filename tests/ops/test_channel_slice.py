"""fastcnn::scale_shift_relu_out (the store into a channel slice) and concat_branches (the Inception-style
concatenation without a concatenation copy): values against the plain-PyTorch reference and stock ops, strided
outputs in both memory formats, the in-place claim, float64 gradcheck, opcheck and argument errors."""
import pytest
import torch
import torch.nn.functional as F

import fastcnn
from fastcnn.ops import channel_slice as ops
from fastcnn.ops.channel_slice import BranchEpilogue

from _blocks import backends_here
from _tolerances import assert_close_to_oracle

BACKENDS = [b for b in backends_here("cpu") if b != "triton"]
COMPILED = [b for b in BACKENDS if b != "reference"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
FORMATS = [pytest.param(torch.contiguous_format, id="nchw"), pytest.param(torch.channels_last, id="nhwc")]


def _big_and_slice(shape, offset, total, dtype, memory_format):
    """(big, view): a (N, total, H, W) tensor of NaNs in memory_format and its channel slice of `shape`."""
    big = torch.full((shape[0], total, *shape[2:]), float("nan"), dtype=dtype).contiguous(memory_format=memory_format)
    return big, big.narrow(1, offset, shape[1])


def _stock(x, scale, shift):
    """relu(x * scale + shift) by stock ops in float64."""
    y = x.double() * (1 if scale is None else scale.double().reshape(1, -1, 1, 1)) + shift.double().reshape(1, -1, 1, 1)
    return torch.relu(y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_scale", [True, False], ids=["scale", "no-scale"])
def test_store_writes_the_slice_in_place_and_nothing_else(backend, memory_format, dtype, with_scale):
    shape, offset, total = (3, 5, 7, 6), 2, 13
    x = torch.randn(shape).to(dtype).contiguous(memory_format=memory_format)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.randn(shape[1], dtype=acc) if with_scale else None
    shift = torch.randn(shape[1], dtype=acc)
    big, view = _big_and_slice(shape, offset, total, dtype, memory_format)
    pointer = big.data_ptr()
    with fastcnn.use_backend(backend):
        ops.scale_shift_relu_out(x, scale, shift, view)
    assert big.data_ptr() == pointer and view.data_ptr() == pointer + offset * big.stride(1) * big.element_size()
    outside = torch.cat([big[:, :offset], big[:, offset + shape[1]:]], 1)
    assert torch.isnan(outside).all(), "elements outside the slice were written"
    expected = _stock(x, scale, shift)
    rounded = expected.to(dtype)  # the kernel computes in the accumulation dtype and rounds once, as stock's best
    assert_close_to_oracle(view, rounded, expected, "out")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed-hw", "strided-w", "nhwc-input-into-nchw", "single-channel"])
def test_store_into_other_strides(backend, layout):
    """out of any strides: transposed spatial dims, every other column, input and out in different layouts, C=1."""
    x = torch.randn(2, 3, 5, 7)
    if layout == "transposed-hw":
        out = torch.empty(2, 3, 7, 5).transpose(2, 3)
    elif layout == "strided-w":
        out = torch.empty(2, 3, 5, 14)[..., ::2]
    elif layout == "nhwc-input-into-nchw":
        x, out = x.contiguous(memory_format=torch.channels_last), torch.empty(2, 9, 5, 7)[:, 4:7]
    else:
        x, out = x[:, :1], torch.empty(2, 4, 5, 7, memory_format=torch.channels_last)[:, 3:]
    scale, shift = torch.randn(x.shape[1]), torch.randn(x.shape[1])
    with fastcnn.use_backend(backend):
        ops.scale_shift_relu_out(x, scale, shift, out)
    torch.testing.assert_close(out, _stock(x, scale, shift).float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_store_propagates_nan(backend):
    x = torch.tensor([float("nan"), -1.0, 2.0]).reshape(1, 1, 1, 3)
    out = torch.empty_like(x)
    with fastcnn.use_backend(backend):
        ops.scale_shift_relu_out(x, None, torch.zeros(1), out)
    assert torch.isnan(out[0, 0, 0, 0]) and out[0, 0, 0, 1:].tolist() == [0.0, 2.0]


def _branches(dtype, memory_format, requires_grad=False):
    """Three branches of 2, 3 and 4 channels on a 5x7 grid: folded (shift only), eval-mode affine, training BN."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ys = [torch.randn(3, c, 5, 7, dtype=dtype).contiguous(memory_format=memory_format) for c in (2, 3, 4)]
    shift, scale, shift1, gamma, beta = [torch.randn(c, dtype=acc).requires_grad_(requires_grad)
                                         for c in (2, 3, 3, 4, 4)]
    ys = [y.requires_grad_(requires_grad) for y in ys]
    return [BranchEpilogue(ys[0], None, shift), BranchEpilogue(ys[1], scale, shift1),
            BranchEpilogue(ys[2], gamma, beta, 1e-3)]


def _stock_concat(branches):
    """torch.cat of relu(norm(y)) with stock ops (F.batch_norm for the training branch)."""
    parts = []
    for y, weight, bias, eps in branches:
        if eps is None:
            scale = 1 if weight is None else weight.to(y.dtype).reshape(1, -1, 1, 1)
            parts.append(torch.relu(y * scale + bias.to(y.dtype).reshape(1, -1, 1, 1)))
        else:
            parts.append(torch.relu(F.batch_norm(y, None, None, weight.to(y.dtype), bias.to(y.dtype), True, 0.0, eps)))
    return torch.cat(parts, 1)


def _double(branches):
    return [BranchEpilogue(*(None if t is None else t.detach().double().requires_grad_() for t in b[:3]), b.eps)
            for b in branches]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory_format", FORMATS)
def test_concat_matches_stock_forward_backward_and_statistics(backend, memory_format):
    branches = _branches(torch.float32, memory_format, requires_grad=True)
    with fastcnn.use_backend(backend):
        out, stats = ops.concat_branches(branches, memory_format)
    stock = _stock_concat(branches)
    oracle_branches = _double(branches)
    oracle = _stock_concat(oracle_branches)
    assert out.is_contiguous(memory_format=memory_format) and out.shape == (3, 9, 5, 7)
    assert_close_to_oracle(out, stock, oracle, "out")
    assert stats[0] is None and stats[1] is None
    y = oracle_branches[2].input.detach()
    torch.testing.assert_close(stats[2][0].double(), y.mean((0, 2, 3)))
    torch.testing.assert_close(stats[2][1].double(), y.var((0, 2, 3), unbiased=False))
    grad = torch.randn(out.shape)
    leaves = [t for b in branches for t in b[:3] if t is not None]
    ours = torch.autograd.grad(out, leaves, grad)
    theirs = torch.autograd.grad(stock, leaves, grad)
    exact = torch.autograd.grad(oracle, [t for b in oracle_branches for t in b[:3] if t is not None], grad.double())
    for i, (a, b, c) in enumerate(zip(ours, theirs, exact)):
        assert_close_to_oracle(a, b, c, f"grad {i}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_concat_gradcheck_float64(backend):
    branches = _branches(torch.float64, torch.channels_last, requires_grad=True)
    leaves = [t for b in branches for t in b[:3]]

    def fn(*tensors):
        rebuilt = [BranchEpilogue(*tensors[3 * i:3 * i + 3], b.eps) for i, b in enumerate(branches)]
        return ops.concat_branches(rebuilt, torch.channels_last)[0]

    with fastcnn.use_backend(backend):
        assert torch.autograd.gradcheck(fn, [t for t in leaves], fast_mode=True)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("memory_format", FORMATS)
def test_opcheck(backend, memory_format):
    x = torch.randn(2, 3, 5, 4).contiguous(memory_format=memory_format)
    big = torch.empty(2, 7, 5, 4).contiguous(memory_format=memory_format)
    for scale in (torch.randn(3), None):
        torch.library.opcheck(torch.ops.fastcnn.scale_shift_relu_out.default, (x, scale, torch.randn(3),
                                                                               big.narrow(1, 2, 3)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_concat_under_compile(backend):
    branches = _branches(torch.float32, torch.channels_last, requires_grad=True)
    leaves = [t for b in branches for t in b[:3] if t is not None]

    def fn(*tensors):
        rebuilt, it = [], iter(tensors)
        for b in branches:
            rebuilt.append(BranchEpilogue(next(it), None if b.weight is None else next(it), next(it), b.eps))
        return ops.concat_branches(rebuilt, torch.channels_last)[0]

    with fastcnn.use_backend(backend):
        eager = fn(*leaves)
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(*leaves)
    torch.testing.assert_close(compiled, eager)
    grads = torch.autograd.grad(compiled.sum(), leaves)
    torch.testing.assert_close(grads, torch.autograd.grad(eager.sum(), leaves))


def test_errors_name_the_argument():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="out must have input's shape"):
        ops.scale_shift_relu_out(x, None, torch.zeros(3), torch.empty(2, 4, 4, 4))
    with pytest.raises(ValueError, match=r"scale must have shape \(3,\)"):
        ops.scale_shift_relu_out(x, torch.ones(2), torch.zeros(3), torch.empty_like(x))
    with pytest.raises(ValueError, match="shift is required"):
        ops.scale_shift_relu_out(x, None, None, torch.empty_like(x))
    with pytest.raises(ValueError, match="input must be a 4-D"):
        ops.scale_shift_relu_out(x[0], None, torch.zeros(3), torch.empty_like(x[0]))
    with pytest.raises(ValueError, match=r"branches\[1\] has"):
        ops.concat_branches([BranchEpilogue(x, None, torch.zeros(3)),
                             BranchEpilogue(torch.randn(2, 3, 5, 4), None, torch.zeros(3))])
    with pytest.raises(ValueError, match="at least one branch"):
        ops.concat_branches([])


@pytest.mark.parametrize("backend", COMPILED)
def test_kernel_rejects_overlap(backend):
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="single memory location"):
        torch.ops.fastcnn.scale_shift_relu_out(x, None, torch.zeros(3), x)
    with pytest.raises(RuntimeError, match="single memory location"):
        torch.ops.fastcnn.scale_shift_relu_out(x, None, torch.zeros(3), torch.empty(1).expand(2, 3, 4, 4))
