"""The fake and autograd of fastcnn::conv2d_winograd (schema in csrc/fastcnn.cpp, CPU kernel in
csrc/cpu/conv2d_winograd.cpp) - registered only when the loaded fastcnn._C has it."""
import torch

from ... import _extension
from .._dispatch import eager_or_op, memory_format_of
from ..conv_relu_pool.register import allocate_grads

COMPILED_OPS = ("conv2d_winograd", "conv2d_winograd_backward")


if _extension.LOADED and all(hasattr(torch.ops.fastcnn, op) for op in COMPILED_OPS):
    @torch.library.register_fake("fastcnn::conv2d_winograd")
    def _conv2d_winograd_fake(input, weight, padding):
        size = [input.shape[2 + axis] + 2 * padding[axis] - weight.shape[2 + axis] + 1 for axis in range(2)]
        return input.new_empty((input.shape[0], weight.shape[0], *size)).contiguous(
            memory_format=memory_format_of(input))

    @torch.library.register_fake("fastcnn::conv2d_winograd_backward")
    def _conv2d_winograd_backward_fake(grad_out, input, weight, padding, output_mask):
        return allocate_grads(input, weight, [*output_mask, False])[:2]

    def _setup_context(ctx, inputs, output):
        input, weight, padding = inputs
        ctx.save_for_backward(input, weight)
        ctx.padding = padding
        ctx.set_materialize_grads(False)

    def _backward(ctx, grad_out):
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
        if grad_out is None or not any(mask):
            return None, None, None
        input, weight = ctx.saved_tensors
        grads = torch.ops.fastcnn.conv2d_winograd_backward(grad_out, input, weight, ctx.padding, mask)
        return tuple(g if wanted else None for g, wanted in zip(grads, mask)) + (None,)

    torch.library.register_autograd("fastcnn::conv2d_winograd", _backward, setup_context=_setup_context)
    run_conv2d_winograd = eager_or_op("conv2d_winograd", torch.ops.fastcnn.conv2d_winograd.default, _setup_context,
                                      _backward)
