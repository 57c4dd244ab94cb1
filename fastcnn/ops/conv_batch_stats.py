"""``conv2d_batch_stats``: a bias-free Conv2d and the training-mode BatchNorm statistics of its output, for the fused
Conv + BatchNorm blocks: argument checks, then the backend that runs the call.

Backends: "triton" reduces the statistics in the convolution's epilogue (fastcnn::conv2d_batch_stats_triton; the
output is never read back; float64, which the Triton convolution does not take, runs ATen's convolution and the
Triton statistics kernels). "cpu" and "cuda" run ATen's convolution (oneDNN/cuDNN, whose epilogue fastcnn cannot
extend) and then fastcnn's compiled statistics op. "reference" is F.conv2d and two-pass statistics in plain
PyTorch. On CUDA tensors "cuda" comes first until the fused epilogue is timed against cuDNN + a separate pass on a GPU
(benchmarks/); "triton" runs when forced (fastcnn.set_backend) or when fastcnn._C has no BatchNorm ops.

Gradients: ``y`` is differentiable (the convolution's backward); ``mean`` and ``var`` are not (they come back with
``requires_grad=False``). They exist for the BatchNorm that follows, whose fused training ops
(batch_norm_add_relu, batch_norm_relu_conv2d) take them as given and whose backward re-derives their contribution
to the gradient from ``y`` (the full BatchNorm input gradient, see fastcnn/reference/batch_norm.py).
"""
import torch.nn.functional as F

from ..reference.batch_norm import batch_norm_stats as reference_stats
from . import _backends
from . import batch_norm as bn_ops
from ._dispatch import autocast as _autocast
from .conv_relu_pool import check_conv_relu_pool

_PREFERENCE = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}


def statistics_backend(x):
    """The backend that ``conv2d_batch_stats`` would run for input ``x``."""
    preference = [b for b in _PREFERENCE.get(x.device.type, ()) if b in bn_ops.IMPLEMENTATIONS]
    return _backends.choose(x.device.type, preference)


def conv2d_batch_stats(input, weight, stride=1, padding=0, dilation=1, groups=1):
    """``y = conv2d(input, weight, None, stride, padding, dilation, groups)`` and the per-channel batch statistics
    of ``y`` as BatchNorm2d computes them in training.

    Args:
        input: ``(N, C_in, H, W)`` float32, float16, bfloat16 or float64, NCHW or channels_last.
        weight: ``(C_out, C_in / groups, kH, kW)``, input's dtype.
        stride, padding, dilation: int or pair of ints, as in ``nn.Conv2d`` (zero padding).
        groups: int.

    Returns:
        ``(y, mean, var)``: y in input's dtype and memory format; mean and biased var of y's values as stored
        (rounded to y's dtype), float32 (float64 for float64 input), not differentiable.

    Shape:
        y: ``(N, C_out, H_out, W_out)``; mean, var: ``(C_out,)``.

    Example:
        >>> y, mean, var = conv2d_batch_stats(torch.randn(2, 3, 7, 5), torch.randn(5, 3, 3, 3), padding=1)
        >>> y.shape, mean.shape
        (torch.Size([2, 5, 7, 5]), torch.Size([5]))
    """
    stride, padding, dilation, _, _ = check_conv_relu_pool(input, weight, None, stride, padding, dilation, groups,
                                                           "none", 1, None)
    input, weight = _autocast(input, weight)
    if input.shape[0] * weight.shape[0] == 0:
        raise ValueError(f"fastcnn: input of shape {tuple(input.shape)} and weight of shape {tuple(weight.shape)} "
                         "give an empty output, which has no batch statistics")
    args = (list(stride), list(padding), list(dilation), groups)
    backend = statistics_backend(input)
    if backend != "reference":
        return tuple(bn_ops.IMPLEMENTATIONS[backend].CONV_STATS(input, weight, *args))
    y = F.conv2d(input, weight, None, *args)
    return (y, *reference_stats(y.detach()))
