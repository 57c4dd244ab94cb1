"""fastcnn::bias_relu_pool_scaled_backward (the epilogue's backward with a BatchNorm scale, the frozen-BN path):
grad_conv = scale * dz, grad_bias = sum dz and grad_scale = sum dz * conv in the kernel's one pass, against the
composite it replaces (the unscaled backward, then the two products in PyTorch), and the autograd of
fastcnn::bias_relu_pool with a scale against float64 finite differences."""
import itertools

import pytest
import torch

import fastcnn  # noqa: F401  (loads fastcnn._C)
from fastcnn import _extension

pytestmark = pytest.mark.skipif(not _extension.LOADED, reason="fastcnn._C is not built")

POOLS = [("max", [2, 2], [2, 2]), ("avg", [2, 2], [2, 2]), ("none", [1, 1], [1, 1]), ("max", [3, 3], [2, 2]),
         ("max", [2, 3], [2, 3]), ("avg", [3, 2], [2, 2])]


def _composite(grad, out, code, conv, scale, args, bias_grad):
    dz, grad_bias = torch.ops.fastcnn.bias_relu_pool_backward(grad, out, code, *args, bias_grad)
    grad_conv = (dz * scale.reshape(-1, 1, 1)).to(dz.dtype)
    return grad_conv, grad_bias, (dz.to(scale.dtype) * conv.to(scale.dtype)).sum((0, 2, 3))


@pytest.mark.parametrize("dtype,channels_last,pool",
                         list(itertools.product([torch.float32, torch.float64, torch.bfloat16], [False, True], POOLS)))
def test_scaled_backward_matches_composite(dtype, channels_last, pool):
    torch.manual_seed(0)
    conv = torch.randn(3, 5, 9, 11, dtype=dtype)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
    vector_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    scale, bias = torch.randn(5, dtype=vector_dtype), torch.randn(5, dtype=vector_dtype)
    out, code = torch.ops.fastcnn.bias_relu_pool(conv, bias, *pool, scale)
    grad = torch.randn_like(out)
    args = ([9, 11], *pool)
    got = torch.ops.fastcnn.bias_relu_pool_scaled_backward(grad, out, code, *args, True, scale, conv)
    want = _composite(grad, out, code, conv, scale, args, True)
    assert torch.equal(got[0], want[0])  # one rounding of dz * scale, as the composite's
    assert got[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert torch.equal(got[1], want[1])  # grad_bias: the unscaled kernel's own sums
    assert got[2].dtype == scale.dtype
    torch.testing.assert_close(got[2], want[2])  # sums in another order
    no_sums = torch.ops.fastcnn.bias_relu_pool_scaled_backward(grad, out, code, *args, False, scale, None)
    assert torch.equal(no_sums[0], got[0]) and no_sums[1].numel() == 0 and no_sums[2].numel() == 0


@pytest.mark.parametrize("pool", POOLS)
def test_bias_relu_pool_with_scale_gradcheck(pool):
    torch.manual_seed(0)
    conv = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c, b, s: torch.ops.fastcnn.bias_relu_pool(c, b, *pool, s)[0],
                                    (conv, bias, scale))


def test_opcheck_scaled_backward():
    torch.manual_seed(0)
    conv, scale, bias = torch.randn(2, 3, 6, 6), torch.randn(3), torch.randn(3)
    out, code = torch.ops.fastcnn.bias_relu_pool(conv, bias, "max", [2, 2], [2, 2], scale)
    torch.library.opcheck(torch.ops.fastcnn.bias_relu_pool_scaled_backward,
                          (torch.randn_like(out), out, code, [6, 6], "max", [2, 2], [2, 2], True, scale, conv))
