"""The Triton backend of the fused transposed convolution as torch.library.triton_op's, so torch.compile sees into
the kernels (fastcnn.triton_kernels.conv_transpose). The forward is fastcnn's stride-phase kernel; the backward
computes the input gradient as an ordinary strided convolution of dy and the weight gradient with the roles of x and
dy swapped, both applying the ReLU mask (the saved output's sign) as dy is loaded, and reduces grad_bias
deterministically."""
from typing import List, Optional, Tuple

import torch
from torch.library import triton_op

from ...triton_kernels.conv_transpose import conv_transpose2d_backward as _launch_backward
from ...triton_kernels.conv_transpose import conv_transpose2d_forward as _launch_forward
from .._dispatch import wrap_triton
from .register import allocate_grads, allocate_output, register_transpose_autograd


@triton_op("fastcnn::conv_transpose2d_act_triton", mutates_args={})
def conv_transpose2d_act_triton(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                stride: List[int], padding: List[int], output_padding: List[int], groups: int,
                                dilation: List[int], activation: str) -> torch.Tensor:
    out = allocate_output(input, weight, stride, padding, output_padding, groups, dilation)
    _launch_forward(input, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups, activation, out,
                    wrap=wrap_triton)
    return out


@triton_op("fastcnn::conv_transpose2d_act_triton_backward", mutates_args={})
def conv_transpose2d_act_triton_backward(grad_out: torch.Tensor, out: torch.Tensor, input: torch.Tensor,
                                         weight: torch.Tensor, stride: List[int], padding: List[int],
                                         output_padding: List[int], groups: int, dilation: List[int],
                                         activation: str, output_mask: List[bool]
                                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_input, grad_weight, grad_bias); the ones output_mask leaves out come back empty. ``out`` is read only
    for the ReLU mask."""
    grad_input, grad_weight, grad_bias = allocate_grads(input, weight, groups, output_mask)
    _launch_backward(grad_out, out, input, weight, tuple(stride), tuple(padding), tuple(dilation), groups,
                     activation, grad_input if output_mask[0] else None, grad_weight if output_mask[1] else None,
                     grad_bias if output_mask[2] else None, wrap=wrap_triton)
    return grad_input, grad_weight, grad_bias


run_conv_transpose2d_act_triton = register_transpose_autograd(
    "conv_transpose2d_act_triton", conv_transpose2d_act_triton, conv_transpose2d_act_triton_backward)
