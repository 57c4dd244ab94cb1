"""Plain-PyTorch training-mode BatchNorm + ReLU (+ max/avg pool) on a convolution output: the test oracle and the
last-resort backend of ``fastcnn.ops.batch_norm_relu_pool``.

The BatchNorm input is ``y + y_bias`` (``y`` a convolution computed without its bias, ``y_bias`` that bias or None).
A per-channel constant shifts the batch mean by itself and leaves the variance and the normalised value
``(y - mean) * rsqrt(var + eps)`` unchanged, so the output never depends on ``y_bias``: it enters only the returned
mean (which feeds BatchNorm's running mean), and its gradient is exactly zero. (This reference adds it anyway, as
the stock layers do, so its gradient here is stock's rounding residue of that zero.)
"""
import torch
import torch.nn.functional as F

from .batch_norm import batch_norm_stats


def batch_norm_relu_pool(y, y_bias, weight, bias, eps, pool, pool_size, pool_stride):
    """``(pool(relu(batch_norm(y + y_bias))), mean, var)`` with stock ops (differentiable by autograd); ``mean`` and
    the biased ``var`` are the batch statistics of ``y + y_bias`` in the accumulation dtype, not differentiable."""
    if y_bias is not None:
        y = y + y_bias.to(y.dtype).reshape(1, -1, 1, 1)
    mean, var = batch_norm_stats(y.detach())
    out = torch.relu(F.batch_norm(y, None, None, weight, bias, True, 0.0, eps))
    if pool == "max":
        out = F.max_pool2d(out, pool_size, pool_stride)
    elif pool == "avg":
        out = F.avg_pool2d(out, pool_size, pool_stride)
    return out, mean, var
