"""Output allocation and autograd wiring shared by the compiled backends of the fused transposed convolution (the
C++/CUDA op and the Triton op), so their fake kernels, outputs and saved tensors agree exactly."""
import torch

from ._dispatch import memory_format_of
from ..reference.conv_transpose import output_size


def allocate_output(input, weight, stride, padding, output_padding, groups, dilation):
    """Empty ``[N, C_out, OH, OW]`` output of one call, in input's memory format."""
    size = output_size(input.shape[2:], weight.shape[2:], stride, padding, output_padding, dilation)
    return torch.empty((input.shape[0], weight.shape[1] * groups, *size), dtype=input.dtype, device=input.device,
                       memory_format=memory_format_of(input))


def allocate_grads(input, weight, groups, output_mask):
    """Empty (grad_input, grad_weight, grad_bias) in their tensors' memory formats; left-out ones are empty."""

    def grad_like(t, wanted):
        if not wanted:
            return t.new_empty(0)
        return torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=memory_format_of(t))

    grad_bias = weight.new_empty(weight.shape[1] * groups if output_mask[2] else 0)
    return grad_like(input, output_mask[0]), grad_like(weight, output_mask[1]), grad_bias


def register_transpose_autograd(forward_op, backward_op):
    """Autograd for an op with the conv_transpose2d_act signature. Saved: input and weight (which the caller holds
    anyway) and, for the ReLU, the output, whose sign is the ReLU mask; no pre-activation tensor. Only the gradients
    autograd asks for are computed."""

    def setup_context(ctx, inputs, output):
        input, weight, bias, stride, padding, output_padding, groups, dilation, activation = inputs
        ctx.save_for_backward(input, weight, output if activation == "relu" else None)
        ctx.args = (stride, padding, output_padding, groups, dilation, activation)
        ctx.has_bias = bias is not None

    def backward(ctx, grad_out):
        input, weight, out = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        grads = backward_op(grad_out, grad_out if out is None else out, input, weight, *ctx.args, mask)
        return tuple(g if wanted else None for g, wanted in zip(grads, mask)) + (None,) * 6

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)
