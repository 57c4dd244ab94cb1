"""Fake kernels for the C++/CUDA BatchNorm ops of fastcnn._C (schemas in csrc/fastcnn.cpp), and autograd for the
one used directly by the blocks (scale_shift_add_relu, the eval-mode epilogue). Imported only when the extension
has these ops."""
import torch

from ..reference.batch_norm import accumulation_dtype, memory_format_of


def like_input(x, dtype=None):
    return torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device, memory_format=memory_format_of(x))


def _channels(x):
    return x.new_empty(x.shape[1], dtype=accumulation_dtype(x.dtype))


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


def _apply_setup(ctx, inputs, output):
    x, scale, _shift, residual, _save_mask = inputs
    out, mask = output
    ctx.save_for_backward(x, scale, mask if mask.numel() else out)
    ctx.has_scale, ctx.has_residual = scale is not None, residual is not None


def _apply_backward(ctx, grad_out, _grad_mask):
    """grad_x = scale * dz, grad_residual = dz (one pass); grad_scale = sum dz x, grad_shift = sum dz."""
    x, scale, gate = ctx.saved_tensors
    need = ctx.needs_input_grad
    want_residual = ctx.has_residual and need[3]
    grad_x = grad_scale = grad_shift = grad_residual = None
    if need[0] or want_residual:
        a = scale if scale is not None else torch.ones(x.shape[1], dtype=accumulation_dtype(x.dtype), device=x.device)
        grad_x, dz = torch.ops.fastcnn.batch_norm_backward_elemt(grad_out, gate, x, None, a, None, None, want_residual)
        grad_x, grad_residual = (grad_x if need[0] else None), (dz if want_residual else None)
    if (ctx.has_scale and need[1]) or need[2]:
        sum_dz, sum_dz_x = torch.ops.fastcnn.batch_norm_backward_reduce(grad_out, gate, x, None)
        grad_scale, grad_shift = (sum_dz_x if ctx.has_scale and need[1] else None), (sum_dz if need[2] else None)
    return grad_x, grad_scale, grad_shift, grad_residual, None


torch.library.register_autograd("fastcnn::scale_shift_add_relu", _apply_backward, setup_context=_apply_setup)
