"""The fused convolution block's registrations: output allocation and autograd shared by every compiled backend
(the C++/CUDA op and the Triton op, so their fake kernels, outputs and saved tensors agree exactly), and the fakes
and autograd of fastcnn._C's ops (schemas in csrc/fastcnn.cpp) - registered only when the loaded extension has
them: the schemas must exist before anything registers on them."""
import torch

from ... import _extension
from .._args import conv_output_size
from .._dispatch import eager_or_op, memory_format_of

# The fastcnn._C ops the cpu and cuda backends call (the route table's stale-build check).
COMPILED_OPS = ("conv2d_relu_pool", "conv2d_relu_pool_backward")
# The epilogue alone, which the transposed convolution and the BatchNorm + pool op build on (its backward with a
# BatchNorm scale: scale * dz and the scale gradient in the kernel's pass).
EPILOGUE_OPS = ("bias_relu_pool", "bias_relu_pool_backward", "bias_relu_pool_scaled_backward")


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


def register_conv_autograd(name, op, backward_op):
    """Autograd for ``op``, a fused-block op with the conv2d_relu_pool signature; returns what runs it (`eager_or_op`).
    Saved for backward: input and weight (which the caller holds anyway), the pooled output and the compact code -
    never the full-resolution activation. Only the gradients autograd asks for are computed; the code gets none (and
    no zero tensor is made for it)."""

    def setup_context(ctx, inputs, output):
        input, weight, bias, stride, padding, dilation, groups, pool, pool_size, pool_stride = inputs
        out, code = output
        ctx.save_for_backward(input, weight, out, code)
        ctx.args = (stride, padding, dilation, groups, pool, pool_size, pool_stride)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(code)
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_out, _grad_code):
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        if grad_out is None or not any(mask):
            return (None,) * 10
        input, weight, out, code = ctx.saved_tensors
        grads = backward_op(grad_out, out, code, input, weight, *ctx.args, mask)
        return tuple(g if wanted else None for g, wanted in zip(grads, mask)) + (None,) * 7

    torch.library.register_autograd(op, backward, setup_context=setup_context)
    return eager_or_op(name, op, setup_context, backward)


def _has_schemas(ops):
    return _extension.LOADED and all(hasattr(torch.ops.fastcnn, op) for op in ops)


if _has_schemas(EPILOGUE_OPS + COMPILED_OPS):
    @torch.library.register_fake("fastcnn::bias_relu_pool")
    def _bias_relu_pool_fake(conv, bias, pool, pool_size, pool_stride, scale=None):
        return allocate_outputs(conv, conv.shape[1], tuple(conv.shape[2:]), pool, pool_size, pool_stride)

    @torch.library.register_fake("fastcnn::bias_relu_pool_backward")
    def _bias_relu_pool_backward_fake(grad_out, out, code, conv_size, pool, pool_size, pool_stride, bias_grad):
        grad_conv = out.new_empty((*out.shape[:2], *conv_size)).contiguous(memory_format=memory_format_of(out))
        return grad_conv, out.new_empty(out.shape[1] if bias_grad else 0)

    @torch.library.register_fake("fastcnn::bias_relu_pool_scaled_backward")
    def _bias_relu_pool_backward_scaled_fake(grad_out, out, code, conv_size, pool, pool_size, pool_stride, bias_grad,
                                             scale, conv):
        grad_conv, grad_bias = _bias_relu_pool_backward_fake(grad_out, out, code, conv_size, pool, pool_size,
                                                             pool_stride, bias_grad)
        with_sums = scale is not None and conv is not None
        return grad_conv, grad_bias, (scale.new_empty(scale.shape[0]) if with_sums else out.new_empty(0))

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
        grad_conv = scale * dz, grad_bias = sum dz, grad_scale = sum dz * conv (sums over N, H, W). With a scale, the
        kernel's scaled backward does all three in its one pass."""
        out, code, scale, conv = ctx.saved_tensors
        if scale is None:
            grad_conv, grad_bias = torch.ops.fastcnn.bias_relu_pool_backward(grad_out, out, code, *ctx.args,
                                                                             ctx.bias_grad)
            grad_scale = None
        else:
            grad_conv, grad_bias, grad_scale = torch.ops.fastcnn.bias_relu_pool_scaled_backward(
                grad_out, out, code, *ctx.args, ctx.bias_grad, scale, conv)
            grad_scale = grad_scale if conv is not None else None
        return grad_conv, grad_bias.to(ctx.bias_dtype) if ctx.bias_grad else None, None, None, None, grad_scale

    torch.library.register_autograd("fastcnn::bias_relu_pool", _bias_relu_pool_backward,
                                    setup_context=_bias_relu_pool_setup)
    run_conv2d_relu_pool = register_conv_autograd("conv2d_relu_pool", torch.ops.fastcnn.conv2d_relu_pool.default,
                                                  torch.ops.fastcnn.conv2d_relu_pool_backward)
