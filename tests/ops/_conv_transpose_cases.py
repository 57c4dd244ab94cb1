"""Shared pieces of the transposed-convolution tests: cases, integer inputs, the stock computation and the runner."""
import torch
import torch.nn.functional as F

import fastcnn

from _blocks import forward_backward

# (kernel, stride, padding, output_padding, dilation, groups): the decoder's two shapes first, then the general case.
CASES = [(2, 2, 0, 0, 1, 1), (4, 2, 1, 0, 1, 1), (3, 2, 1, 1, 1, 1), (3, 3, 2, 2, 2, 2), (2, 3, 0, 1, 1, 1),
         (2, 2, 1, 1, 1, 2), (1, 1, 0, 0, 1, 1)]


def case_id(case):
    return "k{}s{}p{}op{}d{}g{}".format(*case)


def case_args(case, activation):
    """The op's (stride, padding, output_padding, groups, dilation, activation) for a case."""
    _, stride, padding, output_padding, dilation, groups = case
    return (stride,) * 2, (padding,) * 2, (output_padding,) * 2, groups, (dilation,) * 2, activation


def integer_inputs(n, c_in, c_out, size, kernel, groups=1, dtype=torch.float32, channels_last=False, bias=True):
    """Small integers: every sum is exact in every dtype, so fused and stock agree bit for bit."""
    x = torch.randint(-2, 3, (n, c_in, *size)).to(dtype)
    w = torch.randint(-1, 2, (c_in, c_out // groups, *kernel)).to(dtype)
    b = torch.randint(-1, 2, (c_out,)).to(dtype) if bias else None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, w, b


def stock(x, w, b, stride, padding, output_padding, groups, dilation, activation):
    y = F.conv_transpose2d(x, w, b, stride, padding, output_padding, groups, dilation)
    return F.relu(y) if activation == "relu" else y


def fused(x, w, b, *args):
    return fastcnn.functional.conv_transpose2d(x, w, b, *args)


def assert_exactly_stock(backend, x, w, b, args):
    """Forward and all three gradients bit-equal to stock PyTorch's; output in the input's memory format."""
    with fastcnn.use_backend(backend):
        out, grad_out, grads = forward_backward(lambda *t: fused(*t, *args), (x, w, b))
    expected, _, expected_grads = forward_backward(lambda *t: stock(*t, *args), (x, w, b), grad_out)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    fmt = torch.channels_last if not x.is_contiguous() else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    for name, got, ref in zip(("input", "weight", "bias"), grads, expected_grads):
        if ref is not None:
            torch.testing.assert_close(got, ref, atol=0, rtol=0, msg=lambda m: f"grad {name}: {m}")
