"""The Triton backend of ``conv2d_batch_stats``: ``fastcnn::conv2d_batch_stats_triton`` as a
torch.library.triton_op (torch.compile sees into the kernels), with a fake and an autograd. Imported only when
Triton is installed; the kernel lives in fastcnn.triton_kernels.conv_bn_stats."""
from typing import List, Tuple

import torch
from torch.library import triton_op

from ..triton_kernels.conv_bn_stats import conv2d_batch_stats as _launch
from ._backends import wrap_triton
from ._args import conv_output_size
from .conv_relu_pool.register import allocate_outputs


@triton_op("fastcnn::conv2d_batch_stats_triton", mutates_args={})
def conv2d_batch_stats_triton(input: torch.Tensor, weight: torch.Tensor, stride: List[int], padding: List[int],
                              dilation: List[int], groups: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, var): y = conv2d(input, weight) in input's dtype and memory format; mean and biased var of y per
    output channel, float32."""
    size = conv_output_size(input.shape[2:], weight.shape[2:], stride, padding, dilation)
    y, _ = allocate_outputs(input, weight.shape[0], size, "none", None, None)
    mean, var = (input.new_empty(weight.shape[0], dtype=torch.float32) for _ in range(2))  # (outputs may not alias)
    _launch(input, weight, tuple(stride), tuple(padding), tuple(dilation), groups, y, mean, var, wrap=wrap_triton)
    return y, mean, var


def _setup_context(ctx, inputs, output):
    input, weight, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(input, weight)
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_y, _grad_mean, _grad_var):
    # mean and var are non-differentiable: the BatchNorm backward that consumes them re-derives their contribution
    # to grad_y from y itself (batch_norm_autograd.py), so only the convolution's own backward remains.
    input, weight = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv_args
    need_input, need_weight = ctx.needs_input_grad[:2]
    grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad_y, input, weight, None, stride, padding, dilation, False, [0, 0], groups,
        [need_input, need_weight, False])
    return grad_input, grad_weight, None, None, None, None


torch.library.register_autograd("fastcnn::conv2d_batch_stats_triton", _backward, setup_context=_setup_context)
