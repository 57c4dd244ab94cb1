"""Output allocation and autograd wiring shared by every compiled backend of the fused convolution block
(the C++/CUDA op and the Triton op), so their fake kernels, outputs and saved tensors agree exactly."""
import torch

from ..reference.conv_relu_pool import memory_format_of
from ._conv_args import conv_output_size


def allocate_conv_outputs(input, weight, stride, padding, dilation, pool, pool_size, pool_stride):
    """Empty (out, code) for one fused-block forward."""
    size = conv_output_size(input.shape[2:], weight.shape[2:], stride, padding, dilation)
    return allocate_outputs(input, weight.shape[0], size, pool, pool_size, pool_stride)


def allocate_outputs(input, channels, conv_size, pool, pool_size, pool_stride):
    """Empty (out, code) for a conv output of `channels` x `conv_size`: out is N x channels x pooled size in input's
    memory format; code is one uint8 per pooled element in the same layout, or an empty tensor for pool="none"."""
    size = conv_size
    if pool != "none":
        size = tuple((size[i] - pool_size[i]) // pool_stride[i] + 1 for i in range(2))
    shape = (input.shape[0], channels, *size)
    fmt = memory_format_of(input)
    out = torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=fmt)
    if pool == "none":
        return out, torch.empty(0, dtype=torch.uint8, device=input.device)
    return out, torch.empty(shape, dtype=torch.uint8, device=input.device, memory_format=fmt)


def allocate_grads(input, weight, output_mask):
    """Empty (grad_input, grad_weight, grad_bias), each in its tensor's memory format; the ones output_mask leaves
    out are empty tensors (the op schemas return Tensors, never None)."""

    def grad_like(t, wanted):
        if not wanted:
            return t.new_empty(0)
        return torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=memory_format_of(t))

    grad_bias = weight.new_empty(weight.shape[0] if output_mask[2] else 0)
    return grad_like(input, output_mask[0]), grad_like(weight, output_mask[1]), grad_bias


def register_conv_autograd(forward_op, backward_op):
    """Autograd for a fused-block op with the conv2d_relu_pool signature. Saved for backward: input and weight
    (which the caller holds anyway), the pooled output and the compact code - never the full-resolution activation.
    Only the gradients autograd asks for are computed."""

    def setup_context(ctx, inputs, output):
        input, weight, bias, stride, padding, dilation, groups, pool, pool_size, pool_stride = inputs
        out, code = output
        ctx.save_for_backward(input, weight, out, code)
        ctx.args = (stride, padding, dilation, groups, pool, pool_size, pool_stride)
        ctx.has_bias = bias is not None

    def backward(ctx, grad_out, _grad_code):
        input, weight, out, code = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        grads = backward_op(grad_out, out, code, input, weight, *ctx.args, mask)
        return tuple(g if wanted else None for g, wanted in zip(grads, mask)) + (None,) * 7

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)
