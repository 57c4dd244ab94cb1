"""Bad input to the fused block: a clear error naming the argument, never a crash or a silent wrong answer."""
import pytest
import torch

import fastcnn

from _blocks import backends_here

F = fastcnn.functional


def inputs():
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
    x, w, b = mutate(*inputs())
    with fastcnn.use_backend(backend), pytest.raises(error, match=match):
        F.conv2d_relu_pool(x, w, b)


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
    x, w, b = inputs()
    with pytest.raises(ValueError, match=match):
        F.conv2d_relu_pool(x, w, b, **kwargs)


def test_forcing_an_unavailable_backend_says_why():
    x, w, b = inputs()
    with fastcnn.use_backend("cuda"), pytest.raises(RuntimeError, match="cuda backend runs on CUDA tensors only"):
        F.conv2d_relu_pool(x, w, b)
    with pytest.raises(ValueError, match="backend must be one of"):
        fastcnn.set_backend("cudnn")


def test_module_rejects_bad_pool_arguments():
    with pytest.raises(ValueError, match="pool must be 'max' or 'avg'"):
        fastcnn.nn.ConvReLUPool2d(3, 4, 3, pool="none")
    with pytest.raises(ValueError, match="pool_stride must be >= 1"):
        fastcnn.nn.ConvReLUPool2d(3, 4, 3, pool_stride=0)
