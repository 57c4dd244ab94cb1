"""BatchNorm2d as a per-channel affine map ``y * scale + shift`` for the fused residual blocks.

* Batch statistics (training, or a BatchNorm without running statistics) come from fastcnn's fused ops - where
  fastcnn.ops runs a convolution that can, reduced in its epilogue (`conv_statistics`,
  `norm_relu_conv2d_statistics`; the triton backend), elsewhere by the BatchNorm op itself, since ATen's
  convolutions (oneDNN, cuDNN) cannot take the reduction and a separate pass costs the same wherever it runs; the
  running statistics are then updated exactly as ``nn.BatchNorm2d`` does (momentum, or the cumulative average when
  momentum is None; the unbiased variance).
* Running statistics (eval): the same map with ``scale = gamma / sqrt(running_var + eps)``,
  ``shift = beta - running_mean * scale`` (in the accumulation dtype), applied in the epilogue pass after the
  convolution. It is recomputed from the live tensors at every forward - C values per BatchNorm, nothing next to
  the convolution itself - rather than folded into the convolution's weights and cached: a cache keyed on tensor
  version counters goes stale when a tensor changes without a version bump (``param.data`` edits, ops that do not
  bump), and folding at every forward would re-read and re-write every weight, the cost that dominates a small-batch
  inference.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import batch_norm as bn_ops


def uses_batch_statistics(bn):
    return bn.training or bn.running_mean is None


def statistics_mode(norm):
    """The mode a module route keys on: "eval" when `norm` normalises with running statistics, else "train" (any
    norm layer: one without running statistics always normalises with the batch's). The buffer is read from
    ``_buffers``, where ``nn.Module.__getattr__`` would find it, without that Python call (~10 us with evicted
    caches, on every call of a fused block)."""
    return "train" if norm.training or norm._buffers.get("running_mean") is None else "eval"


def _momentum_factor(bn):
    """nn.BatchNorm2d's exponential_average_factor, counting this batch."""
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            return 1.0 / float(bn.num_batches_tracked)
    return 0.0 if bn.momentum is None else bn.momentum


def update_running_statistics(bn, mean, var, count):
    """running = (1 - factor) * running + factor * batch, with the unbiased batch variance (count = N*H*W)."""
    if not (bn.training and bn.track_running_stats):
        return
    with torch.no_grad():
        factor = _momentum_factor(bn)
    bn_ops.update_running_statistics(bn.running_mean, bn.running_var, mean, var, factor, count)


def running_scale_shift(bn, dtype):
    """(scale, shift) of an eval-mode bn as a per-channel affine map, in the accumulation dtype of `dtype`."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.rsqrt(bn.running_var.to(acc) + bn.eps)
    if bn.weight is not None:
        scale = bn.weight.to(acc) * scale
    shift = -bn.running_mean.to(acc) * scale
    return scale, shift if bn.bias is None else bn.bias.to(acc) + shift


def norm_relu_conv2d(y, norm, conv):
    """``conv(relu(norm(y)))`` with fastcnn's fused ops, conv without bias: in training the BN-apply + ReLU runs
    inside the convolution's input (and norm's running statistics are updated), in eval it is one epilogue pass."""
    args = (conv.stride, conv.padding, conv.dilation, conv.groups)
    if uses_batch_statistics(norm):
        count = y.numel() // y.shape[1]
        y, mean, var = bn_ops.batch_norm_relu_conv2d(y, norm.weight, norm.bias, norm.eps, conv.weight, *args)
        update_running_statistics(norm, mean, var, count)
        return y
    activation = bn_ops.scale_shift_add_relu(y, *running_scale_shift(norm, y.dtype))
    return F.conv2d(activation, conv.weight.to(y.dtype), None, *args)


def conv_statistics(x, conv):
    """``(conv(x), stats)`` for a bias-free conv: stats are the output's batch statistics ``(mean, var)`` when the
    convolution's epilogue reduced them, else None (the BatchNorm op then reduces them); fastcnn.ops decides."""
    return bn_ops.conv2d_epilogue_stats(x, conv.weight, conv.stride, conv.padding, conv.dilation, conv.groups)


def norm_relu_conv2d_statistics(y, stats, norm, conv):
    """`norm_relu_conv2d` taking y's batch statistics ``stats`` (or None) and returning ``(out, out_stats)`` as
    `conv_statistics` does."""
    args = (conv.stride, conv.padding, conv.dilation, conv.groups)
    if not uses_batch_statistics(norm):
        activation = bn_ops.scale_shift_add_relu(y, *running_scale_shift(norm, y.dtype))
        return bn_ops.conv2d_epilogue_stats(activation, conv.weight.to(y.dtype), *args)
    count = y.numel() // y.shape[1]
    out, mean, var, out_stats = bn_ops.batch_norm_relu_conv2d_epilogue_stats(
        y, norm.weight, norm.bias, norm.eps, conv.weight, *args, stats=stats)
    update_running_statistics(norm, mean, var, count)
    return out, out_stats
