"""fastcnn's fused ConvTranspose2d + bias + activation: argument checks, then the backend that runs the call.

Backends, in the order tried: on CUDA tensors "cuda" (one cuBLAS GEMM + fastcnn's strided phase store with the bias
and ReLU when kernel == stride, else cuDNN + fastcnn's bias/ReLU epilogue; the C++ stride-phase split of that case is
routed nowhere until measured faster, see csrc/conv_transpose.cpp), then "triton" (stride-phase implicit-GEMM forward,
strided-convolution backward with the ReLU mask applied on load); on CPU tensors "cpu" (the C++ paths with oneDNN);
"reference" (plain PyTorch) everywhere.
The CUDA order is provisional until timed on a GPU (see benchmarks/bench_conv_transpose.py).
"""
import torch

from .. import _extension
from ..reference import conv_transpose as reference
from . import _backends
from ._conv_transpose_args import check_conv_transpose
from ._dispatch import autocast as _autocast
from ._dispatch import forced_backend

# A fastcnn._C built before this op existed lacks its schema: the cpu/cuda backends then report it, import works.
_CPP_OP = _extension.LOADED and hasattr(torch.ops.fastcnn, "conv_transpose2d_act")
if _CPP_OP:
    from . import conv_transpose_cpp  # noqa: F401  (registers fakes and autograd on the C++ ops)
if _backends.why_unavailable("triton", "cuda") is None:
    from .conv_transpose_triton import conv_transpose2d_act_triton

_PREFERENCE = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}


def _backend_for(input):
    backend = _backends.choose(input.device.type, _PREFERENCE.get(input.device.type, ()))
    if backend == "triton" and input.dtype == torch.float64:
        raise RuntimeError("fastcnn: the triton backend does not support float64; use the cpu or reference backend")
    if backend in ("cpu", "cuda") and not _CPP_OP:
        if forced_backend() == backend:
            raise RuntimeError(f"fastcnn: backend {backend!r} was forced, but fastcnn._C predates "
                               "conv_transpose2d_act; rebuild it")
        return "triton" if backend == "cuda" else "reference"
    return backend


def conv_transpose2d_act(input, weight, bias, stride, padding, output_padding, groups, dilation, activation):
    """``act(conv_transpose2d(input, weight, bias, ...))``; see fastcnn.functional.conv_transpose2d."""
    input, weight, bias = _autocast(input, weight, bias)
    stride, padding, output_padding, dilation, activation = check_conv_transpose(
        input, weight, bias, stride, padding, output_padding, groups, dilation, activation)
    backend = _backend_for(input)
    if backend == "reference" or input.numel() == 0:
        return reference.conv_transpose2d_act(input, weight, bias, stride, padding, output_padding, groups,
                                              dilation, activation)
    op = conv_transpose2d_act_triton if backend == "triton" else torch.ops.fastcnn.conv_transpose2d_act
    return op(input, weight, bias, list(stride), list(padding), list(output_padding), groups, list(dilation),
              activation)
