"""The BatchNorm ops' registrations on fastcnn._C (schemas in csrc/fastcnn.cpp), made only when the loaded extension
has them (a build from older sources lacks them: the route tables then warn once and route on):

* the four primitive ops as a backend's `KERNELS` (`_training.Kernels`): their fake kernels and the autograd of
  scale_shift_add_relu (the eval-mode epilogue, used directly by the blocks);
* `TRAINING`: the training ops built on them (``fastcnn::batch_norm_add_relu``, ``batch_norm_relu_conv2d``,
  ``batch_norm_relu_conv2d_stats``, ``batch_norm_relu_backward``; autograd and fakes in _training.py), and
  `CONV_STATS`, ATen's convolution + the statistics op (its epilogue cannot take the reduction);
* ``fastcnn::batch_norm_relu_pool``: training-mode BatchNorm + ReLU + pool from the statistics op, the fused
  epilogue ``fastcnn::bias_relu_pool`` (one pass, saving only the pooled output and a uint8 code) and the BatchNorm
  backward kernels, with its fake and autograd (math in reference.py and the package docstring).
"""
from typing import List, Optional, Tuple

import torch

from ... import _extension
from .._dispatch import accumulation_dtype, memory_format_of
from ..conv_relu_pool.register import EPILOGUE_OPS, allocate_outputs  # (and the epilogue ops' fakes)
from ._training import Kernels, composite_conv_stats, define_training_ops, like_input, register_apply_autograd

# The fastcnn._C ops the cpu and cuda backends call (the route tables' stale-build check).
COMPILED_OPS = ("batch_norm_stats", "scale_shift_add_relu", "batch_norm_backward_reduce", "batch_norm_backward_elemt")
# Used where the build has them (one call each for what the compositions of the ops above do).
ONE_CALL_OPS = ("batch_norm_backward", "batch_norm_scale_shift")
UPDATE_RUNNING = getattr(torch.ops.fastcnn, "batch_norm_update_running", None) if _extension.LOADED else None
POOL_OPS = ("batch_norm_stats", "batch_norm_backward_reduce", "batch_norm_backward_elemt", *EPILOGUE_OPS)

KERNELS = CONV_STATS = TRAINING = None


def _channels(x):
    return x.new_empty(x.shape[1], dtype=accumulation_dtype(x.dtype))


if _extension.LOADED and all(hasattr(torch.ops.fastcnn, op) for op in COMPILED_OPS):
    @torch.library.register_fake("fastcnn::batch_norm_stats")
    def _stats_fake(input):
        return _channels(input), _channels(input)

    @torch.library.register_fake("fastcnn::scale_shift_add_relu")
    def _apply_fake(input, scale, shift, residual, save_mask):
        mask = like_input(input, torch.uint8) if save_mask else input.new_empty(0, dtype=torch.uint8)
        return like_input(input), mask

    @torch.library.register_fake("fastcnn::batch_norm_backward_reduce")
    def _reduce_fake(grad_out, gate, input, mean):
        return _channels(input), _channels(input)

    @torch.library.register_fake("fastcnn::batch_norm_backward_elemt")
    def _elemt_fake(grad_out, gate, input, mean, a, b, d, want_dz):
        return like_input(input), like_input(input) if want_dz else input.new_empty(0)

    # The one-call backward and the scale/shift op (an older build lacks them: the compositions stand in).
    if all(hasattr(torch.ops.fastcnn, op) for op in ONE_CALL_OPS):
        @torch.library.register_fake("fastcnn::batch_norm_backward")
        def _backward_fake(grad_out, gate, input, weight, mean, var, eps, want_dz):
            return (like_input(input), torch.empty_like(weight), torch.empty_like(weight),
                    like_input(input) if want_dz else input.new_empty(0))

        @torch.library.register_fake("fastcnn::batch_norm_scale_shift")
        def _scale_shift_fake(weight, bias, mean, var, eps):
            return torch.empty_like(weight), torch.empty_like(weight)

        one_call = {"backward": torch.ops.fastcnn.batch_norm_backward,
                    "scale_shift": torch.ops.fastcnn.batch_norm_scale_shift}
    else:
        one_call = {}
    KERNELS = Kernels(stats=torch.ops.fastcnn.batch_norm_stats, apply=torch.ops.fastcnn.scale_shift_add_relu,
                      backward_reduce=torch.ops.fastcnn.batch_norm_backward_reduce,
                      backward_elemt=torch.ops.fastcnn.batch_norm_backward_elemt, **one_call)
    register_apply_autograd("fastcnn::scale_shift_add_relu", KERNELS)
    CONV_STATS = composite_conv_stats(KERNELS)
    TRAINING = define_training_ops("", KERNELS, CONV_STATS)

if UPDATE_RUNNING is not None:
    @torch.library.register_fake("fastcnn::batch_norm_update_running")
    def _update_running_fake(running_mean, running_var, mean, var, factor, count):
        return None

if _extension.LOADED and all(hasattr(torch.ops.fastcnn, op) for op in POOL_OPS):
    @torch.library.custom_op("fastcnn::batch_norm_relu_pool", mutates_args=())
    def batch_norm_relu_pool(y: torch.Tensor, y_bias: Optional[torch.Tensor], weight: torch.Tensor,
                             bias: torch.Tensor, eps: float, pool: str, pool_size: List[int],
                             pool_stride: List[int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(out, code, mean, var), mean and var of ``y`` itself; ``y_bias`` is an input only to receive its zero
        gradient."""
        mean, var = torch.ops.fastcnn.batch_norm_stats(y)
        scale = weight * torch.rsqrt(var + eps)
        shift = bias - mean * scale
        out, code = torch.ops.fastcnn.bias_relu_pool(y, shift, pool, pool_size, pool_stride, scale)
        return out, code, mean, var

    @batch_norm_relu_pool.register_fake
    def _(y, y_bias, weight, bias, eps, pool, pool_size, pool_stride):
        out, code = allocate_outputs(y, y.shape[1], tuple(y.shape[2:]), pool, pool_size, pool_stride)
        return out, code, _channels(y), _channels(y)

    def _batch_norm_backward(dz, y, weight, mean, var, eps):
        """BatchNorm's (grad_y, grad_weight, grad_bias) from the gradient ``dz`` at its output, in PyTorch's grouping
        ``grad_y = a * (dz - b * (y - mean) - d)`` with ``a = gamma * invstd``, ``b = invstd^2 * sum(dz (y - mean))
        / M``, ``d = sum(dz) / M`` (see reference.py); the kernels' ReLU gate is held open, dz being routed
        already."""
        open_gate = torch.empty(y.shape, dtype=torch.uint8, device=y.device,
                                memory_format=memory_format_of(y)).fill_(1)
        if KERNELS is not None and KERNELS.backward is not None:  # the same bits in one call
            return tuple(KERNELS.backward(dz, open_gate, y, weight, mean, var, eps, False)[:3])
        sum_dz, sum_dz_ymu = torch.ops.fastcnn.batch_norm_backward_reduce(dz, open_gate, y, mean)
        invstd = torch.rsqrt(var + eps)
        count = y.numel() // y.shape[1]
        b, d = invstd * invstd * sum_dz_ymu / count, sum_dz / count
        grad_y, _ = torch.ops.fastcnn.batch_norm_backward_elemt(dz, open_gate, y, mean, weight * invstd, b, d, False)
        return grad_y, sum_dz_ymu * invstd, sum_dz

    def _pool_setup_context(ctx, inputs, output):
        y, y_bias, weight, _bias, eps, pool, pool_size, pool_stride = inputs
        out, code, mean, var = output
        ctx.save_for_backward(y, weight, out, code, mean, var)
        ctx.y_bias_like = None if y_bias is None else (y_bias.shape, y_bias.dtype, y_bias.device)
        ctx.eps, ctx.pool_args = eps, (pool, pool_size, pool_stride)
        ctx.mark_non_differentiable(code, mean, var)
        ctx.set_materialize_grads(False)  # no zero tensor for the outputs that get no gradient (the code above all)

    def _pool_backward(ctx, grad_out, _grad_code, _grad_mean, _grad_var):
        if grad_out is None:
            return (None,) * 8
        y, weight, out, code, mean, var = ctx.saved_tensors
        need_y, need_y_bias, need_weight, need_bias = ctx.needs_input_grad[:4]
        grad_y = grad_weight = grad_bias = None
        if need_y or need_weight or need_bias:
            # dz: the gradient at z = y * scale + shift, at full resolution, already routed through the pool and ReLU.
            dz, _ = torch.ops.fastcnn.bias_relu_pool_backward(grad_out, out, code, list(y.shape[2:]),
                                                              *ctx.pool_args, False)
            grad_y, grad_weight, grad_bias = _batch_norm_backward(dz, y, weight, mean, var, ctx.eps)
        grad_y_bias = None
        if need_y_bias:
            shape, dtype, device = ctx.y_bias_like
            grad_y_bias = torch.zeros(shape, dtype=dtype, device=device)
        return grad_y, grad_y_bias, grad_weight, grad_bias, None, None, None, None

    batch_norm_relu_pool.register_autograd(_pool_backward, setup_context=_pool_setup_context)
