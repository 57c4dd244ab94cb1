"""fastcnn's fused Conv2d + bias + ReLU (+ max/avg pool): argument checks, then the backend that runs the call.

Backends, in the order tried: on CUDA tensors "cuda" (cuDNN convolution + fastcnn's fused epilogue and backward
kernels), then "triton" (implicit-GEMM convolution with the pool in its epilogue); on CPU tensors "cpu" (oneDNN
convolution + one C++ epilogue pass); "reference" (plain PyTorch) everywhere. The CUDA order is provisional until
the kernels are timed on a GPU (see benchmarks/); forcing a backend is possible with fastcnn.set_backend.
"""
import torch

from .. import _extension
from ..reference import conv_relu_pool as reference
from . import _backends
from ._conv_args import check_conv_relu_pool

if _extension.LOADED:
    from . import conv_relu_pool_cpp  # noqa: F401  (registers fakes and autograd on the C++ ops)
if _backends.why_unavailable("triton", "cuda") is None:
    from .conv_relu_pool_triton import conv2d_relu_pool_triton

_PREFERENCE = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}


def _backend_for(input):
    device_type = input.device.type
    backend = _backends.choose(device_type, _PREFERENCE.get(device_type, ()))
    if backend == "triton" and input.dtype == torch.float64:
        raise RuntimeError("fastcnn: the triton backend does not support float64; use the cpu or reference backend")
    return backend


def _autocast(*tensors):
    """Autocast as conv2d does: under an enabled autocast region, floating tensors other than float64 run in the
    autocast dtype. (Custom ops are invisible to autocast, so the cast happens here, for every backend.)"""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


def conv2d_relu_pool(input, weight, bias, stride, padding, dilation, groups, pool, pool_size, pool_stride):
    """``pool(relu(conv2d(input, weight, bias, ...)))``; see fastcnn.functional.conv2d_relu_pool for the contract."""
    input, weight, bias = _autocast(input, weight, bias)
    stride, padding, dilation, pool_size, pool_stride = check_conv_relu_pool(
        input, weight, bias, stride, padding, dilation, groups, pool, pool_size, pool_stride)
    backend = _backend_for(input)
    if backend == "reference" or input.numel() == 0:
        return reference.conv2d_relu_pool(input, weight, bias, stride, padding, dilation, groups, pool, pool_size,
                                          pool_stride)
    op = conv2d_relu_pool_triton if backend == "triton" else torch.ops.fastcnn.conv2d_relu_pool
    out, _code = op(input, weight, bias, list(stride), list(padding), list(dilation), groups, pool,
                    list(pool_size), list(pool_stride))
    return out
