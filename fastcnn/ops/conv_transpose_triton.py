"""The Triton backend of the fused transposed convolution as a torch.library.triton_op, so torch.compile sees into
the kernel. The forward is fastcnn's stride-phase kernel (fastcnn.triton_kernels.conv_transpose_fwd). The backward
masks dy with the saved output's sign, reduces grad_bias, and hands dy to ATen's convolution_backward (cuDNN on a
GPU): a transposed convolution's input gradient is an ordinary strided convolution of dy, and its weight gradient
swaps the roles of x and dy."""
from typing import List, Optional

import torch
from torch.library import triton_op, wrap_triton

from ..reference.conv_relu_pool import memory_format_of
from ..triton_kernels.conv_transpose_fwd import conv_transpose2d_forward as _launch_forward
from ._conv_transpose_outputs import allocate_output, register_transpose_autograd


@triton_op("fastcnn::conv_transpose2d_act_triton", mutates_args={})
def conv_transpose2d_act_triton(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                stride: List[int], padding: List[int], output_padding: List[int], groups: int,
                                dilation: List[int], activation: str) -> torch.Tensor:
    out = allocate_output(input, weight, stride, padding, output_padding, groups, dilation)
    _launch_forward(input, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups, activation, out,
                    wrap=wrap_triton)
    return out


def conv_transpose2d_act_triton_backward(grad_out, out, input, weight, stride, padding, output_padding, groups,
                                         dilation, activation, output_mask):
    """(grad_input, grad_weight, grad_bias), None where output_mask leaves one out. ReLU passes the gradient where
    the output is not <= 0 (NaN included), as PyTorch's threshold_backward does."""
    grad_y = torch.where(out <= 0, 0, grad_out) if activation == "relu" else grad_out
    grad_input = grad_weight = None
    if output_mask[0] or output_mask[1]:
        grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad_y, input, weight, None, stride, padding, dilation, True, output_padding, groups,
            [output_mask[0], output_mask[1], False])
    if grad_input is not None:
        grad_input = grad_input.contiguous(memory_format=memory_format_of(input))
    if grad_weight is not None:
        grad_weight = grad_weight.contiguous(memory_format=memory_format_of(weight))
    return grad_input, grad_weight, grad_y.sum((0, 2, 3)) if output_mask[2] else None


register_transpose_autograd(conv_transpose2d_act_triton, conv_transpose2d_act_triton_backward)
