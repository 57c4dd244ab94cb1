"""Fake kernels and autograd for the C++/CUDA ops of fastcnn._C (schemas in csrc/fastcnn.cpp). Imported only when
the extension loaded: the schemas must exist before anything registers on them."""
import torch

from ..reference.conv_relu_pool import memory_format_of
from ._conv_outputs import allocate_conv_outputs, allocate_grads, allocate_outputs, register_conv_autograd


@torch.library.register_fake("fastcnn::bias_relu_pool")
def _bias_relu_pool_fake(conv, bias, pool, pool_size, pool_stride, scale=None):
    return allocate_outputs(conv, conv.shape[1], tuple(conv.shape[2:]), pool, pool_size, pool_stride)


@torch.library.register_fake("fastcnn::bias_relu_pool_backward")
def _bias_relu_pool_backward_fake(grad_out, out, code, conv_size, pool, pool_size, pool_stride, bias_grad):
    grad_conv = out.new_empty((*out.shape[:2], *conv_size)).contiguous(memory_format=memory_format_of(out))
    return grad_conv, out.new_empty(out.shape[1] if bias_grad else 0)


@torch.library.register_fake("fastcnn::conv2d_relu_pool")
def _conv2d_relu_pool_fake(input, weight, bias, stride, padding, dilation, groups, pool, pool_size, pool_stride):
    return allocate_conv_outputs(input, weight, stride, padding, dilation, pool, pool_size, pool_stride)


@torch.library.register_fake("fastcnn::conv2d_relu_pool_backward")
def _conv2d_relu_pool_backward_fake(grad_out, out, code, input, weight, stride, padding, dilation, groups, pool,
                                    pool_size, pool_stride, output_mask):
    return allocate_grads(input, weight, output_mask)


def _bias_relu_pool_setup(ctx, inputs, output):
    conv, bias, pool, pool_size, pool_stride, scale = inputs
    out, code = output
    scale_grad = scale is not None and ctx.needs_input_grad[5]
    ctx.save_for_backward(out, code, scale, conv if scale_grad else None)  # grad_scale = sum dz * conv needs conv
    ctx.args = (tuple(conv.shape[2:]), pool, pool_size, pool_stride)
    ctx.bias_grad = bias is not None and ctx.needs_input_grad[1]
    ctx.bias_dtype = None if bias is None else bias.dtype


def _bias_relu_pool_backward(ctx, grad_out, _grad_code):
    """With z = conv * scale + bias and dz the gradient at z (the kernel's, routed through the pool and ReLU):
    grad_conv = scale * dz, grad_bias = sum dz, grad_scale = sum dz * conv (sums over N, H, W)."""
    out, code, scale, conv = ctx.saved_tensors
    dz, grad_bias = torch.ops.fastcnn.bias_relu_pool_backward(grad_out, out, code, *ctx.args, ctx.bias_grad)
    grad_conv = dz if scale is None else (dz * scale.reshape(-1, 1, 1)).to(dz.dtype)
    grad_scale = None
    if conv is not None:
        grad_scale = (dz.to(scale.dtype) * conv.to(scale.dtype)).sum(dim=(0, 2, 3))
    return grad_conv, grad_bias.to(ctx.bias_dtype) if ctx.bias_grad else None, None, None, None, grad_scale


torch.library.register_autograd("fastcnn::bias_relu_pool", _bias_relu_pool_backward,
                                setup_context=_bias_relu_pool_setup)
register_conv_autograd("fastcnn::conv2d_relu_pool", torch.ops.fastcnn.conv2d_relu_pool_backward)
