"""The Triton backend of the fused BatchNorm ops (TRITON_INTERPRET=1 on CPU, compiled on a GPU): each primitive op
against the reference, the ops through autograd against the reference backend (float64 oracle, 2x the reference's
error), determinism, routing and argument errors; opcheck and torch.compile on the GPU. (Its float64 gradcheck is
in test_batch_norm.py.)"""
import pytest
import torch
import torch.nn.functional as F
from _batch_norm_cases import bn_inputs, compare_with_stock

import fastcnn
from fastcnn.ops import _dispatch, why_unavailable
from fastcnn.ops import batch_norm as ops
from fastcnn.ops.batch_norm import reference

from _tolerances import assert_close_to_oracle

pytestmark = pytest.mark.skipif(why_unavailable("triton", "cpu") is not None,
                                reason=f"Triton cannot run on CPU here: {why_unavailable('triton', 'cpu')}")

# Under the interpreter (see fastcnn.triton_kernels.batch_norm.tiling) the first shape has two tiles per image, the
# last partial; the second has one partial tile per image and an odd number of tiles, so its last chunk ends past the
# last image.
SHAPES = [(2, 5, 7, 3), (3, 3, 5, 3)]
FORMATS = [pytest.param(False, id="nchw"), pytest.param(True, id="nhwc")]


def _kernels():
    from fastcnn.ops.batch_norm.register_triton import KERNELS
    return KERNELS


def _per_channel(*values, dtype):
    return [v.to(reference.accumulation_dtype(dtype)) for v in values]


@pytest.mark.parametrize("shape", SHAPES, ids=["2x5x7x3", "3x3x5x3"])
@pytest.mark.parametrize("channels_last", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_primitives_match_reference(dtype, channels_last, shape):
    kernels = _kernels()
    y, scale, shift = bn_inputs(dtype, channels_last, shape)
    y = y + 40  # |mean| >> std: sum-of-squares statistics would cancel here
    scale, shift = _per_channel(scale, shift - 40 * scale, dtype=dtype)
    residual = torch.randn(shape).to(dtype)
    grad_out = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last if channels_last
                                                       else torch.contiguous_format)

    mean, var = kernels.stats(y)
    for r, e, o in zip((mean, var), reference.batch_norm_stats(y), reference.batch_norm_stats(y.double())):
        assert_close_to_oracle(r, e, o, "stats")

    out, mask = kernels.apply(y, scale, shift, residual, True)
    expected, _ = reference.scale_shift_add_relu(y, scale, shift, residual, False)
    exact, _ = reference.scale_shift_add_relu(y.double(), scale.double(), shift.double(), residual.double(), False)
    assert out.stride() == y.stride() and mask.stride() == y.stride()
    assert_close_to_oracle(out, expected, exact, "out")
    assert torch.equal(mask, (~(out <= 0)).to(torch.uint8)), "mask must be 'not out <= 0' of the output"
    assert 0 < mask.sum() < mask.numel()

    # The gate as the saved uint8 mask and as a recomputed activation (of the input's dtype).
    for gate in (mask, out):
        sums = kernels.backward_reduce(grad_out, gate, y, mean)
        expected = reference.batch_norm_backward_reduce(grad_out, gate, y, mean)
        exact = reference.batch_norm_backward_reduce(grad_out.double(), gate.double(), y.double(), mean.double())
        for r, e, o in zip(sums, expected, exact):
            assert_close_to_oracle(r, e, o, "backward_reduce")
        b, d = _per_channel(torch.rand(shape[1]) / 30, torch.randn(shape[1]), dtype=dtype)
        grads = kernels.backward_elemt(grad_out, gate, y, mean, scale, b, d, True)
        expected = reference.batch_norm_backward_elemt(grad_out, gate, y, mean, scale, b, d, True)
        exact = reference.batch_norm_backward_elemt(grad_out.double(), gate.double(), y.double(), mean.double(),
                                                    scale.double(), b.double(), d.double(), True)
        for r, e, o in zip(grads, expected, exact):
            assert r.stride() == y.stride()
            assert_close_to_oracle(r, e, o, "backward_elemt")


def _forced(backend, op):
    def run(*args):
        with fastcnn.use_backend(backend):
            return op(*args)
    return run


def _add_relu(y, weight, bias, residual):
    return ops.batch_norm_add_relu(y, weight, bias, 1e-5, residual)[0]


def _relu_conv(y, weight, bias, conv_weight):
    return ops.batch_norm_relu_conv2d(y, weight, bias, 1e-5, conv_weight, 2, 1)[0]


@pytest.mark.parametrize("channels_last", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ops_match_reference_backend(dtype, channels_last):
    y, weight, bias = bn_inputs(dtype, channels_last, SHAPES[0])
    residual = torch.randn(y.shape, dtype=torch.float64)
    conv_weight = torch.randn(4, y.shape[1], 3, 3, dtype=torch.float64)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    with fastcnn.use_backend("triton"):
        out, mean, var = ops.batch_norm_add_relu(y, weight.float(), bias.float(), 1e-5, residual.to(dtype))
    assert out.is_contiguous(memory_format=fmt)
    for r, e, o in zip((mean, var), reference.batch_norm_stats(y), reference.batch_norm_stats(y.double())):
        assert_close_to_oracle(r, e, o, "stats")

    compare_with_stock(_forced("triton", _add_relu), _forced("reference", _add_relu), [y, weight, bias, residual],
                       dtype, y.shape)
    out_shape = F.conv2d(y.double(), conv_weight, None, 2, 1).shape
    compare_with_stock(_forced("triton", _relu_conv), _forced("reference", _relu_conv),
                       [y, weight, bias, conv_weight], dtype, out_shape)
    compare_with_stock(_forced("triton", ops.scale_shift_add_relu), _forced("reference", ops.scale_shift_add_relu),
                       [y, weight, bias, residual], dtype, y.shape)


@pytest.mark.parametrize("channels_last", FORMATS)
def test_reductions_are_deterministic(channels_last):
    kernels = _kernels()
    y, _, _ = bn_inputs(torch.float32, channels_last, (3, 5, 7, 3))
    grad_out, gate = torch.randn_like(y), torch.rand_like(y) - 0.3
    mean = y.mean((0, 2, 3))
    first = (*kernels.stats(y), *kernels.backward_reduce(grad_out, gate, y, mean))
    second = (*kernels.stats(y), *kernels.backward_reduce(grad_out, gate, y, mean))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_triton_is_never_chosen_for_cpu_tensors_unless_forced(monkeypatch):
    assert _dispatch.route(ops.ROUTES, torch.randn(1, 2, 2, 2)) != "triton"
    monkeypatch.setattr(_dispatch, "TRITON_INTERPRET", False)
    with fastcnn.use_backend("triton"), pytest.raises(RuntimeError, match="only under its interpreter"):
        ops.scale_shift_add_relu(torch.randn(1, 2, 2, 2), None, torch.zeros(2))


@pytest.mark.parametrize("call, message", [
    (lambda k, y: k.apply(y, torch.ones(3, dtype=torch.float64), torch.zeros(3), None, False), "scale must be a"),
    (lambda k, y: k.apply(y, None, torch.zeros(3), torch.zeros(1, 3, 2, 3, dtype=torch.bfloat16), False),
     "residual must match"),
    (lambda k, y: k.backward_elemt(y, torch.zeros(1, 3, 2, 3, dtype=torch.int32), y, None, torch.ones(3), None,
                                   None, False), "gate must match"),
    (lambda k, y: k.stats(y[0]), "input must be a non-empty 4-D"),
])
def test_bad_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call(_kernels(), torch.randn(1, 3, 2, 3))


def test_opcheck_add_relu():
    """The training op's registered fake and autograd (its fake-tensor and AOT tests never run the kernels, so they
    pass under the interpreter too; the Triton ops themselves are opchecked on the GPU below)."""
    from fastcnn.ops.batch_norm import register_triton as triton_ops
    y, weight, bias = bn_inputs(torch.float32, True, (2, 3, 5, 4))
    leaves = [t.float().requires_grad_() for t in (y, weight, bias, torch.randn(y.shape))]
    torch.library.opcheck(triton_ops.TRAINING.batch_norm_add_relu, (*leaves, 1e-5))


@pytest.mark.cuda
@pytest.mark.parametrize("channels_last", FORMATS)
def test_opcheck_and_compile_cuda(channels_last):
    from fastcnn.ops.batch_norm import register_triton as triton_ops
    y, weight, bias = (t.cuda().float() for t in bn_inputs(torch.float32, channels_last, (4, 16, 9, 11)))
    residual, conv_weight = torch.randn_like(y), torch.randn(8, 16, 3, 3, device="cuda")
    gate = (torch.rand_like(y) > 0.5).to(torch.uint8)
    leaves = [t.clone().requires_grad_() for t in (y, weight, bias, residual)]
    torch.library.opcheck(triton_ops.scale_shift_add_relu_triton, (*leaves, True))
    torch.library.opcheck(triton_ops.TRAINING.batch_norm_add_relu, (*leaves, 1e-5))
    torch.library.opcheck(triton_ops.TRAINING.batch_norm_relu_conv2d,
                          (*leaves[:3], conv_weight.requires_grad_(), [1, 1], [1, 1], [1, 1], 1, 1e-5))
    torch.library.opcheck(triton_ops.batch_norm_stats_triton, (y,))
    torch.library.opcheck(triton_ops.batch_norm_backward_reduce_triton, (residual, gate, y, weight))
    torch.library.opcheck(triton_ops.batch_norm_backward_elemt_triton,
                          (residual, gate, y, weight, bias, weight, None, True))

    def step(y, weight, bias, residual):
        return ops.batch_norm_add_relu(y, weight, bias, 1e-5, residual)[0]

    with fastcnn.use_backend("triton"):
        torch.testing.assert_close(torch.compile(step, fullgraph=True)(y, weight, bias, residual),
                                   step(y, weight, bias, residual))


@pytest.mark.cuda
@pytest.mark.parametrize("channels_last", FORMATS)
def test_training_step_is_not_pathologically_slow_cuda(channels_last):
    """A guard against regressions such as uncoalesced loads (several times slower), not the performance target
    (benchmarks/bench_residual.py measures that): BatchNorm + add + ReLU forward + backward on a ResNet layer2-sized
    bf16 tensor within 1.5x of stock PyTorch's."""
    from triton.testing import do_bench
    y, weight, bias = bn_inputs(torch.bfloat16, channels_last, (32, 256, 28, 28))
    y, residual = y.cuda(), torch.randn_like(y, device="cuda")
    weight, bias = weight.float().cuda().requires_grad_(), bias.float().cuda().requires_grad_()
    y.requires_grad_()
    grad_out = torch.randn_like(y)

    def fused():
        with fastcnn.use_backend("triton"):
            out = ops.batch_norm_add_relu(y, weight, bias, 1e-5, residual)[0]
        out.backward(grad_out)

    def stock():
        out = torch.relu(F.batch_norm(y, None, None, weight, bias, True, 0.0, 1e-5) + residual)
        out.backward(grad_out)

    fused_ms, stock_ms = do_bench(fused), do_bench(stock)
    assert fused_ms <= 1.5 * stock_ms, f"triton {fused_ms:.3f} ms vs stock {stock_ms:.3f} ms"
