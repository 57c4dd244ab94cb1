"""The CPU kernels of the BatchNorm backward pieces (fastcnn::batch_norm_backward_reduce / _elemt) against the
plain-PyTorch reference: channel counts that leave vector tails (3, 5, 17), both layouts, uint8 mask and tensor
gates, every optional argument, channel slices read in place, and sums that do not depend on the thread count."""
import itertools

import pytest
import torch

from fastcnn import _extension
from fastcnn.ops.batch_norm import reference

from _tolerances import assert_close_to_oracle

pytestmark = pytest.mark.skipif(not (_extension.LOADED and hasattr(torch.ops.fastcnn, "batch_norm_backward_reduce")),
                                reason="fastcnn._C with the BatchNorm ops is not built")

SHAPE = (3, None, 11, 13)  # 429 pixels: two NHWC chunks of 256 rows; planes of 143 = 17 * 8 + 7 values


def _fmt(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


def _inputs(channels, channels_last, gate_kind, dtype, shape=SHAPE):
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("gate_kind", ["mask", "tensor"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("channels", [3, 5, 17])
def test_reduce_and_elemt_match_reference(channels, channels_last, gate_kind, dtype):
    grad_out, gate, x, mean, a, b, d = _inputs(channels, channels_last, gate_kind, dtype)
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


@pytest.mark.parametrize("gate_kind", ["mask", "tensor"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_channel_slices_give_the_dense_result(channels_last, gate_kind):
    """grad_out and gate as channel slices of larger tensors (read in place), and other strides (copied), give
    exactly what their dense copies give."""
    grad_out, gate, x, mean, a, b, d = _in_dtype(_inputs(5, channels_last, gate_kind, torch.float32),
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


@pytest.mark.parametrize("gate_kind", ["mask", "tensor"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_sums_do_not_depend_on_the_thread_count(channels_last, gate_kind):
    grad_out, gate, x, mean, a, b, d = _in_dtype(_inputs(17, channels_last, gate_kind, torch.float32,
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


@pytest.mark.parametrize("call, message", [
    (lambda g, x: torch.ops.fastcnn.batch_norm_backward_reduce(g[:, :2], (g > 0).byte(), x, None),
     "grad_out must match"),
    (lambda g, x: torch.ops.fastcnn.batch_norm_backward_reduce(g, (g > 0).int(), x, None), "gate must be a uint8"),
    (lambda g, x: torch.ops.fastcnn.batch_norm_backward_elemt(g, g, x, torch.zeros(2), torch.ones(3), None, None,
                                                              False), "mean must have shape"),
])
def test_bad_arguments_are_named(call, message):
    with pytest.raises(RuntimeError, match=message):
        call(torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5))
