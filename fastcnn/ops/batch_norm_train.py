"""Training-mode BatchNorm fused with what follows it in a residual block, as custom ops built on the C++/CUDA
kernels of fastcnn._C (math in fastcnn/reference/batch_norm.py):

* ``fastcnn::batch_norm_add_relu(y, weight, bias, residual, eps)``: ``relu(batch_norm(y) + residual)`` - statistics
  in one reduction, then normalise + add + ReLU in one pass; saves ``y`` and a uint8 ReLU mask.
* ``fastcnn::batch_norm_relu_conv2d(y, weight, bias, conv_weight, ..., eps)``: ``conv2d(relu(batch_norm(y)))`` - the
  BN-apply + ReLU feeds the convolution and is recomputed from ``y`` in backward, so the activation between two
  convolutions is never stored.

Both return the batch mean and biased variance too (for the running statistics) and share one backward: a reduction
(``sum dz``, ``sum dz (y - mean)``) and one elementwise pass giving BatchNorm's full input gradient.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..reference.batch_norm import accumulation_dtype
from .batch_norm_cpp import like_input


def _scale_shift(weight, bias, mean, var, eps):
    invstd = torch.rsqrt(var + eps)
    scale = weight.to(invstd.dtype) * invstd
    return invstd, scale, bias.to(invstd.dtype) - mean * scale


def _normalize_relu(y, weight, bias, residual, eps, save_mask):
    mean, var = torch.ops.fastcnn.batch_norm_stats(y)
    _, scale, shift = _scale_shift(weight, bias, mean, var, eps)
    out, mask = torch.ops.fastcnn.scale_shift_add_relu(y, scale, shift, residual, save_mask)
    return out, mask, mean, var


@torch.library.custom_op("fastcnn::batch_norm_add_relu", mutates_args=())
def batch_norm_add_relu(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: Optional[torch.Tensor],
                        eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, mask, mean, var)"""
    return _normalize_relu(y, weight, bias, residual, eps, True)


@batch_norm_add_relu.register_fake
def _(y, weight, bias, residual, eps):
    acc = accumulation_dtype(y.dtype)
    return (like_input(y), like_input(y, torch.uint8), y.new_empty(y.shape[1], dtype=acc),
            y.new_empty(y.shape[1], dtype=acc))


@torch.library.custom_op("fastcnn::batch_norm_relu_conv2d", mutates_args=())
def batch_norm_relu_conv2d(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, conv_weight: torch.Tensor,
                           stride: List[int], padding: List[int], dilation: List[int], groups: int,
                           eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, mean, var)"""
    activation, _, mean, var = _normalize_relu(y, weight, bias, None, eps, False)
    return F.conv2d(activation, conv_weight, None, stride, padding, dilation, groups), mean, var


@batch_norm_relu_conv2d.register_fake
def _(y, weight, bias, conv_weight, stride, padding, dilation, groups, eps):
    acc = accumulation_dtype(y.dtype)
    return (F.conv2d(y, conv_weight, None, stride, padding, dilation, groups), y.new_empty(y.shape[1], dtype=acc),
            y.new_empty(y.shape[1], dtype=acc))


@torch.library.custom_op("fastcnn::batch_norm_relu_backward", mutates_args=())
def batch_norm_relu_backward(grad_out: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                             mean: torch.Tensor, var: torch.Tensor, eps: float,
                             want_dz: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_y, grad_weight, grad_bias, dz): with M = N*H*W, grad_y = a (dz - b (y - mean) - d) (see the reference)."""
    sum_dz, sum_dz_xmu = torch.ops.fastcnn.batch_norm_backward_reduce(grad_out, gate, y, mean)
    invstd, scale, _ = _scale_shift(weight, torch.zeros_like(weight), mean, var, eps)
    count = y.numel() // y.shape[1]
    b = invstd * invstd * sum_dz_xmu / count
    d = sum_dz / count
    grad_y, dz = torch.ops.fastcnn.batch_norm_backward_elemt(grad_out, gate, y, mean, scale, b, d, want_dz)
    return grad_y, (sum_dz_xmu * invstd).to(weight.dtype), sum_dz.to(weight.dtype), dz


@batch_norm_relu_backward.register_fake
def _(grad_out, gate, y, weight, mean, var, eps, want_dz):
    return (like_input(y), torch.empty_like(weight), torch.empty_like(weight),
            like_input(y) if want_dz else y.new_empty(0))


def _add_relu_setup(ctx, inputs, output):
    y, weight, _bias, residual, eps = inputs
    _out, mask, mean, var = output
    ctx.save_for_backward(y, weight, mask, mean, var)
    ctx.eps, ctx.has_residual = eps, residual is not None


def _add_relu_backward(ctx, grad_out, _grad_mask, _grad_mean, _grad_var):
    y, weight, mask, mean, var = ctx.saved_tensors
    want_dz = ctx.has_residual and ctx.needs_input_grad[3]
    grad_y, grad_weight, grad_bias, dz = batch_norm_relu_backward(grad_out, mask, y, weight, mean, var, ctx.eps,
                                                                  want_dz)
    return grad_y, grad_weight, grad_bias, dz if want_dz else None, None


batch_norm_add_relu.register_autograd(_add_relu_backward, setup_context=_add_relu_setup)


def _conv_setup(ctx, inputs, output):
    y, weight, bias, conv_weight, stride, padding, dilation, groups, eps = inputs
    _out, mean, var = output
    ctx.save_for_backward(y, weight, bias, conv_weight, mean, var)
    ctx.conv_args, ctx.eps = (stride, padding, dilation, groups), eps


def _conv_backward(ctx, grad_out, _grad_mean, _grad_var):
    y, weight, bias, conv_weight, mean, var = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv_args
    _, scale, shift = _scale_shift(weight, bias, mean, var, ctx.eps)
    activation = torch.ops.fastcnn.scale_shift_add_relu(y, scale, shift, None, False)[0]  # recomputed
    need_bn = any(ctx.needs_input_grad[:3])
    grad_activation, grad_conv_weight, _ = torch.ops.aten.convolution_backward(
        grad_out, activation, conv_weight, None, stride, padding, dilation, False, [0, 0], groups,
        [need_bn, ctx.needs_input_grad[3], False])
    grad_y = grad_weight = grad_bias = None
    if need_bn:
        grad_y, grad_weight, grad_bias, _ = batch_norm_relu_backward(grad_activation, activation, y, weight, mean,
                                                                     var, ctx.eps, False)
    return grad_y, grad_weight, grad_bias, grad_conv_weight, None, None, None, None, None


batch_norm_relu_conv2d.register_autograd(_conv_backward, setup_context=_conv_setup)
