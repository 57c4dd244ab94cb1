"""The compiled training-mode BatchNorm + ReLU + pool op (math and saved tensors in
fastcnn/ops/batch_norm_relu_pool.py): ``fastcnn::batch_norm_relu_pool`` built from fastcnn._C's BatchNorm statistics,
fused epilogue and BatchNorm backward kernels, with its fake and autograd. Imported only when the extension has
those ops."""
from typing import List, Optional, Tuple

import torch

from ..reference.batch_norm import accumulation_dtype, memory_format_of
from . import batch_norm  # noqa: F401  (fakes of the BatchNorm ops)
from .conv_relu_pool.register import allocate_outputs  # (and the epilogue ops' fakes)


@torch.library.custom_op("fastcnn::batch_norm_relu_pool", mutates_args=())
def batch_norm_relu_pool(y: torch.Tensor, y_bias: Optional[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor,
                          eps: float, pool: str, pool_size: List[int],
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
    acc = accumulation_dtype(y.dtype)
    return out, code, y.new_empty(y.shape[1], dtype=acc), y.new_empty(y.shape[1], dtype=acc)


def _batch_norm_backward(dz, y, weight, mean, var, eps):
    """BatchNorm's (grad_y, grad_weight, grad_bias) from the gradient ``dz`` at its output, in PyTorch's grouping
    ``grad_y = a * (dz - b * (y - mean) - d)`` with ``a = gamma * invstd``, ``b = invstd^2 * sum(dz (y - mean)) / M``,
    ``d = sum(dz) / M`` (see fastcnn/reference/batch_norm.py); the kernels' ReLU gate is held open, dz being
    routed already."""
    open_gate = torch.empty(y.shape, dtype=torch.uint8, device=y.device, memory_format=memory_format_of(y)).fill_(1)
    sum_dz, sum_dz_ymu = torch.ops.fastcnn.batch_norm_backward_reduce(dz, open_gate, y, mean)
    invstd = torch.rsqrt(var + eps)
    count = y.numel() // y.shape[1]
    b, d = invstd * invstd * sum_dz_ymu / count, sum_dz / count
    grad_y, _ = torch.ops.fastcnn.batch_norm_backward_elemt(dz, open_gate, y, mean, weight * invstd, b, d, False)
    return grad_y, sum_dz_ymu * invstd, sum_dz


def _setup_context(ctx, inputs, output):
    y, y_bias, weight, _bias, eps, pool, pool_size, pool_stride = inputs
    out, code, mean, var = output
    ctx.save_for_backward(y, weight, out, code, mean, var)
    ctx.y_bias_like = None if y_bias is None else (y_bias.shape, y_bias.dtype, y_bias.device)
    ctx.eps, ctx.pool_args = eps, (pool, pool_size, pool_stride)


def _backward(ctx, grad_out, _grad_code, _grad_mean, _grad_var):
    y, weight, out, code, mean, var = ctx.saved_tensors
    need_y, need_y_bias, need_weight, need_bias = ctx.needs_input_grad[:4]
    grad_y = grad_weight = grad_bias = None
    if need_y or need_weight or need_bias:
        # dz: the gradient at z = y * scale + shift, at full resolution, already routed through the pool and ReLU.
        dz, _ = torch.ops.fastcnn.bias_relu_pool_backward(grad_out, out, code, list(y.shape[2:]), *ctx.pool_args,
                                                          False)
        grad_y, grad_weight, grad_bias = _batch_norm_backward(dz, y, weight, mean, var, ctx.eps)
    grad_y_bias = None
    if need_y_bias:
        shape, dtype, device = ctx.y_bias_like
        grad_y_bias = torch.zeros(shape, dtype=dtype, device=device)
    return grad_y, grad_y_bias, grad_weight, grad_bias, None, None, None, None


batch_norm_relu_pool.register_autograd(_backward, setup_context=_setup_context)
