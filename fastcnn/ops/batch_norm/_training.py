"""Autograd and fakes of the fused BatchNorm ops, defined once for every compiled backend (math in reference.py).
A backend supplies its four primitive ops (`Kernels`, with the schemas of csrc/fastcnn.cpp): the C++/CUDA ops of
fastcnn._C (register.py) or the Triton ones (register_triton.py).

`define_training_ops(suffix, kernels)` builds, as ``fastcnn::<name><suffix>``:

* ``batch_norm_add_relu(y, weight, bias, residual, eps)``: ``relu(batch_norm(y) + residual)`` - statistics in one
  reduction, then normalise + add + ReLU in one pass; saves ``y`` and a uint8 ReLU mask.
* ``batch_norm_relu_conv2d(y, weight, bias, conv_weight, ..., eps)``: ``conv2d(relu(batch_norm(y)))`` - the
  BN-apply + ReLU feeds ATen's convolution and is recomputed from ``y`` in backward, so the activation between two
  convolutions is never stored.

* ``batch_norm_relu_conv2d_stats(...)``: the same, plus the batch statistics of its output, for the BatchNorm that
  follows (reduced in the convolution's epilogue where the backend's convolution allows it, see `define_training_ops`).

All three take optional precomputed batch statistics ``mean``, ``var`` of ``y`` (from a producer that reduced them
in its epilogue, see conv2d_batch_stats) instead of reducing them again; such statistics are constants to autograd,
which is exact because the shared backward below is BatchNorm's full input gradient: it re-derives the statistics'
dependence on ``y`` from ``y`` itself (d mean / dy = 1/M, d var / dy = 2 (y - mean) / M).

They return the batch mean and biased variance too (for the running statistics) and share one backward
(``batch_norm_relu_backward``, also an op): a reduction (``sum dz``, ``sum dz (y - mean)``) and one elementwise pass
giving BatchNorm's full input gradient. `register_apply_autograd` differentiates the backend's
``scale_shift_add_relu``.
"""
from types import SimpleNamespace
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from .._dispatch import accumulation_dtype, eager_or_op, memory_format_of


class Kernels(NamedTuple):
    """One backend's primitive ops: stats(x) -> (mean, var); apply(x, scale, shift, residual, save_mask) ->
    (out, mask); backward_reduce(grad_out, gate, x, mean) -> (sum_dz, sum_dz_xmu); backward_elemt(grad_out, gate,
    x, mean, a, b, d, want_dz) -> (grad_x, dz). Optional, where the backend has them as one op each (fastcnn._C):
    backward(grad_out, gate, x, weight, mean, var, eps, want_dz) -> (grad_x, grad_weight, grad_bias, dz), the reduce,
    the coefficients and the elemt pass in one call, and scale_shift(weight, bias, mean, var, eps) -> (scale, shift);
    both give the bits of the compositions below (`_composite_backward`, `_scale_shift`) that serve the others."""
    stats: Callable
    apply: Callable
    backward_reduce: Callable
    backward_elemt: Callable
    backward: Optional[Callable] = None
    scale_shift: Optional[Callable] = None


def like_input(x, dtype=None):
    return torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device, memory_format=memory_format_of(x))


def _scale_shift(weight, bias, mean, var, eps):
    invstd = torch.rsqrt(var + eps)
    scale = weight.to(invstd.dtype) * invstd
    return scale, bias.to(invstd.dtype) - mean * scale


def _composite_backward(kernels):
    """backward(grad_out, gate, y, weight, mean, var, eps, want_dz) -> (grad_y, grad_weight, grad_bias, dz) from the
    backend's reduce and elemt ops: with M = N*H*W, grad_y = a (dz - b (y - mean) - d) (see the reference)."""

    def backward(grad_out, gate, y, weight, mean, var, eps, want_dz):
        sum_dz, sum_dz_xmu = kernels.backward_reduce(grad_out, gate, y, mean)
        invstd = torch.rsqrt(var + eps)
        count = y.numel() // y.shape[1]
        b = invstd * invstd * sum_dz_xmu / count
        d = sum_dz / count
        grad_y, dz = kernels.backward_elemt(grad_out, gate, y, mean, weight * invstd, b, d, want_dz)
        return grad_y, (sum_dz_xmu * invstd).to(weight.dtype), sum_dz.to(weight.dtype), dz

    return backward


def register_apply_autograd(op_name, kernels):
    """Autograd of the backend's ``scale_shift_add_relu`` (the eval-mode epilogue, called directly by the blocks):
    grad_x = scale * dz, grad_residual = dz (one pass); grad_scale = sum dz x, grad_shift = sum dz."""

    def setup_context(ctx, inputs, output):
        x, scale, _shift, residual, _save_mask = inputs
        out, mask = output
        ctx.save_for_backward(x, scale, mask if mask.numel() else out)
        ctx.has_scale, ctx.has_residual = scale is not None, residual is not None

    def backward(ctx, grad_out, _grad_mask):
        x, scale, gate = ctx.saved_tensors
        need = ctx.needs_input_grad
        want_residual = ctx.has_residual and need[3]
        grad_x = grad_scale = grad_shift = grad_residual = None
        if need[0] or want_residual:
            a = scale if scale is not None else torch.ones(x.shape[1], dtype=accumulation_dtype(x.dtype),
                                                           device=x.device)
            grad_x, dz = kernels.backward_elemt(grad_out, gate, x, None, a, None, None, want_residual)
            grad_x, grad_residual = (grad_x if need[0] else None), (dz if want_residual else None)
        if (ctx.has_scale and need[1]) or need[2]:
            sum_dz, sum_dz_x = kernels.backward_reduce(grad_out, gate, x, None)
            grad_scale, grad_shift = (sum_dz_x if ctx.has_scale and need[1] else None), (sum_dz if need[2] else None)
        return grad_x, grad_scale, grad_shift, grad_residual, None

    torch.library.register_autograd(op_name, backward, setup_context=setup_context)


def _channels_pair(y):
    acc = accumulation_dtype(y.dtype)
    return y.new_empty(y.shape[1], dtype=acc), y.new_empty(y.shape[1], dtype=acc)


def composite_conv_stats(kernels):
    """conv_stats(x, conv_weight, stride, padding, dilation, groups) -> (y, mean, var): ATen's convolution (and its
    autograd), then the backend's statistics op on the result (not differentiable)."""

    def conv_stats(x, conv_weight, stride, padding, dilation, groups):
        y = F.conv2d(x, conv_weight, None, stride, padding, dilation, groups)
        return (y, *kernels.stats(y.detach()))

    return conv_stats


def define_training_ops(suffix, kernels, conv_stats=None):
    """The training ops on `kernels`, registered as ``fastcnn::batch_norm_add_relu<suffix>``,
    ``fastcnn::batch_norm_relu_conv2d<suffix>``, ``fastcnn::batch_norm_relu_conv2d_stats<suffix>`` and
    ``fastcnn::batch_norm_relu_backward<suffix>``; returns them as a namespace, with ``run``: the first three as
    `eager_or_op` calls them (what fastcnn.ops runs). `conv_stats` (default `composite_conv_stats`) is the
    convolution + output statistics of ``batch_norm_relu_conv2d_stats``."""
    conv_stats = conv_stats or composite_conv_stats(kernels)
    scale_shift = kernels.scale_shift or _scale_shift
    one_call_backward = kernels.backward or _composite_backward(kernels)

    def normalize_relu(y, weight, bias, residual, eps, save_mask, mean=None, var=None):
        if mean is None or var is None:
            mean, var = kernels.stats(y)
        else:  # (a custom op's outputs may not alias its inputs)
            mean, var = mean.clone(), var.clone()
        scale, shift = scale_shift(weight, bias, mean, var, eps)
        out, mask = kernels.apply(y, scale, shift, residual, save_mask)
        return out, mask, mean, var

    def add_relu_forward(y, weight, bias, residual, eps, mean=None, var=None):
        return normalize_relu(y, weight, bias, residual, eps, True, mean, var)

    def conv_forward(y, weight, bias, conv_weight, stride, padding, dilation, groups, eps, mean=None, var=None):
        activation, _, mean, var = normalize_relu(y, weight, bias, None, eps, False, mean, var)
        return F.conv2d(activation, conv_weight, None, stride, padding, dilation, groups), mean, var

    def conv_stats_forward(y, weight, bias, conv_weight, stride, padding, dilation, groups, eps, mean=None,
                           var=None):
        activation, _, mean, var = normalize_relu(y, weight, bias, None, eps, False, mean, var)
        out, out_mean, out_var = conv_stats(activation, conv_weight, stride, padding, dilation, groups)
        return out, mean, var, out_mean, out_var

    @torch.library.custom_op(f"fastcnn::batch_norm_add_relu{suffix}", mutates_args=())
    def batch_norm_add_relu(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            residual: Optional[torch.Tensor], eps: float, mean: Optional[torch.Tensor] = None,
                            var: Optional[torch.Tensor] = None
                            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(out, mask, mean, var)"""
        return add_relu_forward(y, weight, bias, residual, eps, mean, var)

    @batch_norm_add_relu.register_fake
    def _(y, weight, bias, residual, eps, mean=None, var=None):
        return (like_input(y), like_input(y, torch.uint8), *_channels_pair(y))

    @torch.library.custom_op(f"fastcnn::batch_norm_relu_conv2d{suffix}", mutates_args=())
    def batch_norm_relu_conv2d(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, conv_weight: torch.Tensor,
                               stride: List[int], padding: List[int], dilation: List[int], groups: int,
                               eps: float, mean: Optional[torch.Tensor] = None, var: Optional[torch.Tensor] = None
                               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(out, mean, var)"""
        return conv_forward(y, weight, bias, conv_weight, stride, padding, dilation, groups, eps, mean, var)

    @batch_norm_relu_conv2d.register_fake
    def _(y, weight, bias, conv_weight, stride, padding, dilation, groups, eps, mean=None, var=None):
        return (F.conv2d(y, conv_weight, None, stride, padding, dilation, groups), *_channels_pair(y))

    @torch.library.custom_op(f"fastcnn::batch_norm_relu_conv2d_stats{suffix}", mutates_args=())
    def batch_norm_relu_conv2d_stats(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                     conv_weight: torch.Tensor, stride: List[int], padding: List[int],
                                     dilation: List[int], groups: int, eps: float, mean: Optional[torch.Tensor] = None,
                                     var: Optional[torch.Tensor] = None
                                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(out, mean, var, out_mean, out_var): out_mean and out_var are out's batch statistics."""
        return conv_stats_forward(y, weight, bias, conv_weight, stride, padding, dilation, groups, eps, mean, var)

    @batch_norm_relu_conv2d_stats.register_fake
    def _(y, weight, bias, conv_weight, stride, padding, dilation, groups, eps, mean=None, var=None):
        out = F.conv2d(y, conv_weight, None, stride, padding, dilation, groups)
        return (out, *_channels_pair(y), *_channels_pair(out))

    @torch.library.custom_op(f"fastcnn::batch_norm_relu_backward{suffix}", mutates_args=())
    def batch_norm_relu_backward(grad_out: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                                 mean: torch.Tensor, var: torch.Tensor, eps: float,
                                 want_dz: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(grad_y, grad_weight, grad_bias, dz): with M = N*H*W, grad_y = a (dz - b (y - mean) - d) (see the
        reference)."""
        return tuple(one_call_backward(grad_out, gate, y, weight, mean, var, eps, want_dz))

    @batch_norm_relu_backward.register_fake
    def _(grad_out, gate, y, weight, mean, var, eps, want_dz):
        return (like_input(y), torch.empty_like(weight), torch.empty_like(weight),
                like_input(y) if want_dz else y.new_empty(0))

    # The backward passes call the backend's one-call backward op where it has one, else the batch_norm_relu_backward
    # op (an opaque op to AOT autograd: its composition of Triton ops is not traced), and leave the gradients of
    # outputs nobody used as None (set_materialize_grads): autograd would otherwise allocate and zero a tensor for
    # each, the full-size uint8 mask included.
    backward = kernels.backward or batch_norm_relu_backward

    def add_relu_setup(ctx, inputs, output):
        y, weight, _bias, residual, eps = inputs[:5]
        _out, mask, mean, var = output
        ctx.save_for_backward(y, weight, mask, mean, var)
        ctx.eps, ctx.has_residual = eps, residual is not None
        ctx.mark_non_differentiable(mask)
        ctx.set_materialize_grads(False)

    def add_relu_backward(ctx, grad_out, *_unused):  # (mask, mean and var get no gradient)
        if grad_out is None:
            return None, None, None, None, None, None, None
        y, weight, mask, mean, var = ctx.saved_tensors
        want_dz = ctx.has_residual and ctx.needs_input_grad[3]
        grad_y, grad_weight, grad_bias, dz = backward(grad_out, mask, y, weight, mean, var, ctx.eps, want_dz)
        return grad_y, grad_weight, grad_bias, dz if want_dz else None, None, None, None

    batch_norm_add_relu.register_autograd(add_relu_backward, setup_context=add_relu_setup)

    def conv_setup(ctx, inputs, output):
        y, weight, bias, conv_weight, stride, padding, dilation, groups, eps = inputs[:9]
        _out, mean, var = output[:3]
        ctx.save_for_backward(y, weight, bias, conv_weight, mean, var)
        ctx.conv_args, ctx.eps = (stride, padding, dilation, groups), eps
        ctx.mark_non_differentiable(*output[3:])  # the output statistics of batch_norm_relu_conv2d_stats
        ctx.set_materialize_grads(False)

    def conv_backward(ctx, grad_out, *_unused):  # (the statistics get no gradient)
        if grad_out is None:
            return (None,) * 11
        y, weight, bias, conv_weight, mean, var = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        scale, shift = scale_shift(weight, bias, mean, var, ctx.eps)
        activation = kernels.apply(y, scale, shift, None, False)[0]  # recomputed
        need_bn = any(ctx.needs_input_grad[:3])
        grad_activation, grad_conv_weight, _ = torch.ops.aten.convolution_backward(
            grad_out, activation, conv_weight, None, stride, padding, dilation, False, [0, 0], groups,
            [need_bn, ctx.needs_input_grad[3], False])
        grad_y = grad_weight = grad_bias = None
        if need_bn:
            grad_y, grad_weight, grad_bias, _ = backward(grad_activation, activation, y, weight, mean, var, ctx.eps,
                                                         False)
        return grad_y, grad_weight, grad_bias, grad_conv_weight, None, None, None, None, None, None, None

    batch_norm_relu_conv2d.register_autograd(conv_backward, setup_context=conv_setup)
    batch_norm_relu_conv2d_stats.register_autograd(conv_backward, setup_context=conv_setup)
    ops = {"batch_norm_add_relu": (batch_norm_add_relu, add_relu_setup, add_relu_backward, add_relu_forward),
           "batch_norm_relu_conv2d": (batch_norm_relu_conv2d, conv_setup, conv_backward, conv_forward),
           "batch_norm_relu_conv2d_stats": (batch_norm_relu_conv2d_stats, conv_setup, conv_backward,
                                            conv_stats_forward)}
    run = SimpleNamespace(**{name: eager_or_op(name + suffix, *parts) for name, parts in ops.items()})
    return SimpleNamespace(batch_norm_add_relu=batch_norm_add_relu, batch_norm_relu_conv2d=batch_norm_relu_conv2d,
                           batch_norm_relu_conv2d_stats=batch_norm_relu_conv2d_stats,
                           batch_norm_relu_backward=batch_norm_relu_backward, run=run)
