"""Plain-PyTorch BatchNorm pieces of the fused blocks: the test oracle and the last-resort backend of every function
in fastcnn.ops.batch_norm (the residual blocks' ops, ``batch_norm_relu_pool`` and ``conv2d_batch_stats``).

Training-mode BatchNorm followed by ReLU (and a residual add) is split into what each fused kernel computes:

* ``batch_norm_stats(x)``: per-channel ``mean`` and biased ``var`` over (N, H, W), in the accumulation dtype
  (float32 for float16/bfloat16/float32 inputs, float64 for float64).
* ``scale_shift_add_relu(x, scale, shift, residual)``: ``out = relu(x * scale[c] + shift[c] + residual)`` computed in
  the accumulation dtype and rounded once, with ``scale = gamma * rsqrt(var + eps)``, ``shift = beta - mean * scale``
  (or the folded running statistics in eval). Also returns the ReLU mask, one ``uint8`` per element
  (``not out <= 0``, so NaN passes the gradient as ReLU's backward does): the backward needs it and ``x``, not the
  full-size activation.

Backward, with ``dz = grad_out`` where the gate (mask or recomputed activation) is not ``<= 0``, else 0:

* ``batch_norm_backward_reduce``: per-channel ``sum dz`` and ``sum dz * (x - mean)``;
* ``batch_norm_backward_elemt``: ``grad_x = a * (dz - b * (x - mean) - d)`` per channel. BatchNorm's input gradient
  ``gamma * invstd * (dz - sum dz / M - x_hat * sum(dz * x_hat) / M)`` is ``a = gamma * invstd``,
  ``b = invstd^2 * sum(dz * (x - mean)) / M``, ``d = sum dz / M`` (PyTorch's own grouping, so rounding matches
  stock's closely where the terms cancel); the eval-mode affine map is ``a = scale``, ``b = d = 0``. Computing it
  in one pass in the accumulation dtype matters for bfloat16: rounding the nearly cancelling terms separately would
  lose the result.
"""
import torch
import torch.nn.functional as F

from .._dispatch import accumulation_dtype, memory_format_of


def _per_channel(v, x):
    if v is None:
        return torch.zeros((), dtype=accumulation_dtype(x.dtype), device=x.device)
    return v.reshape(1, -1, 1, 1).to(accumulation_dtype(x.dtype))


def batch_norm_stats(x):
    """Per-channel (mean, biased var) of a 4-D tensor, two-pass in the accumulation dtype."""
    xa = x.to(accumulation_dtype(x.dtype))
    mean = xa.mean(dim=(0, 2, 3))
    var = (xa - mean.reshape(1, -1, 1, 1)).square().mean(dim=(0, 2, 3))
    return mean, var


def scale_shift_add_relu(x, scale, shift, residual, save_mask):
    """``(relu(x * scale + shift + residual), mask)``; scale None means 1, residual None means 0."""
    y = x.to(accumulation_dtype(x.dtype))
    if scale is not None:
        y = y * _per_channel(scale, x)
    y = y + _per_channel(shift, x)
    if residual is not None:
        y = y + residual.to(y.dtype)
    out = torch.relu(y).to(x.dtype).contiguous(memory_format=memory_format_of(x))
    mask = (~(out <= 0)).to(torch.uint8) if save_mask else out.new_empty(0, dtype=torch.uint8)
    return out, mask


def _gated(grad_out, gate, x):
    acc = accumulation_dtype(x.dtype)
    return torch.where(gate <= 0, torch.zeros((), dtype=acc, device=x.device), grad_out.to(acc))


def batch_norm_backward_reduce(grad_out, gate, x, mean):
    dz = _gated(grad_out, gate, x)
    centered = x.to(dz.dtype) - _per_channel(mean, x)
    return dz.sum(dim=(0, 2, 3)), (dz * centered).sum(dim=(0, 2, 3))


def batch_norm_backward_elemt(grad_out, gate, x, mean, a, b, d, want_dz):
    dz = _gated(grad_out, gate, x)
    centered = x.to(dz.dtype) - _per_channel(mean, x)
    grad = _per_channel(a, x) * (dz - _per_channel(b, x) * centered - _per_channel(d, x))
    fmt = memory_format_of(x)
    dz_out = dz.to(x.dtype).contiguous(memory_format=fmt) if want_dz else x.new_empty(0)
    return grad.to(x.dtype).contiguous(memory_format=fmt), dz_out


def batch_norm_add_relu(y, weight, bias, eps, residual):
    """Training-mode ``relu(batch_norm(y) + residual)`` with stock ops; returns (out, batch mean, biased var)."""
    mean, var = batch_norm_stats(y.detach())
    out = F.batch_norm(y, None, None, weight, bias, True, 0.0, eps)
    if residual is not None:
        out = out + residual
    return torch.relu(out), mean, var


def batch_norm_relu_conv2d(y, weight, bias, eps, conv_weight, stride, padding, dilation, groups):
    """``conv2d(relu(batch_norm(y)))`` with training-mode BatchNorm and stock ops; returns (out, mean, var)."""
    activation, mean, var = batch_norm_add_relu(y, weight, bias, eps, None)
    return F.conv2d(activation, conv_weight, None, stride, padding, dilation, groups), mean, var


def batch_norm_relu_pool(y, y_bias, weight, bias, eps, pool, pool_size, pool_stride):
    """``(pool(relu(batch_norm(y + y_bias))), mean, var)`` with stock ops (differentiable by autograd); ``mean`` and
    the biased ``var`` are the batch statistics of ``y + y_bias`` in the accumulation dtype, not differentiable.

    The BatchNorm input is ``y + y_bias`` (``y`` a convolution computed without its bias, ``y_bias`` that bias or
    None). A per-channel constant shifts the batch mean by itself and leaves the variance and the normalised value
    ``(y - mean) * rsqrt(var + eps)`` unchanged, so the output never depends on ``y_bias``: it enters only the
    returned mean (which feeds BatchNorm's running mean), and its gradient is exactly zero. (This reference adds it
    anyway, as the stock layers do, so its gradient here is stock's rounding residue of that zero.)"""
    if y_bias is not None:
        y = y + y_bias.to(y.dtype).reshape(1, -1, 1, 1)
    mean, var = batch_norm_stats(y.detach())
    out = torch.relu(F.batch_norm(y, None, None, weight, bias, True, 0.0, eps))
    if pool == "max":
        out = F.max_pool2d(out, pool_size, pool_stride)
    elif pool == "avg":
        out = F.avg_pool2d(out, pool_size, pool_stride)
    return out, mean, var


def conv2d_batch_stats(x, weight, stride, padding, dilation, groups):
    """``(y, mean, var)``: ``y = conv2d(x, weight)`` (bias-free, differentiable) and y's batch statistics (not)."""
    y = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    return (y, *batch_norm_stats(y.detach()))
