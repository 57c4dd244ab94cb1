"""The fused transposed convolution's registrations: output allocation and autograd shared by its compiled backends
(the C++/CUDA op and the Triton op, so their fake kernels, outputs and saved tensors agree exactly), and the fakes
and autograd of fastcnn._C's ops (schemas in csrc/fastcnn.cpp), registered only when the loaded extension has them
(a fastcnn._C built before this op existed lacks its schema)."""
import torch

from ... import _extension
from .._dispatch import eager_or_op, memory_format_of
from .reference import output_size

# The fastcnn._C ops the cpu and cuda backends call (the route table's stale-build check).
COMPILED_OPS = ("conv_transpose2d_act", "conv_transpose2d_act_backward")


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


def register_transpose_autograd(name, op, backward_op):
    """Autograd for ``op``, an op with the conv_transpose2d_act signature; returns what runs it (`eager_or_op`).
    Saved: input and weight (which the caller holds anyway) and, for the ReLU, the output, whose sign is the ReLU
    mask; no pre-activation tensor. Only the gradients autograd asks for are computed."""

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

    torch.library.register_autograd(op, backward, setup_context=setup_context)
    return eager_or_op(name, op, setup_context, backward)


if _extension.LOADED and all(hasattr(torch.ops.fastcnn, op) for op in COMPILED_OPS):
    @torch.library.register_fake("fastcnn::conv_transpose2d_act")
    def _conv_transpose2d_act_fake(input, weight, bias, stride, padding, output_padding, groups, dilation, activation):
        return allocate_output(input, weight, stride, padding, output_padding, groups, dilation)

    @torch.library.register_fake("fastcnn::conv_transpose2d_act_backward")
    def _conv_transpose2d_act_backward_fake(grad_out, out, input, weight, stride, padding, output_padding, groups,
                                            dilation, activation, output_mask):
        return allocate_grads(input, weight, groups, output_mask)

    run_conv_transpose2d_act = register_transpose_autograd("conv_transpose2d_act",
                                                           torch.ops.fastcnn.conv_transpose2d_act.default,
                                                           torch.ops.fastcnn.conv_transpose2d_act_backward)
