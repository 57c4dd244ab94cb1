"""The one-call BatchNorm ops the residual blocks' training path runs on CPU (fastcnn::batch_norm_backward,
fastcnn::batch_norm_scale_shift) give the bits of the compositions they replace (the reduce and elemt ops with the
per-channel math as tensor ops), in both layouts, every dtype, both gate kinds, with and without dz, on a channel
slice read in place; the running statistics' update gives the composition's bits; and a training step's backward
allocates no full-size zero gradient for the outputs nobody differentiates (the uint8 mask)."""
import copy

import pytest
import torch
from torchvision.models import resnet as tv

import fastcnn
from fastcnn import _extension
from fastcnn.ops.batch_norm import _training

pytestmark = pytest.mark.skipif(
    not (_extension.LOADED and all(hasattr(torch.ops.fastcnn, op) for op in
                                   ("batch_norm_backward", "batch_norm_scale_shift", "batch_norm_backward_reduce"))),
    reason="fastcnn._C with the one-call BatchNorm ops is not built")


def _composite():
    from fastcnn.ops.batch_norm.register import KERNELS
    return _training._composite_backward(KERNELS._replace(backward=None, scale_shift=None))


def _case(dtype, channels_last, gate_kind, channels=17, shape=(3, 11, 13)):
    torch.manual_seed(0)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    full = (shape[0], channels, *shape[1:])
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    y = (torch.randn(full) * 2 + 0.5).to(dtype).contiguous(memory_format=fmt)
    grad = torch.randn(full).to(dtype).contiguous(memory_format=fmt)
    if gate_kind == "mask":
        gate = (torch.rand(full) > 0.4).to(torch.uint8).contiguous(memory_format=fmt)
    else:
        gate = torch.randn(full).relu().to(dtype).contiguous(memory_format=fmt)
    weight = torch.rand(channels, dtype=acc) + 0.5
    mean, var = torch.ops.fastcnn.batch_norm_stats(y)
    return grad, gate, y, weight, mean, var


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("gate_kind", ["mask", "tensor"])
@pytest.mark.parametrize("want_dz", [False, True])
def test_backward_is_bitwise_the_composition(dtype, channels_last, gate_kind, want_dz):
    grad, gate, y, weight, mean, var = _case(dtype, channels_last, gate_kind)
    got = torch.ops.fastcnn.batch_norm_backward(grad, gate, y, weight, mean, var, 1e-5, want_dz)
    expected = _composite()(grad, gate, y, weight, mean, var, 1e-5, want_dz)
    for name, g, e in zip(("grad_y", "grad_weight", "grad_bias", "dz"), got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape and g.stride() == e.stride(), name
        assert torch.equal(g, e), name


@pytest.mark.parametrize("channels_last", [False, True])
def test_backward_reads_a_channel_slice_of_the_gradient_in_place(channels_last):
    grad, gate, y, weight, mean, var = _case(torch.float32, channels_last, "tensor")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    wide = torch.randn(grad.shape[0], grad.shape[1] + 5, *grad.shape[2:]).contiguous(memory_format=fmt)
    wide[:, 2:2 + grad.shape[1]] = grad
    view = wide.narrow(1, 2, grad.shape[1])
    got = torch.ops.fastcnn.batch_norm_backward(view, gate, y, weight, mean, var, 1e-3, True)
    expected = torch.ops.fastcnn.batch_norm_backward(grad, gate, y, weight, mean, var, 1e-3, True)
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scale_shift_is_bitwise_the_composition(dtype):
    torch.manual_seed(1)
    weight, bias, mean = torch.randn(3, 37, dtype=dtype)
    var = torch.rand(37, dtype=dtype) * 3
    got = torch.ops.fastcnn.batch_norm_scale_shift(weight, bias, mean, var, 1e-5)
    expected = _training._scale_shift(weight, bias, mean, var, 1e-5)
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


def test_scale_shift_refuses_mismatched_arguments():
    ok = torch.ones(4)
    with pytest.raises(RuntimeError, match="share one shape"):
        torch.ops.fastcnn.batch_norm_scale_shift(ok, torch.ones(5), ok, ok, 1e-5)
    with pytest.raises(RuntimeError, match="share one shape"):
        torch.ops.fastcnn.batch_norm_scale_shift(ok, ok, ok.double(), ok, 1e-5)


@pytest.mark.skipif(not hasattr(torch.ops.fastcnn, "batch_norm_update_running"), reason="older fastcnn._C")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("factor", [0.1, 1 / 3])
def test_running_statistics_update_is_bitwise_the_composition(dtype, factor):
    torch.manual_seed(2)
    running = [torch.randn(37, dtype=dtype), torch.rand(37, dtype=dtype) + 0.5]
    mean, var = torch.randn(37, dtype=dtype), torch.rand(37, dtype=dtype) * 2
    expected = [r.clone() for r in running]
    for r, b in zip(expected, (mean, var * (3136 / 3135))):
        r.copy_(r * (1 - factor) + b * factor)
    torch.ops.fastcnn.batch_norm_update_running(*running, mean, var, factor, 3136)
    assert all(torch.equal(r, e) for r, e in zip(running, expected))


def test_training_backward_allocates_no_zero_gradient_for_the_mask():
    torch.manual_seed(0)
    block = fastcnn.convert(copy.deepcopy(tv.Bottleneck(32, 8)))
    x = torch.randn(2, 32, 9, 9, requires_grad=True)
    with fastcnn.use_backend("cpu"):
        out = block(x)
        with torch.profiler.profile(record_shapes=True) as prof:
            out.backward(torch.randn_like(out))
    def ancestors(event):
        while event.cpu_parent is not None:
            event = event.cpu_parent
            yield event.name

    # (ATen's slow 1x1 convolution backward zeroes its own grad_input: not the blocks' doing)
    full = [e for e in prof.events() if e.name == "aten::fill_" and e.input_shapes
            and list(e.input_shapes[0]) == list(out.shape) and not any("conv" in a for a in ancestors(e))]
    assert not full, [list(ancestors(e)) for e in full]
